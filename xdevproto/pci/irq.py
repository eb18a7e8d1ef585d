"""Interrupt delivery: the device raises "vector N"; this picks INTx, MSI or MSI-X.

The mechanism is the one the guest enabled in config space: MSI-X when its
enable bit is set, else MSI, else INTx (PCI 3.0, 6.8: a function with MSI or
MSI-X enabled does not use INTx). A client that does not forward config
writes (so the enable bits stay clear) is served by the fds it registered:
INTx if it gave one, else MSI-X, else MSI; such a client emulates the
capability (and its masks) itself, so only its SET_IRQS masks apply then.

Delivery writes a u64 1 to the eventfd the client registered with
DEVICE_SET_IRQS ACTION_TRIGGER (vfio-user spec, "DEVICE_SET_IRQS").

* INTx is a level: ``raise_``/``lower`` assert and deassert sources; the line
  is the OR of the sources, gated by the command register's Interrupt Disable
  bit; status bit 3 shows the sources' state (PCI 3.0, 6.2.2-6.2.3). The
  eventfd is signalled on each rising edge and the line is then automasked;
  ACTION_UNMASK re-signals while the level is still high (resample).
* MSI honours per-vector mask bits and sets pending bits (PCI 3.0, 6.8.1.6-7).
* MSI-X honours the function mask and the per-vector mask and sets PBA bits;
  unmasking delivers what is pending (PCI 3.0, 6.8.2.9-10).
* SET_IRQS ACTION_MASK on MSI/MSI-X holds vectors back the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable, Sequence

from ..errors import DeviceError
from ..wire import IrqIndex, SetIrqsFlags
from .caps import MsiCap, MsixCap
from .config import CMD_INTX_DISABLE, ConfigSpace

log = logging.getLogger("xdevproto.pci.irq")


class Interrupts:
    """Routes a device's vectors to the client's eventfds (thread-safe under ``lock``)."""

    def __init__(self, cfg: ConfigSpace, lock: threading.RLock, intx: bool,
                 msi: MsiCap | None, msix: MsixCap | None) -> None:
        self.cfg = cfg
        self.lock = lock
        self.msi = msi
        self.msix = msix
        self.counts: dict[int, int] = {IrqIndex.INTX: 1 if intx else 0,
                       IrqIndex.MSI: msi.vectors if msi else 0,
                       IrqIndex.MSIX: msix.vectors if msix else 0}
        self.fds: dict[int, list[int | None]] = {i: [None] * n for i, n in self.counts.items()}
        self.vfio_masked: dict[int, bytearray] = {i: bytearray(n) for i, n in self.counts.items()}
        self.held: dict[int, set[int]] = {IrqIndex.MSI: set(), IrqIndex.MSIX: set()}
        self.levels = 0  # INTx sources, one bit per vector number
        self._line = False
        # Where the line goes instead of the eventfd (set_line_sink), and
        # the level last given to it.
        self._sink: Callable[[bool], None] | None = None
        self._sink_level = False

    # -- what the device calls ---------------------------------------------------------
    def mode(self) -> IrqIndex:
        if self.msix is not None and self.msix.enabled:
            return IrqIndex.MSIX
        if self.msi is not None and self.msi.enabled:
            return IrqIndex.MSI
        if self.counts[IrqIndex.INTX] and (self.fds[IrqIndex.INTX][0] is not None
                                           or not self._any_fd(IrqIndex.MSIX, IrqIndex.MSI)):
            return IrqIndex.INTX
        if self._any_fd(IrqIndex.MSIX):
            return IrqIndex.MSIX
        if self._any_fd(IrqIndex.MSI):
            return IrqIndex.MSI
        return IrqIndex.INTX

    def _any_fd(self, *indexes: int) -> bool:
        return any(fd is not None for i in indexes for fd in self.fds[i])

    def raise_(self, vector: int = 0) -> None:
        """Signal vector ``vector`` (an INTx source stays asserted until lower)."""
        with self.lock:
            mode = self.mode()
            if mode is IrqIndex.INTX:
                self.levels |= 1 << vector
                self.update_intx()
            elif mode is IrqIndex.MSIX:
                self._msix(vector)
            else:
                self._msi(vector)

    def lower(self, vector: int = 0) -> None:
        """Deassert INTx source ``vector``; drop a pending MSI/MSI-X message."""
        with self.lock:
            self.levels &= ~(1 << vector)
            self.update_intx()
            if self.msix is not None and vector < self.msix.vectors:
                self.msix.set_pending(vector, False)
            if self.msi is not None and vector < self.msi.vectors:
                self.msi.set_pending(vector, False)
            for held in self.held.values():
                held.discard(vector)

    def set_level(self, vector: int, level: bool) -> None:
        if level:
            self.raise_(vector)
        else:
            self.lower(vector)

    # -- INTx ----------------------------------------------------------------------------
    def update_intx(self) -> None:
        """Recompute the INTx line (after a source, command or mode change)."""
        with self.lock:
            if not self.counts[IrqIndex.INTX]:
                return
            self.cfg.set_interrupt_status(self.levels != 0)
            line = (self.levels != 0 and not self.cfg.command & CMD_INTX_DISABLE
                    and self.mode() is IrqIndex.INTX)
            rising = line and not self._line
            self._line = line
            if self._sink is not None:
                self._drive(line)
            elif rising and not self.vfio_masked[IrqIndex.INTX][0]:
                self._fire_intx()

    def set_line_sink(self, sink: Callable[[bool], None] | None) -> None:
        """Drive the INTx line through ``sink(level)``, called on each change
        of level, instead of signalling the client's eventfd (the xdev ioreq
        extension: the server then sets the line's level with the hypervisor
        itself, as the client sees no BAR access to end an interrupt by).
        The new sink is given the line's level at once if it is high; None
        lowers the old sink's line and hands the line back to the eventfd,
        signalling it if the line is high."""
        with self.lock:
            old = self._sink
            if old is sink:
                return
            if old is not None and self._sink_level:
                self._sink_level = False
                old(False)
            self._sink = sink
            if sink is not None:
                self._drive(self._line)
            else:
                # The client starts afresh: unmasked, and an edge if the line is high.
                self.vfio_masked[IrqIndex.INTX][0] = 0
                if self._line:
                    self._fire_intx()

    def _drive(self, line: bool) -> None:
        sink = self._sink
        if sink is not None and line != self._sink_level:
            self._sink_level = line
            sink(line)

    def _fire_intx(self) -> None:
        self._signal(IrqIndex.INTX, 0)
        self.vfio_masked[IrqIndex.INTX][0] = 1  # automasked until the client unmasks

    # -- MSI / MSI-X ---------------------------------------------------------------------
    def _msi(self, vector: int) -> None:
        msi = self.msi
        if msi is None:
            return
        n = msi.enabled_vectors if msi.enabled else msi.vectors
        if vector >= n:
            log.debug("MSI vector %d beyond the %d enabled; using 0", vector, n)
            vector = 0
        if (msi.enabled and msi.masked(vector)) or self.vfio_masked[IrqIndex.MSI][vector]:
            msi.set_pending(vector, True)
            self.held[IrqIndex.MSI].add(vector)
            return
        self._signal(IrqIndex.MSI, vector)

    def _msix(self, vector: int) -> None:
        msix = self.msix
        if msix is None or vector >= msix.vectors:
            log.warning("MSI-X vector %d does not exist", vector)
            return
        # Guest masks count only when the guest's enable reached us; a client
        # that emulates the capability itself (QEMU) masks through SET_IRQS.
        guest_masked = msix.enabled and (msix.function_masked or msix.masked(vector))
        if guest_masked or self.vfio_masked[IrqIndex.MSIX][vector]:
            msix.set_pending(vector, True)
            return
        self._signal(IrqIndex.MSIX, vector)

    def routing_changed(self) -> None:
        """Enable/mask bits changed: deliver what is now unmasked, redo INTx."""
        with self.lock:
            msix, msi = self.msix, self.msi
            if msix is not None and any(msix.pba) and not (msix.enabled
                                                           and msix.function_masked):
                for v in range(msix.vectors):
                    if (msix.pending(v) and not (msix.enabled and msix.masked(v))
                            and not self.vfio_masked[IrqIndex.MSIX][v]):
                        msix.set_pending(v, False)
                        self._signal(IrqIndex.MSIX, v)
            if msi is not None:
                for v in sorted(self.held[IrqIndex.MSI]):
                    if (not (msi.enabled and msi.masked(v))
                            and not self.vfio_masked[IrqIndex.MSI][v]):
                        msi.set_pending(v, False)
                        self.held[IrqIndex.MSI].discard(v)
                        self._signal(IrqIndex.MSI, v)
            self.update_intx()

    # -- DEVICE_SET_IRQS -----------------------------------------------------------------
    def set_irqs(self, index: int, action: int, start: int, count: int,
                 fds: Sequence[int | None] | None, bools: bytes | None) -> None:
        """Apply a validated DEVICE_SET_IRQS (vfio-user spec; VFIO_DEVICE_SET_IRQS)."""
        with self.lock:
            n = self.counts.get(index, 0)
            if start + count > n:
                _close_all(fds)
                raise DeviceError(f"irq index {index}: {start}+{count} beyond {n}", errno.EINVAL)
            if not n:  # ERR, REQ, or a mechanism this device lacks: nothing to do
                _close_all(fds)
                return
            if action == SetIrqsFlags.ACTION_TRIGGER:
                self._trigger(index, start, count, fds, bools)
                return
            _close_all(fds)  # unmask fds (irqfd resampling) are not supported
            if fds is not None:
                raise DeviceError("eventfd-driven (un)masking is not supported", errno.ENOTSUP)
            value = 1 if action == SetIrqsFlags.ACTION_MASK else 0
            for i in range(count):
                if bools is None or bools[i]:
                    self.vfio_masked[index][start + i] = value
            if value == 0:
                if index == IrqIndex.INTX and self._line:
                    self._fire_intx()  # still asserted: resample fires again
                self.routing_changed()

    def _trigger(self, index: int, start: int, count: int,
                 fds: Sequence[int | None] | None, bools: bytes | None) -> None:
        table = self.fds[index]
        if fds is not None:
            for i, fd in enumerate(fds):
                old = table[start + i]
                if old is not None and old != fd:
                    os.close(old)
                table[start + i] = fd
            self.routing_changed()
        elif count == 0 and bools is None:
            for i, old in enumerate(table):
                if old is not None:
                    os.close(old)
                table[i] = None
            if index == IrqIndex.INTX:
                self.vfio_masked[index][0] = 0
        else:
            for i in range(count):  # loopback trigger, used by tests and clients
                if bools is None or bools[i]:
                    self._signal(index, start + i)

    def release(self) -> None:
        """Close every fd (client gone)."""
        with self.lock:
            for table in self.fds.values():
                for i, fd in enumerate(table):
                    if fd is not None:
                        os.close(fd)
                    table[i] = None
            for masks in self.vfio_masked.values():
                masks[:] = bytes(len(masks))

    def reset(self) -> None:
        """Device reset: sources drop, masks and pending state clear; fds stay."""
        with self.lock:
            self.levels = 0
            self._line = False
            self._drive(False)
            for held in self.held.values():
                held.clear()
            self.vfio_masked[IrqIndex.INTX][:] = bytes(self.counts[IrqIndex.INTX])

    def restore(self, levels: int) -> None:
        """Migration load: INTx sources as saved; the line follows without an edge."""
        with self.lock:
            self.levels = levels
            self.cfg.set_interrupt_status(levels != 0)
            self._line = (levels != 0 and not self.cfg.command & CMD_INTX_DISABLE
                          and self.mode() is IrqIndex.INTX)
            self._drive(self._line)

    def resample(self) -> None:
        """Signal INTx again if the line is high (after a migration load, the
        new client has not seen the edge)."""
        with self.lock:
            if self._sink is not None:
                self._drive(self._line)
            elif self._line and not self.vfio_masked[IrqIndex.INTX][0]:
                self._fire_intx()

    def _signal(self, index: int, vector: int) -> None:
        fd = self.fds[index][vector]
        if fd is None:
            log.debug("irq %s[%d]: no eventfd", IrqIndex(index).name, vector)
            return
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:
            log.warning("irq %s[%d]: eventfd write failed: %s", IrqIndex(index).name, vector, exc)
        else:
            # Every interrupt passes here: no name lookup unless it is logged.
            if log.isEnabledFor(logging.DEBUG):
                log.debug("irq %s[%d] signalled", IrqIndex(index).name, vector)


def _close_all(fds: Sequence[int | None] | None) -> None:
    for fd in fds or ():
        if fd is not None:
            os.close(fd)
