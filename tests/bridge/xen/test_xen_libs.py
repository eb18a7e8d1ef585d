"""The cffi declarations against Xen's headers and shared libraries.

* Every prototype in ``libs.CDEF`` is re-declared after including the real
  headers and compiled with gcc: C rejects a redeclaration with conflicting
  types, so a wrong argument or return type fails here.
* Every declared function resolves in the installed ``.so``.
* Opening handles outside a Xen domain fails with a typed, explanatory error.
"""

from __future__ import annotations

import errno
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.xen import libs
from bridge.xen.errors import XenCallError, XenPermissionError, XenUnavailable

HEADERS = ["xendevicemodel.h", "xenforeignmemory.h", "xenevtchn.h", "xentoolcore.h"]


def prototypes() -> list[str]:
    statements = [s.strip() for s in re.sub(r"/\*.*?\*/", "", libs.CDEF, flags=re.S).split(";")]
    return [s for s in statements if "(" in s and not s.startswith("typedef")]


def function_names() -> list[str]:
    return [re.search(r"(\w+)\s*\(", p).group(1) for p in prototypes()]  # type: ignore[union-attr]


def test_prototypes_match_xen_headers(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    probe = subprocess.run([gcc, "-E", "-x", "c", "-"], input="#include <xendevicemodel.h>\n",
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("Xen tool headers absent (apt-get install libxen-dev)")
    assert len(prototypes()) >= 25
    source = "".join(f"#include <{h}>\n" for h in HEADERS)
    source += "".join(f"{p};\n" for p in prototypes())
    src = tmp_path / "decls.c"
    src.write_text(source)
    result = subprocess.run([gcc, "-std=gnu11", "-Werror", "-fsyntax-only", str(src)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_every_declared_function_exists_in_the_libraries() -> None:
    try:
        _, loaded = libs.load_libraries()
    except XenUnavailable as exc:
        pytest.skip(f"Xen libraries not installed: {exc}")
    found = set()
    for name in function_names():
        for lib in loaded.values():
            try:
                getattr(lib, name)
            except AttributeError:
                continue
            found.add(name)
            break
    assert sorted(set(function_names()) - found) == []


def test_opening_outside_xen_gives_a_clear_error() -> None:
    if Path("/dev/xen/privcmd").exists():
        pytest.skip("running in a Xen domain")
    try:
        libs.load_libraries()
    except XenUnavailable:
        pytest.skip("Xen libraries not installed")
    with pytest.raises((XenUnavailable, XenPermissionError)) as info:
        libs.XenLibs()
    assert "xen" in str(info.value).lower()


def test_evtchn_calls_on_the_device_fd() -> None:
    """pending/unmask/notify as the evtchn device takes them: a port per
    4-byte read, unmasking as a 4-byte write, errors typed with the call."""
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        xen = libs.XenLibs.__new__(libs.XenLibs)  # no Xen here: just the fd
        xen._evfd = a.fileno()
        assert xen.pending() is None
        b.send((513).to_bytes(4, sys.byteorder) + (7).to_bytes(4, sys.byteorder))
        assert (xen.pending(), xen.pending(), xen.pending()) == (513, 7, None)
        xen.unmask(70000)
        assert b.recv(16) == (70000).to_bytes(4, sys.byteorder)
        with pytest.raises(XenCallError) as info:
            xen.notify(5)  # a socket has no IOCTL_EVTCHN_NOTIFY
        assert info.value.call == "xenevtchn_notify" and info.value.errno == errno.ENOTTY
        b.send(b"\1\2")  # the device never hands out part of a port
        with pytest.raises(XenCallError, match="xenevtchn_pending"):
            xen.pending()
