"""C callbacks without write+execute memory (systemd MemoryDenyWriteExecute=yes).

The ctypes fallback is checked everywhere; the served test applies the
kernel's PR_SET_MDWE (the same refusal systemd's MemoryDenyWriteExecute
asks for) to a daemon and needs libvfio-user and Linux >= 6.3.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.lvu.loader import ffi, unavailable_reason
from xdevproto.lvu.trampoline import _via_ctypes
from xdevproto.testdev import ID_VALUE
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags

REPO = Path(__file__).resolve().parents[3]
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def test_ctypes_fallback_converts_arguments_results_and_errno() -> None:
    seen: list[object] = []

    def access(ctx: object, buf: object, count: int, offset: int, is_write: bool) -> int:
        seen.append((ffi.typeof(buf).cname, count, offset, is_write))
        ffi.buffer(buf, count)[:] = b"x" * count
        ffi.errno = errno.EAGAIN
        return -1

    ptr, keep = _via_ctypes("vfu_region_access_cb_t *", access, -1)
    buf = ffi.new("char[]", 4)
    assert ptr(ffi.NULL, buf, 4, -2, True) == -1
    assert ffi.errno == errno.EAGAIN  # reached the caller as C errno
    assert seen == [("char *", 4, -2, True)] and ffi.buffer(buf)[:] == b"xxxx"
    assert keep is not None

    def boom(_ctx: object, _kind: int) -> int:
        raise RuntimeError("bug")

    reset, _keep = _via_ctypes("vfu_reset_cb_t *", boom, -1)
    assert reset(ffi.NULL, 0) == -1  # the error value, as cffi would return


def _mdwe() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        os._exit(99)


def _mdwe_supported() -> bool:
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_mdwe, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(unavailable_reason() is not None,
                    reason=f"libvfio-user unavailable: {unavailable_reason()}")
def test_engine_serves_under_memory_deny_write_execute(tmp_path: Path) -> None:
    if not _mdwe_supported():
        pytest.skip("PR_SET_MDWE unsupported by this kernel (Linux >= 6.3)")
    # the restriction is real: plain cffi callbacks fail in such a process
    plain = subprocess.run(
        [sys.executable, "-c", "import cffi; cffi.FFI().callback('int(int)', lambda x: x)"],
        preexec_fn=_mdwe, capture_output=True, check=False)
    assert b"write+execute" in plain.stderr
    sock = tmp_path / "mdwe.sock"
    proc = subprocess.Popen([sys.executable, "-m", "xdevproto.testdev", "--socket", str(sock),
                             "--engine", "libvfio-user"], cwd=REPO, preexec_fn=_mdwe,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        time.sleep(0.2)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        with MemfdRam(0x1000) as ram, Client.connect(str(sock), guest=ram) as c:
            assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)
            c.dma_map(0, 0x1000, fd=ram.fd)
            c.region_write(PciRegion.BAR0, 0x100, b"no W+X needed")
            c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x800, 13))
            c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 2))
            assert ram.read(0x800, 13) == b"no W+X needed"
            c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[efd])
            c.region_write(PciRegion.BAR0, 0x1C, struct.pack("<I", 0))
            assert select.select([efd], [], [], 10)[0] == [efd]  # forwarded by the loop
        os.close(efd)
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
