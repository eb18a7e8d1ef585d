"""Interrupts observed on real eventfds: INTx, MSI, MSI-X, masks and pending bits."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pci_sample_device import SampleDevice

from xdevproto.errors import DeviceError
from xdevproto.wire import IrqIndex, IrqInfoFlags, PciRegion, SetIrqsFlags

CFG = PciRegion.CONFIG
TRIGGER, MASK, UNMASK = (SetIrqsFlags.ACTION_TRIGGER, SetIrqsFlags.ACTION_MASK,
                         SetIrqsFlags.ACTION_UNMASK)


class Fds:
    """The client's side: one nonblocking eventfd per vector per index."""

    def __init__(self, dev: SampleDevice) -> None:
        self.ours: dict[int, list[int]] = {}
        for index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
            n = dev.irq(index).count
            fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
            self.ours[index] = fds
            dev.set_irqs(index, TRIGGER, 0, n, [os.dup(fd) for fd in fds], None)

    def count(self, index: int, vector: int = 0) -> int:
        try:
            return os.eventfd_read(self.ours[index][vector])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fds in self.ours.values():
            for fd in fds:
                os.close(fd)


@pytest.fixture
def dev() -> Iterator[SampleDevice]:
    d = SampleDevice()
    yield d
    d.intr.release()


@pytest.fixture
def fds(dev: SampleDevice) -> Iterator[Fds]:
    f = Fds(dev)
    yield f
    f.close()


def cfg_w(d: SampleDevice, off: int, v: int, n: int) -> None:
    d.region_write(CFG, off, v.to_bytes(n, "little"))


def cfg_r(d: SampleDevice, off: int, n: int) -> int:
    return int.from_bytes(d.region_read(CFG, off, n), "little")


def cap(d: SampleDevice, cid: int) -> int:
    ptr = cfg_r(d, 0x34, 1)
    while ptr:
        if cfg_r(d, ptr, 1) == cid:
            return ptr
        ptr = cfg_r(d, ptr + 1, 1)
    raise LookupError(cid)


def test_irq_info() -> None:
    d = SampleDevice()
    assert d.irq(IrqIndex.INTX).count == 1
    assert d.irq(IrqIndex.INTX).flags & IrqInfoFlags.AUTOMASKED
    assert d.irq(IrqIndex.MSI).count == 4
    assert d.irq(IrqIndex.MSIX).count == 8
    assert d.irq(IrqIndex.ERR).count == 0


def test_intx_level_automask_and_resample(dev: SampleDevice, fds: Fds) -> None:
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.INTX) == 1
    assert cfg_r(dev, 0x06, 2) & 0x8  # status: interrupt pending
    dev.intr.raise_(1)  # another source on the same line: no new edge
    assert fds.count(IrqIndex.INTX) == 0
    # the client unmasks (EOI) while the level is still high: fires again
    dev.set_irqs(IrqIndex.INTX, UNMASK, 0, 1, None, None)
    assert fds.count(IrqIndex.INTX) == 1
    dev.intr.lower(0)
    dev.intr.lower(1)
    assert cfg_r(dev, 0x06, 2) & 0x8 == 0
    dev.set_irqs(IrqIndex.INTX, UNMASK, 0, 1, None, None)
    assert fds.count(IrqIndex.INTX) == 0  # level low: nothing to resample
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.INTX) == 1


def test_intx_client_mask_holds_back(dev: SampleDevice, fds: Fds) -> None:
    dev.set_irqs(IrqIndex.INTX, MASK, 0, 1, None, None)
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.INTX) == 0
    dev.set_irqs(IrqIndex.INTX, UNMASK, 0, 1, None, None)
    assert fds.count(IrqIndex.INTX) == 1


def test_intx_disable_bit(dev: SampleDevice, fds: Fds) -> None:
    cfg_w(dev, 0x04, 0x0400, 2)  # Interrupt Disable
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.INTX) == 0
    assert cfg_r(dev, 0x06, 2) & 0x8  # status still shows the device's state
    cfg_w(dev, 0x04, 0x0000, 2)
    assert fds.count(IrqIndex.INTX) == 1


def test_intx_through_registers(dev: SampleDevice, fds: Fds) -> None:
    """A device raising on a doorbell and lowering when STATUS is cleared."""
    dev.region_write(0, 0x10, (1).to_bytes(4, "little"))  # DOORBELL vector 1
    assert fds.count(IrqIndex.INTX) == 1
    dev.intr.lower(1)
    assert cfg_r(dev, 0x06, 2) & 0x8 == 0


def test_intx_line_sink_takes_the_line_and_gives_it_back(dev: SampleDevice,
                                                         fds: Fds) -> None:
    """The xdev ioreq extension: the server drives the line itself, both
    edges, while a sink is set; the eventfd hears nothing meanwhile, and
    gets an edge when the line comes back to it high."""
    levels: list[bool] = []
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.INTX) == 1  # automasked now
    dev.intr.set_line_sink(levels.append)
    assert levels == [True]  # high already: the sink hears so at once
    dev.intr.lower(0)
    dev.intr.raise_(1)
    dev.intr.raise_(0)  # the line stays high: no new level
    cfg_w(dev, 0x04, 0x0400, 2)  # Interrupt Disable
    cfg_w(dev, 0x04, 0x0000, 2)
    assert levels == [True, False, True, False, True]
    assert fds.count(IrqIndex.INTX) == 0
    dev.intr.set_line_sink(None)  # lowers the sink's line, unmasks the eventfd
    assert levels[-1] is False and len(levels) == 6
    assert fds.count(IrqIndex.INTX) == 1  # high: the client gets its edge
    dev.intr.lower(0)
    dev.intr.lower(1)
    dev.intr.set_line_sink(levels.append)
    assert len(levels) == 6  # low: nothing to say
    dev.reset()
    dev.intr.raise_(0)
    assert levels[-1] is True
    dev.intr.reset()
    assert levels[-1] is False


def enable_msi(dev: SampleDevice, mme: int = 2) -> int:
    off = cap(dev, 0x05)
    cfg_w(dev, off + 4, 0xFEE00000, 4)
    cfg_w(dev, off + 2, 1 | mme << 4, 2)
    return off


def test_msi_delivery_and_no_intx(dev: SampleDevice, fds: Fds) -> None:
    enable_msi(dev)
    dev.intr.raise_(2)
    assert fds.count(IrqIndex.MSI, 2) == 1
    assert fds.count(IrqIndex.INTX) == 0
    assert cfg_r(dev, 0x06, 2) & 0x8 == 0


def test_msi_per_vector_mask_sets_pending(dev: SampleDevice, fds: Fds) -> None:
    off = enable_msi(dev)
    cfg_w(dev, off + 0x10, 0b0100, 4)  # mask vector 2
    dev.intr.raise_(2)
    assert fds.count(IrqIndex.MSI, 2) == 0
    assert cfg_r(dev, off + 0x14, 4) == 0b0100  # pending
    cfg_w(dev, off + 0x10, 0, 4)
    assert fds.count(IrqIndex.MSI, 2) == 1
    assert cfg_r(dev, off + 0x14, 4) == 0


def test_msi_vector_beyond_enabled_uses_vector_0(dev: SampleDevice, fds: Fds) -> None:
    enable_msi(dev, mme=0)  # one vector granted
    dev.intr.raise_(3)
    assert fds.count(IrqIndex.MSI, 0) == 1
    assert fds.count(IrqIndex.MSI, 3) == 0


def enable_msix(dev: SampleDevice, function_mask: bool = False) -> int:
    off = cap(dev, 0x11)
    cfg_w(dev, off + 2, 0x8000 | (0x4000 if function_mask else 0), 2)
    return off


def unmask_entry(dev: SampleDevice, vector: int, masked: bool = False) -> None:
    dev.region_write(2, 16 * vector + 12, int(masked).to_bytes(4, "little"))


def test_msix_masked_by_default_then_pending_then_delivered(dev: SampleDevice,
                                                            fds: Fds) -> None:
    enable_msix(dev)
    dev.intr.raise_(5)
    assert fds.count(IrqIndex.MSIX, 5) == 0
    assert dev.region_read(2, 0x2000, 8) == (1 << 5).to_bytes(8, "little")
    unmask_entry(dev, 5)
    assert fds.count(IrqIndex.MSIX, 5) == 1
    assert dev.region_read(2, 0x2000, 8) == bytes(8)
    dev.intr.raise_(5)
    assert fds.count(IrqIndex.MSIX, 5) == 1


def test_msix_function_mask(dev: SampleDevice, fds: Fds) -> None:
    off = enable_msix(dev, function_mask=True)
    unmask_entry(dev, 1)
    dev.intr.raise_(1)
    assert fds.count(IrqIndex.MSIX, 1) == 0
    assert dev.region_read(2, 0x2000, 1)[0] == 0b10
    cfg_w(dev, off + 2, 0x8000, 2)  # function unmask
    assert fds.count(IrqIndex.MSIX, 1) == 1
    assert dev.region_read(2, 0x2000, 1)[0] == 0


def test_msix_lower_drops_pending(dev: SampleDevice, fds: Fds) -> None:
    enable_msix(dev)
    dev.intr.raise_(0)
    dev.intr.lower(0)
    unmask_entry(dev, 0)
    assert fds.count(IrqIndex.MSIX, 0) == 0


def test_msix_client_mask(dev: SampleDevice, fds: Fds) -> None:
    enable_msix(dev)
    unmask_entry(dev, 3)
    dev.set_irqs(IrqIndex.MSIX, MASK, 3, 1, None, None)
    dev.intr.raise_(3)
    assert fds.count(IrqIndex.MSIX, 3) == 0
    dev.set_irqs(IrqIndex.MSIX, UNMASK, 3, 1, None, None)
    assert fds.count(IrqIndex.MSIX, 3) == 1


def test_msix_wins_over_msi(dev: SampleDevice, fds: Fds) -> None:
    enable_msi(dev)
    enable_msix(dev)
    unmask_entry(dev, 0)
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.MSIX, 0) == 1
    assert fds.count(IrqIndex.MSI, 0) == 0


def test_client_without_config_forwarding_uses_its_fds(dev: SampleDevice) -> None:
    """A client that registers only MSI-X fds gets MSI-X even with enable clear."""
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    dev.set_irqs(IrqIndex.MSIX, TRIGGER, 2, 1, [os.dup(fd)], None)
    try:
        dev.intr.raise_(2)  # the table's masks are the client's business then
        assert os.eventfd_read(fd) == 1
        dev.set_irqs(IrqIndex.MSIX, MASK, 2, 1, None, None)
        dev.intr.raise_(2)
        assert dev.region_read(2, 0x2000, 1)[0] == 0b100  # held back as pending
        dev.set_irqs(IrqIndex.MSIX, UNMASK, 2, 1, None, None)
        assert os.eventfd_read(fd) == 1
        assert dev.region_read(2, 0x2000, 1)[0] == 0
    finally:
        os.close(fd)


def test_loopback_trigger_and_disable(dev: SampleDevice, fds: Fds) -> None:
    dev.set_irqs(IrqIndex.MSI, TRIGGER, 1, 2, None, b"\x01\x00")
    assert fds.count(IrqIndex.MSI, 1) == 1
    assert fds.count(IrqIndex.MSI, 2) == 0
    dev.set_irqs(IrqIndex.MSI, TRIGGER, 0, 0, None, None)  # disable all
    assert dev.intr.fds[IrqIndex.MSI] == [None] * 4
    dev.set_irqs(IrqIndex.MSI, TRIGGER, 1, 1, None, None)  # no fd: nothing, no error


def test_set_irqs_out_of_range(dev: SampleDevice) -> None:
    fd = os.eventfd(0)
    with pytest.raises(DeviceError):
        dev.set_irqs(IrqIndex.MSI, TRIGGER, 3, 2, [fd, None], None)
    with pytest.raises(OSError):
        os.close(fd)  # the device closed the fd it did not keep


def test_reset_drops_levels(dev: SampleDevice, fds: Fds) -> None:
    dev.intr.raise_(0)
    assert fds.count(IrqIndex.INTX) == 1
    dev.reset()
    assert cfg_r(dev, 0x06, 2) & 0x8 == 0
    dev.intr.raise_(0)  # reset also unmasked the automasked line
    assert fds.count(IrqIndex.INTX) == 1


def test_indexes_without_vectors_accept_an_empty_disable() -> None:
    d = SampleDevice()
    for index in (IrqIndex.ERR, IrqIndex.REQ):
        d.set_irqs(index, TRIGGER, 0, 0, None, None)
        with pytest.raises(DeviceError):
            d.set_irqs(index, TRIGGER, 0, 1, None, None)


def test_intx_asserted_at_save_is_signalled_after_load() -> None:
    from xdevproto.wire import MigState

    src = SampleDevice()
    src.intr.raise_(0)
    src.set_mig_state(MigState.STOP_COPY)
    blob = src.mig_data_read(1 << 20)
    dst = SampleDevice()
    fds = Fds(dst)
    try:
        dst.set_mig_state(MigState.RESUMING)
        dst.mig_data_write(blob)
        dst.set_mig_state(MigState.STOP)
        assert fds.count(IrqIndex.INTX) == 0  # stopped: no interrupts
        dst.set_mig_state(MigState.RUNNING)
        assert fds.count(IrqIndex.INTX) == 1
        assert cfg_r(dst, 0x06, 2) & 0x8
    finally:
        fds.close()
        dst.intr.release()
