"""``python -m servers.e1000``: the xdev-e1000 device server."""

from servers.e1000.cli import main

raise SystemExit(main())
