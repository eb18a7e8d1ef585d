"""Fixtures for the Xen tier: the emulated Xen host (see bridge.emuhost).

The image is built once and cached (``$XDEV_EMUHOST_CACHE`` or
``~/.cache/xdev/emuhost``); building needs root and debootstrap. Each
``EmuHost.run`` is one boot of the host; tests that need several steps in
one boot put them in one script.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bridge.emuhost import EmuHost, MissingHostTool
from bridge.emuhost.image import BOOT_TOOLS, BUILD_TOOLS, check_host_tools


@pytest.fixture(scope="session")
def emuhost() -> Iterator[EmuHost]:
    """The emulated Xen host with its image built; skips where it cannot be had."""
    host = EmuHost()
    try:
        check_host_tools(BOOT_TOOLS)
        if host.image() is None:
            if os.geteuid() != 0:
                pytest.skip("no cached emulated-host image and building one needs root")
            check_host_tools(BUILD_TOOLS)
    except MissingHostTool as exc:
        pytest.skip(str(exc))
    host.ensure_image()
    yield host
