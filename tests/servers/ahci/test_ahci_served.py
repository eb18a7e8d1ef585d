"""xdev-ahci as a daemon: CLI parsing, and a vfio-user client over a real UNIX
socket driving the controller with memfd guest RAM (including a SIGKILL in the
middle of a write stream)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ahci_driver import DATA_BASE, RAM_SIZE, TFES, AhciDriver, h2d
from ahci_phase import pattern

from servers.ahci import cli
from servers.ahci.disk import SECTOR
from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags

REPO = Path(__file__).resolve().parents[3]
SECTORS = 2048


def test_config_is_frozen_and_ordered() -> None:
    c = cli.parse(["--socket", "/tmp/x.sock",
                   "--cdrom", "file=/a.iso", "--disk", "file=/b,,c.img,readonly=on,"
                   "cache=writethrough,serial=SN1,model=M",
                   "--ports", "4"])
    assert [d.kind for d in c.drives] == ["cdrom", "disk"] and c.ports == 4
    disk = c.drives[1]
    assert disk.path == "/b,c.img" and disk.readonly and not disk.writeback
    assert disk.identity.serial == "SN1" and disk.identity.model == "M"
    assert c.drives[0].readonly
    with pytest.raises(AttributeError):
        c.ports = 1  # type: ignore[misc]
    assert cli.parse(["--cdrom", "/x.iso"]).drives[0].path == "/x.iso"
    assert cli.parse([]).ports == 1
    assert cli.parse([]).engine == "native"


@pytest.mark.parametrize("argv", [
    ["--disk", "readonly=on"], ["--disk", "file=a,cache=bogus"], ["--disk", "file=a,foo=1"],
    ["--disk", "file=a,readonly=maybe"], ["--disk", "file=a,file=b"],
    ["--ports", "7"], ["--ports", "1", "--disk", "file=a", "--cdrom", "b"],
    ["--disk", "file=a,serial=\u00e9"],
])
def test_bad_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse(argv)
    assert e.value.code == 2


def test_help() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_missing_image_exits_2(tmp_path: Path) -> None:
    assert cli.main(["--socket", str(tmp_path / "s"), "--disk", f"file={tmp_path}/nope"]) == 2


def test_build_pads_empty_ports(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(SECTOR * 8))
    dev = cli.build(cli.parse(["--disk", f"file={img}", "--ports", "3"]))
    try:
        assert len(dev.ports) == 3 and dev.ports[2].drive is None
        drive = dev.ports[0].drive
        assert drive is not None and drive.disk is not None and drive.disk.write_cache
    finally:
        dev.close()


class ClientDriver(AhciDriver):
    """The test driver, talking vfio-user to a server process."""

    def __init__(self, client: Client, ram: MemfdRam) -> None:
        self.c = client
        self.ram = ram
        client.dma_map(0, RAM_SIZE, fd=ram.fd)
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        client.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[self.irq_fd])

    def rd(self, off: int) -> int:
        return int.from_bytes(self.c.region_read(PciRegion.BAR5, off, 4), "little")

    def wr(self, off: int, value: int) -> None:
        self.c.region_write(PciRegion.BAR5, off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def cfg(self, off: int, n: int = 4) -> int:
        return int.from_bytes(self.c.region_read(PciRegion.CONFIG, off, n), "little")


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp_path / "ahci.sock"
    proc = subprocess.Popen([sys.executable, "-m", "servers.ahci", "--socket", str(sock), *args],
                            stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read() if proc.stderr else b""
            proc.kill()
            raise AssertionError(f"server did not start: {err!r}")
        time.sleep(0.05)
    return proc, sock


def test_daemon_serves_a_disk_over_the_socket(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(pattern(0, SECTORS))
    proc, sock = start(tmp_path, "--disk", f"file={img},serial=SOCKET1")
    try:
        with MemfdRam(RAM_SIZE) as ram, Client.connect(str(sock), guest=ram) as c:
            d = ClientDriver(c, ram)
            assert d.cfg(0) == 0x2922_8086
            d.hba_reset()
            d.port_start(0)
            pis, ident = d.run(0, h2d(0xEC), 512)
            assert not pis & TFES and b"OSKCTE 1" in ident[20:40]
            assert d.irq_count() >= 1
            data = os.urandom(16 * SECTOR)
            pis, _ = d.run(0, h2d(0x35, lba=SECTORS - 16, count=16), data=data)
            assert not pis & TFES
            pis, back = d.run(0, h2d(0x25, lba=SECTORS - 16, count=16), 16 * SECTOR)
            assert back == data
            pis, first = d.run(0, h2d(0x25, lba=0, count=4), 4 * SECTOR, chunk=512)
            assert first == pattern(0, 4)
            os.close(d.irq_fd)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode == 0
    assert img.read_bytes()[-16 * SECTOR:] == data


def test_sigkill_keeps_everything_flushed(tmp_path: Path) -> None:
    """Writes acknowledged before the last completed FLUSH survive a SIGKILL."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(SECTORS * SECTOR))
    proc, sock = start(tmp_path, "--disk", f"file={img}")
    flushed: dict[int, bytes] = {}
    acked: dict[int, bytes] = {}
    try:
        with MemfdRam(RAM_SIZE) as ram, Client.connect(str(sock), guest=ram) as c:
            d = ClientDriver(c, ram)
            d.hba_reset()
            d.port_start(0)
            for i in range(64):
                block = os.urandom(8 * SECTOR)
                pis, _ = d.run(0, h2d(0x35, lba=i * 8, count=8), data=block)
                assert not pis & TFES
                acked[i] = block
                if i % 16 == 15:
                    assert not d.run(0, h2d(0xEA))[0] & TFES
                    flushed = dict(acked)
            # a burst that is never waited for, then the kill
            ram.write(DATA_BASE, os.urandom(8 * SECTOR))
            d.build(0, 0, h2d(0x35, lba=1024, count=8), [(DATA_BASE, 8 * SECTOR, False)],
                    write=True)
            d.issue(0, 1)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            os.close(d.irq_fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    content = img.read_bytes()
    assert len(flushed) == 64
    for i, block in flushed.items():
        assert content[i * 8 * SECTOR:(i + 1) * 8 * SECTOR] == block, i


class DirectRam:
    """The server's own view of the guest's memory (as a Xen foreign mapping
    is): what an accepted xdev guest-memory offer gives the session."""

    def __init__(self, ram: MemfdRam) -> None:
        self.ram = ram
        self.file_calls = 0

    def read(self, addr: int, length: int) -> bytes:
        return self.ram.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.ram.write(addr, data)

    def file_io(self, fd: int, ranges, offset: int, to_guest: bool,  # type: ignore[no-untyped-def]
                flags: int = 0) -> int:
        self.file_calls += 1
        views = [self.ram.view[a:a + n] for a, n in ranges]
        try:
            return (os.preadv if to_guest else os.pwritev)(fd, views, offset, flags)
        finally:
            for v in views:
                v.release()


class MessageDriver(ClientDriver):
    """Guest memory mapped without an fd: the server reaches it by messages,
    or directly when it accepted the guest-memory offer."""

    def __init__(self, client: Client, ram: MemfdRam) -> None:
        self.c = client
        self.ram = ram
        client.dma_map(0, RAM_SIZE)
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        client.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[self.irq_fd])


def test_disk_data_moves_through_the_servers_own_guest_mapping(tmp_path: Path) -> None:
    """With direct guest memory, READ/WRITE DMA data goes between the image
    and the guest in file_io calls, not DMA messages nor per-entry copies."""
    import threading

    from xdevproto.server import Server
    from xdevproto.transport import listen

    img = tmp_path / "disk.img"
    img.write_bytes(pattern(0, SECTORS))
    dev = cli.build(cli.parse(["--disk", f"file={img}"]))
    with MemfdRam(RAM_SIZE) as ram:
        direct = DirectRam(ram)
        server = Server(dev, guest_mappers={"shared-test": lambda _: direct})
        lst = listen(str(tmp_path / "a.sock"))
        t = threading.Thread(target=server.serve, args=(lst,), daemon=True)
        t.start()
        try:
            with Client.connect(str(tmp_path / "a.sock"), guest=ram,
                                guest_memory_offer={"kind": "shared-test"}) as c:
                assert c.direct_memory
                d = MessageDriver(c, ram)
                d.hba_reset()
                d.port_start(0)
                data = os.urandom(64 * SECTOR)
                pis, _ = d.run(0, h2d(0x35, lba=100, count=64), data=data, chunk=4096)
                assert not pis & TFES
                calls = direct.file_calls
                pis, back = d.run(0, h2d(0x25, lba=100, count=64), 64 * SECTOR, chunk=4096)
                assert not pis & TFES and back == data
                assert calls >= 1 and direct.file_calls > calls
                os.close(d.irq_fd)
        finally:
            server.stop()
            t.join(5)
            lst.close()
            dev.close()
    assert img.read_bytes()[100 * SECTOR:164 * SECTOR] == data
