"""``python -m xdevproto.conformance``: the same as ``xdev-conformance``."""

import sys

from .cli import main

sys.exit(main())
