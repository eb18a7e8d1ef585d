"""``python -m bridge.emuhost`` -- see :mod:`bridge.emuhost.cli`."""

import sys

from bridge.emuhost.cli import main

sys.exit(main())
