"""``--engine libvfio-user`` on the device daemons (xdev-e1000, xdev-ahci).

The option parsing and the missing-library message are checked everywhere;
the served tests need libvfio-user (skipped with the loader's reason).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from servers.e1000 import cli as e1000_cli
from servers.e1000 import regs as R
from xdevproto.client import Client
from xdevproto.errors import ConnectionClosed
from xdevproto.guestmem import MemfdRam
from xdevproto.lvu.loader import unavailable_reason
from xdevproto.wire import IrqIndex, MigState, PciRegion, SetIrqsFlags

REPO = Path(__file__).resolve().parents[3]
# the device tests' drivers (plain modules, not packages)
sys.path[:0] = [str(REPO / "tests/servers/e1000"), str(REPO / "tests/servers/ahci")]

from ahci_driver import RAM_SIZE, TFES, AhciDriver, h2d  # noqa: E402
from e1000_driver import MAC, PEER, padded, tcp_frame  # noqa: E402

_reason = unavailable_reason()
needs_lvu = pytest.mark.skipif(_reason is not None,
                               reason=f"libvfio-user unavailable: {_reason}")
LVU = ["--engine", "libvfio-user"]


def test_engine_option_defaults_to_native_and_is_checked() -> None:
    assert e1000_cli.parse([]).engine == "native"
    with pytest.raises(SystemExit) as e:
        e1000_cli.parse(["--engine", "qemu"])
    assert e.value.code == 2


def test_a_missing_library_is_refused_before_anything_opens(tmp_path: Path) -> None:
    env = dict(os.environ, XDEV_LVU_LIBRARY=str(tmp_path / "libvfio-user.so.0"))
    sock = tmp_path / "s.sock"
    proc = subprocess.run([sys.executable, "-m", "servers.e1000.cli", "--socket", str(sock),
                           *LVU], cwd=REPO, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "--engine" in err and "cannot load" in err and "XDEV_LVU_LIBRARY" in err
    assert not sock.exists()


# -- served on libvfio-user ------------------------------------------------------------

def _wait_ready(proc: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read() if proc.stderr else b""
            proc.kill()
            raise AssertionError(f"server did not start: {err!r}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            return  # probe leaves: the engine sees a client come and go
        except OSError:
            time.sleep(0.05)


@contextmanager
def daemon(module: str, tmp_path: Path, *args: str,
           fd: bool = False) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run ``python -m module ... --engine libvfio-user`` on --socket or --fd."""
    path = tmp_path / "dev.sock"
    listener: socket.socket | None = None
    where = ["--socket", str(path)]
    if fd:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(4)
        where = ["--fd", str(listener.fileno())]
    proc = subprocess.Popen([sys.executable, "-m", module, *where, *LVU, *args], cwd=REPO,
                            stderr=subprocess.PIPE,
                            pass_fds=[listener.fileno()] if listener else [])
    try:
        _wait_ready(proc, path)
        yield proc, path
    finally:
        if listener is not None:
            listener.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            print(proc.stderr.read().decode(errors="replace"))  # shown when a test fails


def _rd(c: Client, off: int) -> int:
    return int.from_bytes(c.region_read(PciRegion.BAR0, off, 4), "little")


def _wr(c: Client, off: int, value: int) -> None:
    c.region_write(PciRegion.BAR0, off, value.to_bytes(4, "little"))


@needs_lvu
def test_e1000_tx_rx_interrupts_reset_and_migration_on_an_inherited_fd(
        tmp_path: Path) -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10)
    netdev = f"dgram,local=127.0.0.1:0,remote=127.0.0.1:{peer.getsockname()[1]}"
    with daemon("servers.e1000.cli", tmp_path, "--mac", MAC.hex(":"), "--netdev", netdev,
                fd=True) as (proc, path), \
            MemfdRam(1 << 20) as ram, Client.connect(str(path), guest=ram) as c:
        assert struct.unpack("<HH", c.region_read(PciRegion.CONFIG, 0, 4)) == (0x8086, 0x100E)
        c.dma_map(0, 1 << 20, fd=ram.fd)  # the library memcpys guest memory itself
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[efd])
        frame = tcp_frame(b"through libvfio-user" * 8)
        ram.write(0x8000, frame)
        ram.write(0x1000, struct.pack("<QHBBBBH", 0x8000, len(frame), 0, 0x0B, 0, 0, 0))
        _wr(c, R.TDBAL, 0x1000)
        _wr(c, R.TDLEN, 128)
        _wr(c, R.TCTL, R.TCTL_EN)
        _wr(c, R.IMS, R.ICR_TXDW | R.ICR_RXT0)
        _wr(c, R.TDT, 1)
        data, server_addr = peer.recvfrom(4096)
        assert data == frame
        assert ram.read(0x1000 + 12, 1)[0] & 1  # DD written back through the library
        assert select.select([efd], [], [], 5)[0] == [efd]
        os.eventfd_read(efd)
        assert _rd(c, R.ICR) & R.ICR_TXDW
        # INTx is automasked per edge: the UNMASK must reach the device through
        # the library's IRQ state callback, or the RX interrupt never comes
        c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_UNMASK, count=1)
        for i in range(8):
            ram.write(0x2000 + 16 * i, struct.pack("<QQ", 0x10000 + 2048 * i, 0))
        _wr(c, R.RDBAL, 0x2000)
        _wr(c, R.RDLEN, 128)
        _wr(c, R.RDT, 7)
        _wr(c, R.RCTL, R.RCTL_EN | R.RCTL_SECRC)  # CRC stripped: the length is the frame's
        incoming = tcp_frame(b"hello nic", dst=MAC, src=PEER)
        peer.sendto(incoming, server_addr)
        assert select.select([efd], [], [], 10)[0] == [efd], "no RX interrupt after UNMASK"
        length = struct.unpack("<H", ram.read(0x2000 + 8, 2))[0]
        assert ram.read(0x10000, length) == padded(incoming)
        # migration: state out and back in through the library's v2 data path
        assert c.migration_flags()
        saved = c.save_device()
        _wr(c, R.RDBAL, 0x5000)
        c.load_device(saved)
        assert _rd(c, R.RDBAL) == 0x2000
        c.reset()
        assert _rd(c, R.RDBAL) == 0 and _rd(c, R.RCTL) == 0
        assert c.mig_state() is MigState.RUNNING
        os.close(efd)
    peer.close()
    assert proc.returncode == 0


class _Driver(AhciDriver):
    def __init__(self, client: Client, ram: MemfdRam, *, fd: bool) -> None:
        self.c = client
        self.ram = ram
        client.dma_map(0, RAM_SIZE, fd=ram.fd if fd else None)
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        client.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[self.irq_fd])

    def rd(self, off: int) -> int:
        return int.from_bytes(self.c.region_read(PciRegion.BAR5, off, 4), "little")

    def wr(self, off: int, value: int) -> None:
        self.c.region_write(PciRegion.BAR5, off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def cfg(self, off: int, n: int = 4) -> int:
        return int.from_bytes(self.c.region_read(PciRegion.CONFIG, off, n), "little")


@needs_lvu
@pytest.mark.parametrize("fd_dma", [True, False], ids=["fd-dma", "message-dma"])
def test_ahci_reads_and_writes_a_disk(tmp_path: Path, fd_dma: bool) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(2048 * 512))
    with daemon("servers.ahci", tmp_path, "--disk", f"file={img},serial=LVU1") as (proc, path), \
            MemfdRam(RAM_SIZE) as ram, Client.connect(str(path), guest=ram) as c:
        if not fd_dma:
            c.start_dma_service()  # the device's DMA comes back as DMA_READ/DMA_WRITE
        d = _Driver(c, ram, fd=fd_dma)
        assert d.cfg(0) == 0x2922_8086
        d.hba_reset()
        d.port_start(0)
        pis, ident = d.run(0, h2d(0xEC), 512)
        assert not pis & TFES and b"VL1U" in ident[20:40]
        data = os.urandom(16 * 512)
        assert not d.run(0, h2d(0x35, lba=100, count=16), data=data)[0] & TFES
        pis, back = d.run(0, h2d(0x25, lba=100, count=16), 16 * 512)
        assert back == data and d.irq_count() >= 1
        os.close(d.irq_fd)
    assert proc.returncode == 0
    assert img.read_bytes()[100 * 512:116 * 512] == data


@needs_lvu
def test_allow_uid_cuts_off_other_clients(tmp_path: Path) -> None:
    other = os.getuid() + 4242
    with daemon("servers.e1000.cli", tmp_path, "--allow-uid", str(other)) as (_, path), \
            Client.connect(str(path)) as c, pytest.raises(ConnectionClosed):
        c.region_read(PciRegion.CONFIG, 0, 4)
    with daemon("servers.e1000.cli", tmp_path, "--allow-uid", str(os.getuid())) as (_, path), \
            Client.connect(str(path)) as c:
        assert c.region_read(PciRegion.CONFIG, 0, 2) == b"\x86\x80"


@needs_lvu
def test_a_tcp_listener_is_refused_clearly() -> None:
    proc = subprocess.run([sys.executable, "-m", "servers.e1000.cli", "--socket",
                           "tcp:127.0.0.1:0", *LVU], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"UNIX sockets only" in proc.stderr


@needs_lvu
def test_systemd_socket_activation(tmp_path: Path) -> None:
    """LISTEN_FDS/LISTEN_PID (sd_listen_fds(3)): the socket arrives as fd 3."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    fd = listener.fileno()

    def as_fd3() -> None:
        os.dup2(fd, 3)  # inheritable, as systemd passes it

    # exec keeps the shell's pid, so $$ is the server's pid
    script = f'LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m xdevproto.testdev ' \
             '--engine libvfio-user'
    proc = subprocess.Popen(["sh", "-c", script], cwd=REPO, preexec_fn=as_fd3, pass_fds=[3],
                            stderr=subprocess.PIPE)
    listener.close()
    try:
        _wait_ready(proc, path)
        with Client.connect(str(path)) as c:
            assert c.region_read(PciRegion.CONFIG, 0, 4) == struct.pack("<HH", 0x1B36, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
