"""The PCI device base class: declarations in, a vfio-user Device out.

A device subclasses :class:`PciDevice` and declares ``identity``, ``bars``
(each mapped to a register layout or to ``bar_read``/``bar_write``) and
``capabilities``. The base class implements :class:`xdevproto.device.Device`:
regions 0-5 are the BARs, 6 the expansion ROM, 7 the config space (vfio-user
spec, "VFIO_USER_DEVICE_GET_REGION_INFO", PCI region indexes), and it owns
the interrupt router (``self.intr``), guest memory (``self.dma``), the
worker pool (``self.work``), reset and migration.

Locking: every region access, interrupt and completion runs under
``self.lock`` (an RLock), so register hooks never race with completions.
Long work goes to ``self.work`` and completes under the lock.

Device hooks to override: ``device_reset()`` (after registers went back to
reset values), ``save_state()``/``load_state()`` (state outside the register
files), ``running(bool)`` (migration STOP/RUNNING edges), ``bar_read``/
``bar_write`` (BARs without a register layout), ``bar_region`` (to offer an
fd-backed BAR for mmap).
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections.abc import Sequence
from typing import ClassVar, TypeVar

from ..device import (
    NO_REGION,
    Device,
    DeviceContext,
    DmaRegion,
    IntReader,
    IntWriter,
    IrqDesc,
    RegionDesc,
)
from ..errors import DeviceError
from ..wire import IrqIndex, IrqInfoFlags, MigrationFlags, MigState, PciRegion, RegionFlags
from . import migration as mig
from .caps import Capability, MsiCap, MsixCap, PcieCap, PmCap
from .config import Bar, ConfigSpace, Identity
from .dma import GuestMemory
from .irq import Interrupts
from .regs import RegisterFile, RegisterLayout
from .work import WorkQueue, run_unlocked

RW = RegionFlags.READ | RegionFlags.WRITE


class PciDevice(Device):
    """Base class of every PCI device model."""

    identity: ClassVar[Identity]
    bars: ClassVar[tuple[Bar, ...]] = ()
    capabilities: ClassVar[tuple[Capability, ...]] = ()
    pcie: ClassVar[bool] = False
    rom: ClassVar[bytes] = b""
    workers: ClassVar[int] = 4
    migration_flags = MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for bar in cls.bars:  # a misspelt hook fails at import, not in a guest
            if isinstance(bar.regs, RegisterLayout):
                for hook in bar.regs.hook_names():
                    if not callable(getattr(cls, hook, None)):
                        raise TypeError(f"{cls.__name__}: BAR{bar.index} hook {hook!r} "
                                        "is not a method")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log = logging.getLogger(f"xdevproto.pci.{type(self).__name__}")
        caps = [c.clone() for c in self.capabilities]
        rom_size = 1 << max(11, (len(self.rom) - 1).bit_length()) if self.rom else 0
        self.config = ConfigSpace(self.identity, self.bars, caps, self.pcie, rom_size)
        self.caps = tuple(caps)
        self.msi = _first(caps, MsiCap)
        self.msix = _first(caps, MsixCap)
        self.pm = _first(caps, PmCap)
        self.pcie_cap = _first(caps, PcieCap)
        self.intr = Interrupts(self.config, self.lock, self.identity.interrupt_pin != 0,
                               self.msi, self.msix)
        for cap in caps:
            cap.listener = self.intr.routing_changed
            cap.on_reset = self._function_reset
        self.config.on_command = self._command_written
        self.dma = GuestMemory()
        self.work = WorkQueue(self.lock, self.workers, type(self).__name__)
        self.mig = mig.MigrationEngine(self._save, self._load, self._running)
        self._bars: dict[int, Bar] = {b.index: b for b in self.bars}
        self.regfiles: dict[int, RegisterFile] = {}
        for bar in self.bars:
            if isinstance(bar.regs, RegisterLayout):
                if bar.regs.size > bar.size:
                    raise ValueError(f"BAR{bar.index}: registers larger than the BAR")
                self.regfiles[bar.index] = RegisterFile(
                    bar.regs, self, self.log.getChild(f"BAR{bar.index}"), f"BAR{bar.index}")
        # The register files that own their whole BAR (no MSI-X table or PBA
        # in it): a guest access there goes straight to them.
        msix = self.msix
        self._plain_regs = {i: r for i, r in self.regfiles.items()
                            if msix is None or i not in (msix.bar, msix.pba_bar)}
        # Windows of those BARs this instance leaves unimplemented (reserve()).
        self._reserved: dict[int, tuple[int, int]] = {}
        self._int_access = {i: self._plain_access(i) for i in self._plain_regs}

    def reserve(self, index: int, start: int, end: int) -> None:
        """Leave ``[start, end)`` of register BAR ``index`` unimplemented in
        this instance: accesses starting there read 0 and are not written
        (e.g. an AHCI HBA's port registers past its last port, AHCI 3.3).
        One window per BAR; call it from ``__init__``."""
        if index not in self._plain_regs:
            raise ValueError(f"BAR{index} has no register file of its own")
        self._reserved[index] = (start, end)
        self._int_access[index] = self._plain_access(index)

    def _unimplemented(self, index: int, offset: int) -> bool:
        window = self._reserved.get(index)
        return window is not None and window[0] <= offset < window[1]

    def _plain_access(self, index: int) -> tuple[IntReader, IntWriter]:
        """The number accessors of a plain register BAR: the lock and the
        register file, nothing between (the direct ioreq path's every
        access). A read the register file can answer without the lock
        (RegisterFile.peek_int) does not take it: in Python 3.11 each
        acquisition reads the clock, a system call where there is no vDSO
        clock (a Xen PV dom0 on a host without a stable TSC)."""
        regs, lock = self._plain_regs[index], self.lock
        peek_int, read_int, write_int = regs.peek_int, regs.read_int, regs.write_int
        lo, hi = self._reserved.get(index, (0, 0))

        def read(offset: int, size: int) -> int:
            if lo <= offset < hi:
                return 0
            value = peek_int(offset, size)
            if value is not None:
                return value
            with lock:
                return read_int(offset, size)

        def write(offset: int, size: int, value: int) -> None:
            if lo <= offset < hi:
                return
            with lock:
                write_int(offset, size, value)

        return read, write

    # -- description ---------------------------------------------------------------------
    def region(self, index: int) -> RegionDesc:
        if index == PciRegion.CONFIG:
            return RegionDesc(self.config.size, RW)
        if index == PciRegion.ROM:
            return RegionDesc(self.config.rom_size, RegionFlags.READ) if self.rom else NO_REGION
        bar = self._bars.get(index)
        return self.bar_region(bar) if bar is not None else NO_REGION

    def bar_region(self, bar: Bar) -> RegionDesc:
        """Override to offer an fd for mmap (RegionFlags.MMAP)."""
        return RegionDesc(bar.size, RW)

    def irq(self, index: int) -> IrqDesc:
        count = self.intr.counts.get(index, 0)
        flags = IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE
        if index == IrqIndex.INTX:
            flags |= IrqInfoFlags.AUTOMASKED
        elif index in (IrqIndex.MSI, IrqIndex.MSIX):
            flags |= IrqInfoFlags.NORESIZE
        return IrqDesc(count, flags if count else IrqInfoFlags.EVENTFD)

    # -- accesses ------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        with self.lock:
            plain = self._plain_regs.get(index)
            if plain is not None:
                if self._reserved and self._unimplemented(index, offset):
                    return bytes(count)
                return plain.read(offset, count)
            regs = self.regfiles.get(index)
            msix = self.msix
            if index == PciRegion.CONFIG:
                return self.config.read(offset, count)
            if index == PciRegion.ROM:
                return bytes(self.rom[offset:offset + count]).ljust(count, b"\0")
            if index not in self._bars:
                raise DeviceError(f"region {index} does not exist", errno.EINVAL)
            if msix is not None:
                if msix.in_table(index, offset, count):
                    return msix.table_read(offset, count)
                if msix.in_pba(index, offset, count):
                    return msix.pba_read(offset, count)
            if regs is not None:
                return regs.read(offset, count)
            return self.bar_read(index, offset, count)

    def region_read_int(self, index: int, offset: int, size: int) -> int:
        access = self._int_access.get(index)
        if access is not None:
            return access[0](offset, size)
        return super().region_read_int(index, offset, size)

    def region_write_int(self, index: int, offset: int, size: int, value: int) -> None:
        access = self._int_access.get(index)
        if access is not None:
            access[1](offset, size, value)
        else:
            super().region_write_int(index, offset, size, value)

    def region_int_access(self, index: int) -> tuple[IntReader, IntWriter]:
        access = self._int_access.get(index)
        return access if access is not None else super().region_int_access(index)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        with self.lock:
            plain = self._plain_regs.get(index)
            if plain is not None:
                if not (self._reserved and self._unimplemented(index, offset)):
                    plain.write(offset, data)
                return
            regs = self.regfiles.get(index)
            msix = self.msix
            if index == PciRegion.CONFIG:
                self.config.write(offset, data)
                return
            if index not in self._bars:
                raise DeviceError(f"region {index} is not writable", errno.EINVAL)
            if msix is not None:
                if msix.in_table(index, offset, len(data)):
                    msix.table_write(offset, data)
                    return
                if msix.in_pba(index, offset, len(data)):
                    return  # the PBA is read-only (PCI 3.0, 6.8.2.10)
            if regs is not None:
                regs.write(offset, data)
            else:
                self.bar_write(index, offset, data)

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """Reads of a BAR declared without registers; override."""
        return bytes(count)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Writes to a BAR declared without registers; override."""

    def regs(self, bar: int) -> RegisterFile:
        """The register file behind BAR ``bar``."""
        return self.regfiles[bar]

    # -- client session ------------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        self.dma.ctx = ctx

    def detach(self) -> None:
        self.dma.ctx = None

    def dma_map(self, region: DmaRegion) -> None:
        self.dma.map(region)

    def dma_unmap(self, region: DmaRegion) -> None:
        self.dma.unmap(region)

    def set_irqs(self, index: int, action: int, start: int, count: int,
                 fds: Sequence[int | None] | None, bools: bytes | None) -> None:
        self.intr.set_irqs(index, action, start, count, fds, bools)

    def close(self) -> None:
        """Shut down: workers finished, DMA regions and interrupt fds released."""
        self.work.shutdown()
        self.dma.unmap_all()
        self.intr.release()

    # -- reset ---------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: the whole function back to reset values; leaves ERROR."""
        self._drain()
        with self.lock:
            self._reset_state()
            self.mig.reset()

    def _function_reset(self) -> None:
        """FLR or D3hot -> D0 (called from a config write, under the lock)."""
        self.log.info("function-level reset")
        run_unlocked(self.lock, self._drain)
        self._reset_state()

    def _drain(self) -> None:
        self.work.drain(lambda: self.dma.in_message)

    def _reset_state(self) -> None:
        self.work.cancel()
        self.config.reset()
        for regs in self.regfiles.values():
            regs.reset()
        self.intr.reset()
        self.device_reset()
        self.intr.update_intx()

    def device_reset(self) -> None:
        """Reset state outside the register files; override."""

    def _command_written(self, command: int) -> None:
        self.intr.update_intx()

    # -- migration -----------------------------------------------------------------------
    def mig_state(self) -> MigState:
        return self.mig.state

    def set_mig_state(self, state: MigState) -> None:
        self.mig.set_state(state)

    def mig_data_read(self, size: int) -> bytes:
        return self.mig.read(size)

    def mig_data_write(self, data: bytes) -> None:
        self.mig.write(data)

    def dma_logging_start(self, page_size: int, ranges: Sequence[tuple[int, int]]) -> None:
        self.dma.logging_start(page_size)

    def dma_logging_stop(self) -> None:
        self.dma.logging_stop()

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        return self.dma.logging_report(iova, length, page_size)

    def _running(self, running: bool) -> None:
        if not running:
            self._drain()
        with self.lock:
            self.running(running)
            if running:
                self.intr.resample()

    def running(self, running: bool) -> None:
        """Migration STOP (False) / RUNNING (True) edge; stop timers etc. Override."""

    def save_state(self) -> bytes:
        """State outside config space and register files; override."""
        return b""

    def load_state(self, data: bytes) -> None:
        """Restore :meth:`save_state` bytes; validate everything (hostile input)."""
        if data:
            raise DeviceError("unexpected device state", errno.EINVAL)

    def _save(self) -> bytes:
        with self.lock:
            sections = {"config": bytes(self.config.data)}
            for i, cap in enumerate(self.caps):
                sections[f"cap{i}"] = cap.save()
            for index, regs in sorted(self.regfiles.items()):
                sections[f"regs{index}"] = mig.pack_u64s(regs.save())
            sections["irq"] = struct.pack("<Q", self.intr.levels)
            sections["device"] = self.save_state()
            return mig.encode(sections)

    def _load(self, blob: bytes) -> None:
        sections = mig.decode(blob)
        expected = {"config", "irq", "device", *(f"cap{i}" for i in range(len(self.caps))),
                    *(f"regs{i}" for i in self.regfiles)}
        if set(sections) != expected:
            raise DeviceError(f"device state sections {sorted(sections)} do not match "
                              f"this device's {sorted(expected)}", errno.EINVAL)
        if len(sections["irq"]) != 8:
            raise DeviceError("bad interrupt state", errno.EINVAL)
        with self.lock:
            self.config.load(sections["config"])
            for i, cap in enumerate(self.caps):
                cap.load(sections[f"cap{i}"])
            for index, regs in self.regfiles.items():
                regs.load(mig.unpack_u64s(sections[f"regs{index}"]))
            self.intr.restore(struct.unpack("<Q", sections["irq"])[0])
            self.load_state(sections["device"])


C = TypeVar("C", bound=Capability)


def _first(caps: Sequence[Capability], kind: type[C]) -> C | None:
    for cap in caps:
        if isinstance(cap, kind):
            return cap
    return None
