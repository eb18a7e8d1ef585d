"""The bridge core against the test device over real sockets, with a fake
front end standing in for Xen."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path

import pytest

from bridge.core import Bridge, BridgeDevice, parse_bdf
from xdevproto.guestmem import MemfdRam
from xdevproto.server import Server
from xdevproto.testdev import ID_VALUE, TestDevice
from xdevproto.transport import listen
from xdevproto.wire import IrqIndex

SBDF = parse_bdf("00:05.0")


class FakeFrontend:
    def __init__(self) -> None:
        self.claims: set[tuple[bool, int, int]] = set()
        self.intx: list[tuple[int, int, int]] = []
        self.msis: list[tuple[int, int]] = []
        self.event = threading.Event()

    def claim_range(self, mmio: bool, start: int, end: int) -> None:
        self.claims.add((mmio, start, end))

    def release_range(self, mmio: bool, start: int, end: int) -> None:
        self.claims.remove((mmio, start, end))

    def set_intx(self, sbdf: int, pin: int, level: int) -> None:
        self.intx.append((sbdf, pin, level))
        self.event.set()

    def inject_msi(self, addr: int, data: int) -> None:
        self.msis.append((addr, data))
        self.event.set()


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


class ServedDevice:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.device = TestDevice()
        # An MSI capability (64-bit, per-vector masking) at 0x40 and pin A.
        cfg = self.device.config
        cfg[0x34] = 0x40
        cfg[0x3D] = 1
        cfg[0x40:0x42] = bytes([0x05, 0x00])
        struct.pack_into("<H", cfg, 0x42, 0x0180 | (2 << 1))
        self.start()

    def start(self) -> None:
        self.server = Server(self.device)
        self.listener = listen(str(self.path))
        self.thread = threading.Thread(target=self.server.serve, args=(self.listener,),
                                       daemon=True)
        self.thread.start()

    def kill(self) -> None:
        self.server.stop()
        session = self.server.session
        if session is not None:
            session.transport.sock.shutdown(2)
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def rig(tmp_path):
    served = ServedDevice(tmp_path / "dev.sock")
    front = FakeFrontend()
    ram = MemfdRam(1 << 20)
    bridge = Bridge(front)
    dev = BridgeDevice(SBDF, str(served.path), front, ram, dma_ranges=[(0, 1 << 20)])
    bridge.add(dev)
    bridge.start()
    yield bridge, dev, front, served, ram
    bridge.stop()
    served.kill()
    ram.close()


def test_bar_sizing_claims_and_forwarding(rig) -> None:
    bridge, dev, front, served, _ = rig
    assert bridge.config_read(SBDF, 0, 4) == 0x0005_1B36
    bridge.config_write(SBDF, 0x10, 4, 0xFFFFFFFF)
    assert bridge.config_read(SBDF, 0x10, 4) == 0xFFFFF000  # 4 KiB, mem32
    bridge.config_write(SBDF, 0x18, 4, 0xFFFFFFFF)
    assert bridge.config_read(SBDF, 0x18, 4) == 0xFFFF0000  # 64 KiB
    assert bridge.config_read(SBDF, 0x14, 4) == 0  # absent BAR1
    bridge.config_write(SBDF, 0x10, 4, 0xE000_0000)
    assert not front.claims  # memory decoding still off
    bridge.config_write(SBDF, 0x04, 2, 0x0002)
    assert front.claims == {(True, 0xE000_0000, 0xE000_0FFF)}
    assert bridge.mmio_read(0xE000_0000, 4) == ID_VALUE
    bridge.mmio_write(0xE000_0004, 4, 0x12345678)
    assert bridge.mmio_read(0xE000_0004, 4) == 0x12345678
    assert bridge.mmio_read(0xE000_2000, 4) == 0xFFFFFFFF  # not ours
    # Moving the BAR moves the claim.
    bridge.config_write(SBDF, 0x10, 4, 0xE010_0000)
    assert front.claims == {(True, 0xE010_0000, 0xE010_0FFF)}
    assert bridge.mmio_read(0xE010_0004, 4) == 0x12345678
    bridge.config_write(SBDF, 0x04, 2, 0)
    assert not front.claims
    assert bridge.config_read(parse_bdf("00:06.0"), 0, 4) == 0xFFFFFFFF


def test_memory_writes_are_posted_config_writes_wait(rig) -> None:
    """A guest's MMIO write completes before the server has handled it
    (posted, as on PCI); a config write waits for the server's answer."""
    bridge, dev, front, served, _ = rig
    bridge.config_write(SBDF, 0x10, 4, 0xE000_0000)
    bridge.config_write(SBDF, 0x04, 2, 0x0002)
    handled = served.device.region_write
    gates: list[threading.Event] = []

    def held(index: int, offset: int, data: bytes) -> None:
        gate = threading.Event()
        gates.append(gate)
        gate.wait(10)
        handled(index, offset, data)

    def in_thread(fn) -> threading.Event:
        done = threading.Event()
        threading.Thread(target=lambda: (fn(), done.set()), daemon=True).start()
        return done

    served.device.region_write = held  # type: ignore[method-assign]
    try:
        done = in_thread(lambda: bridge.mmio_write(0xE000_0004, 4, 0xCAFE))
        wait_for(lambda: gates and done.is_set())  # answered while the server holds it
        gates.pop().set()
        done = in_thread(lambda: bridge.config_write(SBDF, 0x0C, 1, 0x10))
        wait_for(lambda: gates)  # the server has it and holds it ...
        time.sleep(0.2)
        assert not done.is_set()  # ... and the guest's access waits
        gates.pop().set()
        wait_for(done.is_set)
    finally:
        for gate in gates:
            gate.set()
        served.device.region_write = handled  # type: ignore[method-assign]
    # The read is served after the posted write took effect.
    assert bridge.mmio_read(0xE000_0004, 4) == 0xCAFE


def test_msi_delivered_with_guest_address_and_masks(rig) -> None:
    bridge, dev, front, served, _ = rig
    bridge.config_write(SBDF, 0x44, 4, 0xFEE0_0000)
    bridge.config_write(SBDF, 0x48, 4, 0)
    bridge.config_write(SBDF, 0x4C, 2, 0x4041)
    bridge.config_write(SBDF, 0x42, 2, 0x0001 | (2 << 4))  # enable, 4 vectors
    bridge.config_write(SBDF, 0x10, 4, 0xE000_0000)
    bridge.config_write(SBDF, 0x04, 2, 0x0002)
    served.device._signal(IrqIndex.MSI, 2)  # the device raises vector 2
    wait_for(lambda: front.msis)
    assert front.msis == [(0xFEE0_0000, 0x4042)]
    bridge.config_write(SBDF, 0x50, 4, 1 << 1)  # mask vector 1
    served.device._signal(IrqIndex.MSI, 1)
    time.sleep(0.2)
    assert len(front.msis) == 1 and dev.msi.pending == 1 << 1
    bridge.config_write(SBDF, 0x50, 4, 0)  # unmask: the pending one goes out
    assert front.msis[-1] == (0xFEE0_0000, 0x4041)


def test_intx_level_and_eoi_on_bar_access(rig) -> None:
    bridge, dev, front, served, _ = rig
    bridge.config_write(SBDF, 0x10, 4, 0xE000_0000)
    bridge.config_write(SBDF, 0x04, 2, 0x0002)
    served.device._signal(IrqIndex.INTX, 0)
    wait_for(lambda: front.intx)
    assert front.intx == [(SBDF, 0, 1)]
    bridge.mmio_read(0xE000_0000, 4)  # the guest's handler touches the device
    assert front.intx[-1] == (SBDF, 0, 0)


def test_server_death_lowers_the_asserted_intx_line(rig) -> None:
    """A dead server must not leave INTA# high: the guest would take the
    level-triggered interrupt forever (seen: soft lockup in a Xen guest)."""
    bridge, dev, front, served, _ = rig
    bridge.config_write(SBDF, 0x10, 4, 0xE000_0000)
    bridge.config_write(SBDF, 0x04, 2, 0x0002)
    served.device._signal(IrqIndex.INTX, 0)
    wait_for(lambda: front.intx)
    assert front.intx == [(SBDF, 0, 1)]
    served.kill()
    wait_for(lambda: bridge.config_read(SBDF, 0x2C, 4) is not None and not dev.alive)
    assert front.intx[-1] == (SBDF, 0, 0)


def test_server_death_and_return(rig) -> None:
    bridge, dev, front, served, ram = rig
    bridge.config_write(SBDF, 0x10, 4, 0xE000_0000)
    bridge.config_write(SBDF, 0x04, 2, 0x0002)
    bridge.mmio_write(0xE000_0004, 4, 0xCAFE)
    served.kill()
    # The guest keeps running: reads are all-ones, writes are dropped.
    wait_for(lambda: bridge.mmio_read(0xE000_0004, 4) == 0xFFFFFFFF)
    bridge.mmio_write(0xE000_0004, 4, 0xBEEF)
    assert not dev.alive
    served.start()  # same device state, a new server process would reset it
    wait_for(lambda: dev.alive)
    assert bridge.mmio_read(0xE000_0004, 4) == 0xCAFE
    # DMA and interrupts are re-established.
    ram.write(0x100, b"again!!!")
    bridge.mmio_write(0xE000_0008, 4, 0x100)
    bridge.mmio_write(0xE000_0010, 4, 8)
    bridge.mmio_write(0xE000_0014, 4, 1)
    assert bridge.mmio_read(0xE000_0018, 4) == 0
    assert bytes(served.device.regs[0x100:0x108]) == b"again!!!"
    served.device._signal(IrqIndex.INTX, 0)
    wait_for(lambda: front.intx and front.intx[-1][2] == 1)


class FailingMapping:
    """A server's own mapping of guest RAM whose invalidation fails."""

    def __init__(self, ram: MemfdRam) -> None:
        self.ram = ram
        self.fail = True
        self.invalidations = 0

    def read(self, addr: int, length: int) -> bytes:
        return self.ram.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.ram.write(addr, data)

    def invalidate(self) -> None:
        self.invalidations += 1
        if self.fail:
            raise OSError("cannot unmap")

    def close(self) -> None:
        pass


def test_server_that_cannot_drop_its_guest_mappings_is_cut_off(tmp_path) -> None:
    """An invalidation the server does not carry out would leave it writing
    frames the guest no longer owns: the bridge ends that session (which
    closes the server's mappings) and reconnects as for a dead server."""
    ram = MemfdRam(1 << 20)
    mapping = FailingMapping(ram)
    device = TestDevice()
    server = Server(device, guest_mappers={"test": lambda _p: mapping})
    listener = listen(str(tmp_path / "d.sock"))
    sthread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    sthread.start()
    front = FakeFrontend()
    bridge = Bridge(front)
    dev = BridgeDevice(SBDF, str(tmp_path / "d.sock"), front, ram,
                       dma_ranges=[(0, 1 << 20)], guest_memory_offer={"kind": "test"})
    bridge.add(dev)
    bridge.start()
    try:
        assert dev.client is not None and dev.client.direct_memory
        first = dev.client
        bridge.invalidate()
        assert mapping.invalidations == 1 and not dev.alive
        mapping.fail = False
        wait_for(lambda: dev.alive)
        assert dev.client is not first and dev.client.direct_memory
        bridge.invalidate()
        assert mapping.invalidations == 2 and dev.client is not None
    finally:
        bridge.stop()
        server.stop()
        sthread.join(5)
        listener.close()
        ram.close()
