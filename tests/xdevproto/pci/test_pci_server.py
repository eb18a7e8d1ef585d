"""The framework behind the real server runtime: a device's state saved in one
server process and loaded into a fresh one through the protocol's migration
messages (STOP_COPY -> MIG_DATA_READ, RESUMING -> MIG_DATA_WRITE), then every
region read compared; interrupts and DMA through a real client."""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdevproto.client import Client
from xdevproto.errors import RemoteError
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import IrqIndex, MigState, PciRegion, SetIrqsFlags

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CFG = PciRegion.CONFIG


class ServerProcess:
    def __init__(self, sock: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.path = sock
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "pci_sample_device.py"), "--socket", str(sock)],
            env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {self.stop()}")
            time.sleep(0.02)

    def client(self, guest: MemfdRam | None = None) -> Client:
        """Connect; the socket file appears at bind(), before listen(), so a
        refused connection right after start means "not yet"."""
        deadline = time.monotonic() + 20
        while True:
            try:
                return Client.connect(str(self.path), guest=guest)
            except ConnectionRefusedError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        return err.decode(errors="replace")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a = ServerProcess(tmp_path / "a.sock")
    b = ServerProcess(tmp_path / "b.sock")
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def make_busy(c: Client) -> None:
    c.region_write(CFG, 0x04, struct.pack("<H", 0x0407))
    c.region_write(CFG, 0x10, struct.pack("<I", 0xFEB00000))
    c.region_write(CFG, 0x14, struct.pack("<I", 0xC040))
    c.region_write(CFG, 0x18, struct.pack("<II", 0xFE000000, 0x1))
    c.region_write(CFG, 0x3C, b"\x0b")
    c.region_write(0, 0x04, struct.pack("<I", 0x1234_5600))
    c.region_write(0, 0x18, struct.pack("<Q", 0x1_0000_2000))
    c.region_write(0, 0x24, struct.pack("<I", 0x8000_0001))
    c.region_write(0, 0x2C, struct.pack("<H", 0x33))
    for i in range(16):
        c.region_write(0, 0x100 + 8 * i, struct.pack("<I", 0xA0000000 + i))
    c.region_read(0, 0x14, 4)  # COUNTER's read hook keeps device state
    c.region_write(1, 4, b"io-state")
    c.region_write(2, 16 * 3, struct.pack("<IIII", 0xFEE00000, 0, 0x4023, 0))
    c.region_write(CFG, 0x60 + 2, struct.pack("<H", 0xC000))  # MSI-X on, function masked
    c.region_write(0, 0x10, struct.pack("<I", 3))  # DOORBELL: vector 3 -> PBA bit 3


def read_everything(c: Client) -> list[bytes]:
    out = [c.region_read(CFG, off, 4) for off in range(0, 4096, 4)]
    out += [c.region_read(0, off, 4) for off in range(0, 0x1000, 4)]
    out += [c.region_read(1, off, 4) for off in range(0, 32, 4)]
    out += [c.region_read(2, off, 8) for off in range(0, 0x4000, 64)]
    out.append(c.region_read(PciRegion.ROM, 0, 2048))
    return out


def test_state_moves_to_a_fresh_process_through_migration_messages(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = servers
    with a.client() as src, b.client() as dst:
        fresh = read_everything(dst)
        make_busy(src)
        assert src.region_read(2, 0x2000, 1) == b"\x08"  # pending before the move
        src.set_mig_state(MigState.STOP_COPY)
        blob = bytearray()
        while chunk := src.mig_data_read(4096):
            blob += chunk
        assert src.set_mig_state(MigState.RUNNING) is MigState.RUNNING
        dst.set_mig_state(MigState.RESUMING)
        dst.mig_data_write(bytes(blob))
        assert dst.set_mig_state(MigState.RUNNING) is MigState.RUNNING
        # both start from the same state, so even read side effects (RC, hooks) match
        expected = read_everything(src)
        got = read_everything(dst)
        assert got == expected
        assert got != fresh


def test_hostile_stream_puts_the_server_in_error_not_down(
        servers: tuple[ServerProcess, ServerProcess]) -> None:
    _, b = servers
    with b.client() as c:
        c.set_mig_state(MigState.RESUMING)
        c.mig_data_write(b"XDEVPCI\0\x01\x00\xff\xff" + os.urandom(64))
        with pytest.raises(RemoteError):
            c.set_mig_state(MigState.STOP)
        assert c.mig_state() is MigState.ERROR
        c.reset()
        assert c.mig_state() is MigState.RUNNING
        assert c.region_read(CFG, 0, 4) == bytes.fromhex("361b1100")


def test_dma_and_msix_through_the_runtime(servers: tuple[ServerProcess, ServerProcess]) -> None:
    a, _ = servers
    with MemfdRam(1 << 16) as ram, a.client(guest=ram) as c:
        c.dma_map(0, 1 << 16, fd=ram.fd)
        efd = os.eventfd(0)
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.ACTION_TRIGGER, 0, fds=[efd])
        c.region_write(CFG, 0x60 + 2, struct.pack("<H", 0x8000))
        c.region_write(2, 12, struct.pack("<I", 0))  # unmask entry 0
        ram.write(0x1000, b"payload!")
        c.region_write(0, 0x18, struct.pack("<Q", 0x1000))
        c.region_write(0, 0x20, struct.pack("<I", 8))
        c.region_write(0, 0x04, struct.pack("<I", 1))  # GO: worker copies, raises vector 0
        ready, _, _ = select.select([efd], [], [], 20)  # the completion's interrupt
        assert ready, "no MSI-X interrupt after the DMA"
        assert os.eventfd_read(efd) == 1
        assert ram.read(0x1008, 8) == b"payload!"
        assert c.region_read(0, 0x08, 4) == struct.pack("<I", 1)  # STATUS: done
        os.close(efd)
