"""Copies of the host's libvfio-user for dom0 of the emulated Xen host.

dom0's Debian has no libvfio-user, so the Xen-tier tests that need it copy
the host's build (a library file and the shared libraries it loads, the C
library's own family excepted: dom0 has its own) into the session's scratch
share; the dom0 script copies them onto local disk before use. Nothing of
libvfio-user ever enters the repository. Tests skip with the reason where
it is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xdevproto.lvu.loader import LIBRARY_NAME, library_path, unavailable_reason

#: dom0 has its own C library; copying the host's would mix two glibcs.
GLIBC = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux")


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries ``binary`` loads on this host, the C library's own excepted."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    libs = []
    for name, path in re.findall(r"^\s*(\S+) => (/\S+)", done.stdout, re.M):
        if not name.startswith(GLIBC):
            libs.append(Path(path))
    return libs


def require_libvfio_user() -> Path:
    """The host's libvfio-user file; skips the test where it is absent."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"libvfio-user: {reason}")
    if shutil.which("ldd") is None:
        pytest.skip("ldd not found: cannot tell which libraries libvfio-user needs")
    path = library_path()
    if path is None:
        pytest.skip("libvfio-user loads but its file is not in /proc/self/maps")
    return Path(path)


def stage_library(scratch: Path, name: str = "lvu-lib") -> Path:
    """``scratch/name`` holding libvfio-user (under its soname) and its libraries."""
    library = require_libvfio_user()
    stage = scratch / name
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copy(library, stage / LIBRARY_NAME)
    for lib in shared_libraries(library):
        shutil.copy(lib, stage / lib.name)  # follows symlinks: the soname's file
    return stage
