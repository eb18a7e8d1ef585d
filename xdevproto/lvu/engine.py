"""Run an xdev :class:`~xdevproto.device.Device` on libvfio-user's protocol engine.

A sketch of the ``--engine libvfio-user`` switch (issue 9): the same device
object the native runtime (:mod:`xdevproto.server`) serves is wired to a
:class:`~xdevproto.lvu.context.Context` instead. How the two runtimes'
contracts meet:

* Regions: each region the device describes becomes a libvfio-user region
  whose callbacks call ``region_read``/``region_write``. Config space is
  registered with ``ALWAYS_CB``, so the device keeps owning all of it (the
  library's own header and capability emulation is bypassed). Whether a BAR
  is memory, 64-bit or prefetchable is read from the device's BAR register,
  because vfio-user region flags do not say and libvfio-user needs it.
* Interrupts: libvfio-user keeps the client's eventfds and hides them. The
  device gets eventfds of ours instead (SET_IRQS TRIGGER at attach, every
  vector of every index); the loop forwards a signal on any of them to
  ``vfu_irq_trigger(vector)``, which rings whatever the client enabled.
* DMA: the device is told of regions without an fd, so it goes through
  :class:`~xdevproto.device.DeviceContext`; that uses ``vfu_sgl_read``/
  ``vfu_sgl_write`` (a memcpy when the client passed an fd, DMA_READ/
  DMA_WRITE messages otherwise). libvfio-user is not thread-safe, so calls
  from worker threads are handed to the loop thread and waited for.
* Reset: DEVICE and FLR call ``reset``; LOST_CONN calls ``detach``.
* Migration v2: the library's states map onto the wire's
  (:data:`_MIG_STATES`); it walks every arc through STOP itself.

Not covered yet: DMA dirty logging (the device's ``dma_logging_*`` are never
called; libvfio-user does its own tracking), region-I/O fds, MASKABLE IRQ
info and per-vector masking (SET_IRQS MASK reaches the device only through
the IRQ state callback), and device-raised quiesce (the device's
``dma_unmap`` must return only when DMA stopped, as for the native runtime).
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from xdevproto import wire
from xdevproto.device import Device, DeviceContext, DmaRegion
from xdevproto.lvu.cdef import IrqType, MigrState, Region, RegionFlag, ResetType
from xdevproto.lvu.context import Context, DmaInfo

log = logging.getLogger("xdevproto.lvu.engine")

T = TypeVar("T")

_MIG_STATES = {
    MigrState.STOP: wire.MigState.STOP,
    MigrState.RUNNING: wire.MigState.RUNNING,
    MigrState.STOP_AND_COPY: wire.MigState.STOP_COPY,
    MigrState.PRE_COPY: wire.MigState.PRE_COPY,
    MigrState.RESUME: wire.MigState.RESUMING,
}
_BAR_IO = 0x1
_BAR_64 = 0x4
_BAR_PREFETCH = 0x8


class _Context(DeviceContext):
    """Guest memory for the device, through the loop thread when needed."""

    def __init__(self, engine: LvuEngine) -> None:
        self.engine = engine

    def dma_read(self, iova: int, length: int) -> bytes:
        return self.engine.on_loop(lambda: self.engine.ctx.dma_read(iova, length))

    def dma_write(self, iova: int, data: bytes | memoryview) -> None:
        blob = bytes(data)
        self.engine.on_loop(lambda: self.engine.ctx.dma_write(iova, blob))

    @property
    def max_data_xfer_size(self) -> int:
        return wire.DEFAULT_MAX_DATA_XFER_SIZE  # what libvfio-user offers and accepts


class LvuEngine:
    """Serve ``device`` on ``socket_path`` with libvfio-user, one client at a time."""

    def __init__(self, device: Device, socket_path: str) -> None:
        self.device = device
        self.ctx = Context(socket_path, nonblocking=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._jobs: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._jobs_lock = threading.Lock()
        self._loop_thread: int | None = None
        self._stopping = False
        self._attached = False
        self._irq_fds: dict[int, tuple[int, int]] = {}  # our eventfd -> (index, vector)
        self._configure()

    # -- set-up ---------------------------------------------------------------------

    def _configure(self) -> None:
        dev, ctx = self.device, self.ctx
        ctx.pci_init()
        cfg = dev.region(Region.CFG)
        ctx.setup_region(Region.CFG, cfg.size, read=self._reader(Region.CFG),
                         write=self._writer(Region.CFG),
                         flags=RegionFlag.RW | RegionFlag.ALWAYS_CB)
        for index in range(Region.VGA + 1):
            if index != Region.CFG:
                self._add_region(index)
        for irq in IrqType:
            count = dev.irq(irq).count
            if count:
                ctx.setup_irqs(irq, count)
        ctx.setup_dma(self._dma_map, self._dma_unmap)
        ctx.on_reset(self._reset)
        if dev.migration_flags:
            ctx.setup_migration(lambda s: dev.set_mig_state(_MIG_STATES[s]),
                                dev.mig_data_read, dev.mig_data_write)
        ctx.realize()

    def _add_region(self, index: int) -> None:
        desc = self.device.region(index)
        if desc.size == 0:
            return
        flags = RegionFlag(0)
        if desc.flags & wire.RegionFlags.READ:
            flags |= RegionFlag.READ
        if desc.flags & wire.RegionFlags.WRITE:
            flags |= RegionFlag.WRITE
        if index <= Region.BAR5:
            flags |= self._bar_kind(index)
        areas: list[tuple[int, int]] = []
        fd = -1
        if desc.fd is not None and desc.flags & wire.RegionFlags.MMAP:
            fd = desc.fd
            for cap in desc.caps:
                if isinstance(cap, wire.SparseMmapCap):
                    areas = [(a.offset, a.size) for a in cap.areas]
            if not areas:
                areas = [(0, desc.size)]
        self.ctx.setup_region(index, desc.size, read=self._reader(index),
                              write=self._writer(index), flags=flags, mmap_areas=areas,
                              fd=fd, fd_offset=desc.fd_offset)

    def _bar_kind(self, index: int) -> RegionFlag:
        bar = struct.unpack("<I", self.device.region_read(Region.CFG, 0x10 + 4 * index, 4))[0]
        if bar & _BAR_IO:
            return RegionFlag(0)
        kind = RegionFlag.MEM
        if bar & _BAR_64:
            kind |= RegionFlag.BITS_64
        if bar & _BAR_PREFETCH:
            kind |= RegionFlag.PREFETCH
        return kind

    def _reader(self, index: int) -> Callable[[int, int], bytes]:
        return lambda offset, count: self.device.region_read(index, offset, count)

    def _writer(self, index: int) -> Callable[[int, bytes], None]:
        return lambda offset, data: self.device.region_write(index, offset, data)

    # -- callbacks from the library (loop thread) -------------------------------------

    @staticmethod
    def _region(info: DmaInfo) -> DmaRegion:
        return DmaRegion(info.iova, info.length, readable=bool(info.prot & 1),
                         writable=bool(info.prot & 2))

    def _dma_map(self, info: DmaInfo) -> None:
        self.device.dma_map(self._region(info))

    def _dma_unmap(self, info: DmaInfo) -> None:
        self.device.dma_unmap(self._region(info))

    def _reset(self, kind: ResetType) -> None:
        if kind is not ResetType.LOST_CONN:
            self.device.reset()
        elif self._attached:  # vfu_destroy_ctx reports LOST_CONN again
            self._attached = False
            self._drop_irq_fds()
            self.device.detach()

    # -- interrupts -------------------------------------------------------------------

    def _give_irq_fds(self) -> None:
        for irq in IrqType:
            count = self.device.irq(irq).count
            if not count:
                continue
            fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
            for vector, fd in enumerate(fds):
                self._irq_fds[fd] = (irq, vector)
            # the device owns these from here and closes them on re-assignment;
            # we read them, and forget them at detach
            self.device.set_irqs(irq, wire.SetIrqsFlags.ACTION_TRIGGER, 0, count,
                                 list(fds), None)

    def _drop_irq_fds(self) -> None:
        for irq in IrqType:
            if self.device.irq(irq).count:
                self.device.set_irqs(irq, wire.SetIrqsFlags.ACTION_TRIGGER, 0, 0, None, None)
        self._irq_fds.clear()

    def _forward_irq(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        _, vector = self._irq_fds[fd]
        try:
            self.ctx.irq_trigger(vector)
        except OSError as exc:  # the client has not enabled this vector: drop it
            log.debug("interrupt %d dropped: %s", vector, exc)

    # -- the loop ---------------------------------------------------------------------

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread (directly when already there)."""
        if threading.get_ident() == self._loop_thread:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._jobs_lock:
            self._jobs.append((fn, fut))
        os.write(self._wake_w, b"\0")
        return fut.result()

    def _run_jobs(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
        for fn, fut in jobs:
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)

    def serve(self) -> None:
        """Serve clients until :meth:`stop`; call from the thread that owns the engine."""
        self._loop_thread = threading.get_ident()
        while not self._stopping:
            fds = [self.ctx.poll_fd(), self._wake_r, *self._irq_fds]
            ready, _, _ = select.select(fds, [], [])
            if self._wake_r in ready:
                self._run_jobs()
            for fd in ready:
                if fd in self._irq_fds:
                    self._forward_irq(fd)
            if fds[0] in ready and not self._stopping:
                self._step()
        self._fail_jobs()

    def _step(self) -> None:
        if not self._attached:
            try:
                # accepts and reads VERSION (blocking: a silent client stalls us,
                # as it stalls libvfio-user's own samples)
                self.ctx.attach()
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # the library closed the bad client
                    log.info("client refused at VERSION: %s", exc)
                return
            self._attached = True
            self.device.attach(_Context(self))
            self._give_irq_fds()
            return
        try:
            self.ctx.run()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOTCONN, errno.ECONNRESET):
                raise

    def _fail_jobs(self) -> None:
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
        for _, fut in jobs:
            fut.set_exception(ConnectionError("libvfio-user engine stopped"))

    def stop(self) -> None:
        """Make :meth:`serve` return (from any thread)."""
        self._stopping = True
        os.write(self._wake_w, b"\0")

    def close(self) -> None:
        """After :meth:`serve` returned: destroy the context (unlinks the socket)."""
        self.ctx.destroy()
        os.close(self._wake_r)
        os.close(self._wake_w)
