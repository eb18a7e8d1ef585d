"""xdev's TestDevice served by libvfio-user through the engine sketch.

Needs libvfio-user (skipped with the loader's reason where absent).
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdevproto.client import Client
from xdevproto.guestmem import MemfdRam
from xdevproto.lvu.loader import unavailable_reason
from xdevproto.testdev import BAR0_SIZE, BAR2_SIZE, ID_VALUE, TestDevice
from xdevproto.wire import IrqIndex, PciRegion, RegionFlags, SetIrqsFlags

pytestmark = pytest.mark.lvu

_reason = unavailable_reason()
if _reason is not None:
    pytest.skip(f"libvfio-user unavailable: {_reason}", allow_module_level=True)

from xdevproto.lvu.engine import LvuEngine  # noqa: E402  (loads only where present)

BUF = 0x100


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestDevice, str]]:
    device = TestDevice()
    path = str(tmp_path / "engine.sock")
    engine = LvuEngine(device, path)
    thread = threading.Thread(target=engine.serve, daemon=True)
    thread.start()
    yield device, path
    engine.stop()
    thread.join(10)
    assert not thread.is_alive(), "engine loop did not stop"
    engine.close()


def test_regions_and_config_come_from_the_device(served: tuple[TestDevice, str]) -> None:
    device, path = served
    with Client.connect(path) as c:
        assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)
        c.region_write(PciRegion.BAR0, 4, b"abcd")
        assert device.regs[4:8] == b"abcd"
        assert c.region_read(PciRegion.CONFIG, 0, 4) == struct.pack("<HH", 0x1B36, 0x0005)
        assert c.region_info(PciRegion.BAR0).size == BAR0_SIZE
        bar2 = c.region_info(PciRegion.BAR2)
        assert bar2.size == BAR2_SIZE and bar2.flags & RegionFlags.MMAP
        assert [(a.offset, a.size) for a in bar2.sparse_areas] == [(0, BAR2_SIZE // 2)]
        assert bar2.fd is not None
        os.close(bar2.fd)


def test_message_dma_from_a_worker_thread_and_an_interrupt(
        served: tuple[TestDevice, str]) -> None:
    _, path = served
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    with MemfdRam(0x1000, base=0x40000) as ram, Client.connect(path, guest=ram) as c:
        c.start_dma_service()
        c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[efd])
        c.dma_map(0x40000, 0x1000)  # no fd: DMA_READ/DMA_WRITE messages
        ram.write(0x40000, b"from guest memory")
        # DMA_CMD 3: guest -> buffer -> guest from a worker thread, then IRQ 0
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x40000, 17))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 3))
        assert select.select([efd], [], [], 10)[0] == [efd]
        assert c.region_read(PciRegion.BAR0, 0x18, 4) == b"\0\0\0\0"
        assert c.region_read(PciRegion.BAR0, BUF, 17) == b"from guest memory"
        # DMA_CMD 2: buffer -> guest, inside the region write (on the loop thread)
        c.region_write(PciRegion.BAR0, BUF, b"from the device!!")
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 2))
        assert ram.read(0x40000, 17) == b"from the device!!"
    os.close(efd)


def test_a_second_client_after_the_first_left(served: tuple[TestDevice, str]) -> None:
    device, path = served
    for n in range(2):
        with Client.connect(path) as c:
            c.region_write(PciRegion.BAR0, 4, bytes([n]) * 4)
    assert device.regs[4:8] == b"\x01" * 4


def test_fd_dma_is_direct_and_dirty_logging_is_the_librarys(
        served: tuple[TestDevice, str]) -> None:
    _, path = served
    with MemfdRam(0x4000, base=0x40000) as ram, Client.connect(path, guest=ram) as c:
        c.dma_map(0x40000, 0x4000, fd=ram.fd)
        c.dma_logging_start(4096, [(0x40000, 0x4000)])
        c.region_write(PciRegion.BAR0, BUF, b"dirty page two")
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x42010, 14))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 2))
        assert c.region_read(PciRegion.BAR0, 0x18, 4) == b"\0\0\0\0"
        assert ram.read(0x42010, 14) == b"dirty page two"
        # only the direct (memcpy) path marks pages: this proves DMA did not go
        # through DMA_WRITE messages; a report clears what it reported
        assert c.dma_logging_report(0x40000, 0x4000)[0] & 0xF == 0b0100
        assert c.dma_logging_report(0x40000, 0x4000)[0] & 0xF == 0
        c.dma_logging_stop()


def test_set_irqs_mask_reaches_the_device_per_vector(served: tuple[TestDevice, str]) -> None:
    device, path = served
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(8)]
    with Client.connect(path) as c:
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.ACTION_TRIGGER, fds=fds)
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.ACTION_MASK, 2, count=1)
        assert list(device.irq_masked[IrqIndex.MSIX]) == [0, 0, 1, 0, 0, 0, 0, 0]
        for vector in (2, 3):  # TestDevice's IRQ register raises a vector
            c.region_write(PciRegion.BAR0, 0x1C, struct.pack("<I", vector))
        assert select.select(fds, [], [], 10)[0] == [fds[3]]
        assert select.select([fds[2]], [], [], 0.2)[0] == []
        c.set_irqs(IrqIndex.MSIX, SetIrqsFlags.ACTION_UNMASK, 2, count=1)
        assert list(device.irq_masked[IrqIndex.MSIX]) == [0] * 8
        c.region_write(PciRegion.BAR0, 0x1C, struct.pack("<I", 2))
        assert select.select([fds[2]], [], [], 10)[0] == [fds[2]]
    for fd in fds:
        os.close(fd)


def test_reset_and_migration_reach_the_device(served: tuple[TestDevice, str]) -> None:
    device, path = served
    with Client.connect(path) as c:
        c.region_write(PciRegion.BAR0, 4, b"keep")
        saved = c.save_device()
        c.region_write(PciRegion.BAR0, 4, b"lost")
        c.load_device(saved)
        assert c.region_read(PciRegion.BAR0, 4, 4) == b"keep"
        before = device.resets
        c.reset()
        assert device.resets == before + 1
        assert c.region_read(PciRegion.BAR0, 4, 4) == b"\0\0\0\0"


class LockedDevice(TestDevice):
    """A device that does message DMA while holding the lock its register
    writes take (as the e1000 model does when a frame arrives)."""

    def __init__(self) -> None:
        super().__init__()
        self.model_lock = threading.Lock()
        self.holding = threading.Event()
        self.got: bytes | None = None

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.BAR0 and offset == 0x40:
            with self.model_lock:  # the loop thread waits here for the worker
                return
        super().region_write(index, offset, data)

    def receive_from_worker(self, iova: int, length: int) -> None:
        with self.model_lock:
            self.holding.set()
            time.sleep(0.3)  # long enough for the register write to block on the lock
            assert self.ctx is not None
            self.got = self.ctx.dma_read(iova, length)


def test_worker_dma_under_the_device_lock_does_not_deadlock_a_register_write(
        tmp_path: Path) -> None:
    device = LockedDevice()
    path = str(tmp_path / "engine.sock")
    engine = LvuEngine(device, path)
    loop = threading.Thread(target=engine.serve, daemon=True)
    loop.start()
    try:
        with MemfdRam(0x1000, base=0x40000) as ram, Client.connect(path, guest=ram) as c:
            c.dma_map(0x40000, 0x1000)  # no fd: DMA_READ messages
            ram.write(0x40000, b"frame payload")
            worker = threading.Thread(target=device.receive_from_worker,
                                      args=(0x40000, 13), daemon=True)
            worker.start()
            assert device.holding.wait(10)
            writer = threading.Thread(
                target=c.region_write, args=(PciRegion.BAR0, 0x40, b"\1\0\0\0"), daemon=True)
            writer.start()
            writer.join(20)
            worker.join(20)
            assert not writer.is_alive() and not worker.is_alive(), "deadlocked"
            assert device.got == b"frame payload"
            # and the engine keeps serving
            assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)
    finally:
        engine.stop()
        loop.join(10)
        if not loop.is_alive():
            engine.close()
