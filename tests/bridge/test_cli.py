"""xdev-bridge end to end without a hypervisor: the real ioreq server on the
fake Xen of bridge.xen.fake, the real bridge core, and the test device
served over a UNIX socket."""

from __future__ import annotations

import contextlib
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.cli import Config, DeviceSpec, parse_args, run
from bridge.core import parse_bdf
from bridge.foreign import DmaMemory
from bridge.xen.abi import IoreqDir, IoreqState, IoreqType
from bridge.xen.fake import FakeXen
from bridge.xen.guestmem import GuestMemory
from xdevproto.server import Server
from xdevproto.testdev import ID_VALUE, TestDevice
from xdevproto.transport import listen
from xdevproto.wire import IrqIndex

BDF = "00:05.0"
SBDF = parse_bdf(BDF)
R, W = IoreqDir.READ, IoreqDir.WRITE


class FakeMonitor:
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[bytes, bytes] | None] = queue.Queue()

    def watch(self, path: bytes, token: bytes) -> None:
        self.events.put((path, token))  # a watch fires once when set

    def unwatch(self, path: bytes, token: bytes) -> None:
        pass

    def wait(self) -> Iterator[tuple[bytes, bytes]]:
        while (ev := self.events.get()) is not None:
            yield ev

    def close(self) -> None:
        self.events.put(None)


class FakeXenstore:
    def __init__(self, domid: int) -> None:
        self.data = {f"/local/domain/{domid}/name".encode(): b"guest",
                     f"/local/domain/{domid}/cpu/0/availability".encode(): b"online",
                     f"/local/domain/{domid}/cpu/1/availability".encode(): b"online"}
        self.domid = domid
        self.alive = True
        self.monitors: list[FakeMonitor] = []

    def read(self, path: bytes, default: bytes | None = None) -> bytes:
        return self.data.get(path, default if default is not None else b"")

    def write(self, path: bytes, value: bytes) -> None:
        self.data[path] = value

    def list(self, path: bytes) -> list[bytes]:
        prefix = path.rstrip(b"/") + b"/"
        return sorted({k[len(prefix):].split(b"/")[0] for k in self.data if k.startswith(prefix)})

    def delete(self, path: bytes) -> None:
        for key in [k for k in self.data if k == path or k.startswith(path + b"/")]:
            del self.data[key]

    def is_domain_introduced(self, domid: int) -> bool:
        return self.alive and domid == self.domid

    def monitor(self) -> FakeMonitor:
        m = FakeMonitor()
        self.monitors.append(m)
        return m


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


@contextlib.contextmanager
def bridge_rig(tmp_path: Path, mappers=None, *, device=None, attachers=None, servers=None,
               **cfg):
    """A device server, fake Xen and the bridge's run() in threads; yields
    (xen, xenstore, device, stop, bridge thread, run's result). Without
    ``device``, the test device with an MSI capability. ``mappers(xen)`` /
    ``attachers(xen)``: the server's xdev extensions; ``servers``: a list
    the server is appended to; ``cfg``: Config fields."""
    if device is None:
        device = TestDevice()
        cfg_space = device.config
        cfg_space[0x34] = 0x40
        cfg_space[0x3D] = 1
        cfg_space[0x40:0x42] = bytes([0x05, 0x00])
        struct.pack_into("<H", cfg_space, 0x42, 0x0080)
    xen = FakeXen(domid=7, vcpus=2)
    server = Server(device, guest_mappers=mappers(xen) if mappers else None,
                    ioreq_attachers=attachers(xen) if attachers else None)
    if servers is not None:
        servers.append(server)
    listener = listen(str(tmp_path / "dev.sock"))
    sthread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    sthread.start()
    xs = FakeXenstore(7)
    stop = threading.Event()
    config = Config("guest", (DeviceSpec(SBDF, BDF, str(tmp_path / "dev.sock")),), None, False,
                    "info", **cfg)
    result: list[int] = []
    bthread = threading.Thread(target=lambda: result.append(run(config, xen=xen, xs_client=xs,
                                                                stop=stop)), daemon=True)
    bthread.start()
    try:
        wait_for(lambda: any(s.enabled for s in xen.servers.values())
                 and xs.data.get(b"/local/domain/0/xdev/7/state") == b"running")
        yield xen, xs, device, stop, bthread, result
    finally:
        stop.set()
        bthread.join(5)
        server.stop()
        sthread.join(5)
        listener.close()


@pytest.fixture
def rig(tmp_path: Path):
    with bridge_rig(tmp_path) as parts:
        yield parts


def access(xen: FakeXen, typ: IoreqType, d: IoreqDir, addr: int, size: int,
           data: int = 0) -> int:
    sid = next(iter(xen.servers))
    xen.send(sid, 0, typ, d, addr, size, data=data)
    wait_for(lambda: xen.slot(sid, 0).state == IoreqState.IORESP_READY)
    return xen.slot(sid, 0).data


def cfg_addr(reg: int) -> int:
    return (SBDF << 32) | reg


def test_guest_accesses_reach_the_device(rig) -> None:
    xen, xs, device, stop, bthread, result = rig
    (srv,) = xen.servers.values()
    assert srv.pcidevs == {(0, 0, 5, 0)}
    assert xs.data[b"/local/domain/0/xdev/7/devices/0000-00-05-0/state"] == b"connected"
    assert access(xen, IoreqType.PCI_CONFIG, R, cfg_addr(0), 4) == 0x0005_1B36
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x10), 4, 0xFFFFFFFF)
    assert access(xen, IoreqType.PCI_CONFIG, R, cfg_addr(0x10), 4) == 0xFFFFF000
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x10), 4, 0xF000_0000)
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x04), 2, 0x0002)
    assert srv.ranges == {(True, 0xF000_0000, 0xF000_0FFF)}
    assert access(xen, IoreqType.COPY, R, 0xF000_0000, 4) == ID_VALUE
    access(xen, IoreqType.COPY, W, 0xF000_0004, 4, 0xABCD)
    assert access(xen, IoreqType.COPY, R, 0xF000_0004, 4) == 0xABCD
    # MSI with the address and data the guest programmed.
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x44), 4, 0xFEE0_1000)
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x48), 4, 0)  # 64-bit: high dword
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x4C), 2, 0x0031)
    access(xen, IoreqType.PCI_CONFIG, W, cfg_addr(0x42), 2, 0x0001)
    device._signal(IrqIndex.MSI, 0)
    wait_for(lambda: xen.msis)
    assert xen.msis == [(0xFEE0_1000, 0x0031)]


def guest_dies(xen: FakeXen, xs: FakeXenstore) -> None:
    """The guest is destroyed: Xen drops it and xenstored fires @releaseDomain."""
    xen.kill_domain()
    xs.alive = False
    for m in xs.monitors:
        m.events.put((b"@releaseDomain", b"xdev"))


def test_guest_death_stops_the_bridge(rig) -> None:
    xen, xs, device, stop, bthread, result = rig
    guest_dies(xen, xs)
    bthread.join(10)
    assert not bthread.is_alive() and result == [0]
    assert xs.data.get(b"/local/domain/0/xdev/7/state") == b"closed"


class WatchedMemory(DmaMemory):
    """A server's foreign mapping of the guest whose invalidate() waits for
    the test's go-ahead, so the test sees what happens meanwhile."""

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.closed = threading.Event()

    def invalidate(self) -> None:
        self.entered.set()
        assert self.go.wait(10)
        super().invalidate()

    def close(self) -> None:
        super().close()
        self.closed.set()


def test_invalidate_reaches_servers_that_map_the_guest_before_it_completes(
        tmp_path: Path) -> None:
    """The stale-mapping hazard: Xen tells only ioreq servers that the
    guest's memory map changed. The bridge must make a server that maps the
    guest itself drop its mappings before the INVALIDATE completes."""
    made: list[WatchedMemory] = []

    def mappers(xen: FakeXen):
        def xen_foreign(params):
            made.append(WatchedMemory(GuestMemory(xen, params["domid"])))
            return made[-1]
        return {"xen-foreign": xen_foreign}

    with bridge_rig(tmp_path, mappers) as (xen, xs, device, stop, bthread, result):
        (mem,) = made
        xen.ram[0x2000:0x2008] = b"in-guest"
        assert device.ctx.dma_read(0x2000, 8) == b"in-guest"  # no DMA_READ message
        assert mem.memory.mapped_buckets == 1
        sid = next(iter(xen.servers))
        xen.send(sid, 1, IoreqType.INVALIDATE, W, 0, 4, data=(1 << 64) - 1)
        assert mem.entered.wait(5)
        time.sleep(0.2)
        assert xen.slot(sid, 1).state != IoreqState.IORESP_READY  # still waiting on us
        mem.go.set()
        wait_for(lambda: xen.slot(sid, 1).state == IoreqState.IORESP_READY)
        assert mem.memory.mapped_buckets == 0 and mem.memory.invalidations == 1
        assert device.ctx.dma_read(0x2000, 8) == b"in-guest"  # maps afresh
        stop.set()
        bthread.join(5)
        assert mem.closed.wait(5)  # the session's end drops the mappings for good


def test_command_line() -> None:
    cfg = parse_args(["--domain", "g", "--device", "00:05.0=unix:/run/a.sock",
                      "--device", "0000:00:06.0=/run/b.sock"])
    assert [d.sbdf for d in cfg.devices] == [parse_bdf("00:05.0"), parse_bdf("00:06.0")]
    with pytest.raises(SystemExit):
        parse_args(["--domain", "g", "--device", "00:05.0"])
    with pytest.raises(SystemExit):
        parse_args(["--domain", "g", "--device", "00:05.0=a", "--device", "00:05.0=b"])
