"""Fixtures for the Xen tier: the emulated Xen host (see bridge.emuhost).

The image is built once and cached (``$XDEV_EMUHOST_CACHE`` or
``~/.cache/xdev/emuhost``); building needs root and debootstrap.

* ``emuhost``: the :class:`EmuHost`, for tests that boot their own host
  (``emuhost.run(...)``: a pristine dom0, about 30 s of boot each).
* ``emuhost_session``: one host booted for the whole test session; each test
  runs its scripts with ``emuhost_session.run(...)``. Jobs share dom0 (files,
  modules, services persist; guests are destroyed after each job), so use it
  for tests that clean up after themselves. A session-wide read-write share
  ``scratch`` is mounted at /xdev/scratch (host side: ``emuhost_scratch``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.emuhost import EmuHost, HostSession, MissingHostTool, Share
from bridge.emuhost.image import BOOT_TOOLS, BUILD_TOOLS, check_host_tools


@pytest.fixture(scope="session")
def emuhost() -> EmuHost:
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
    return host


@pytest.fixture(scope="session")
def emuhost_scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emuhost-scratch")


@pytest.fixture(scope="session")
def emuhost_session(
    emuhost: EmuHost, emuhost_scratch: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostSession]:
    """One boot of the emulated host shared by the session's tests."""
    session = emuhost.session(
        shares={"scratch": Share(emuhost_scratch, readonly=False)},
        results_dir=tmp_path_factory.mktemp("emuhost-session"),
    )
    with session:
        yield session
