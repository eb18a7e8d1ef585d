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
  :class:`~xdevproto.device.DeviceContext`. For memory the client mapped
  with an fd that copies from the library's own mapping on the calling
  thread (:mod:`xdevproto.lvu.direct`); otherwise ``vfu_sgl_read``/
  ``vfu_sgl_write`` send DMA_READ/DMA_WRITE messages, and since
  libvfio-user is not thread-safe, calls from worker threads are handed to
  the loop thread and waited for. One exception keeps a device that does
  DMA under its own lock from deadlocking: while the loop thread is inside
  the device's region access (it may be waiting for that very lock), the
  socket is idle (the client awaits the access's reply) and a waiting
  worker does its DMA itself, under the engine's socket lock, which the
  loop thread holds at all other times.
* SET_IRQS MASK/UNMASK reach the device through the library's IRQ state
  callback as ``set_irqs(index, ACTION_MASK|ACTION_UNMASK, start, count)``
  (so INTx, which the PCI framework automasks on each edge, fires again
  after the client's UNMASK). The library applies a range, ignoring a
  DATA_BOOL selection, and GET_IRQ_INFO never says MASKABLE.
* Reset: DEVICE and FLR call ``reset``; LOST_CONN calls ``detach``.
* Migration v2: the library's states map onto the wire's
  (:data:`_MIG_STATES`); it walks every arc through STOP itself.
* Dirty logging (DEVICE_FEATURE DMA_LOGGING_*): the library's own. It marks
  pages written through ``vfu_sgl_write``, which is how every device write
  to guest memory goes here; the device's ``dma_logging_*`` are not called.
* Listening socket: libvfio-user has no call to adopt one, it binds a path
  itself. To honour ``--fd`` and socket activation (and the native
  runtime's stale-socket handling and 0600 mode for ``--socket``), the
  engine can create its context on a private path and ``dup2`` the given
  listening socket over the library's listening descriptor
  (``vfu_get_poll_fd`` before the first attach, which at efd091b is the
  only use of that descriptor besides ``accept`` and ``close``). UNIX
  sockets only: the library passes fds with every mappable region.
* ``allowed_uids``: the library accepts and answers VERSION itself, so a
  client with another uid is checked right after and cut off (its socket
  shut down) before the device sees it.

Not covered: region-I/O fds (ioeventfds) and device-raised quiesce (the
device's ``dma_unmap`` must return only when DMA stopped, as for the native
runtime).
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from xdevproto import wire
from xdevproto.device import Device, DeviceContext, DmaRegion
from xdevproto.lvu.cdef import IrqType, MigrState, Region, RegionFlag, ResetType
from xdevproto.lvu.context import Context, DmaInfo
from xdevproto.lvu.direct import DirectMaps
from xdevproto.transport import peer_credentials

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
    """Guest memory for the device: fd-mapped regions directly on the calling
    thread (:mod:`xdevproto.lvu.direct`), the rest through the loop thread."""

    def __init__(self, engine: LvuEngine) -> None:
        self.engine = engine

    def dma_read(self, iova: int, length: int) -> bytes:
        data = self.engine.direct.read(iova, length)
        if data is not None:
            return data
        return self.engine.on_loop(lambda: self.engine.ctx.dma_read(iova, length))

    def dma_write(self, iova: int, data: bytes | memoryview) -> None:
        if self.engine.direct.write(iova, data):
            self.engine.wake()  # the loop marks the pages dirty
            return
        blob = bytes(data)
        self.engine.on_loop(lambda: self.engine.ctx.dma_write(iova, blob))

    @property
    def max_data_xfer_size(self) -> int:
        return wire.DEFAULT_MAX_DATA_XFER_SIZE  # what libvfio-user offers and accepts


class LvuEngine:
    """Serve ``device`` with libvfio-user, one client at a time.

    Either on ``socket_path`` (created by the library; it must not exist) or
    on ``listener``, a listening AF_UNIX socket the engine adopts (the
    caller keeps and eventually closes its own descriptor).
    """

    def __init__(self, device: Device, socket_path: str | None = None, *,
                 listener: socket.socket | None = None,
                 allowed_uids: Iterable[int] | None = None) -> None:
        if (socket_path is None) == (listener is None):
            raise ValueError("give exactly one of socket_path and listener")
        self.device = device
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else None
        self.on_state: Callable[[str], None] | None = None
        if listener is not None:
            self.ctx = _adopting_context(listener)
        else:
            assert socket_path is not None
            self.ctx = Context(socket_path, nonblocking=True)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.direct = DirectMaps()
        self._jobs: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._jobs_lock = threading.Lock()
        # Held by the loop thread except while the device handles a region
        # access; whoever holds it may use the library's socket.
        self._socket = threading.Lock()
        self._loop_thread: int | None = None
        self._stopping = False
        self._attached = False
        self._refused = False
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
                ctx.on_irq_state(irq, self._irq_state_cb(irq))
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
        read = self.device.region_read

        def on_read(offset: int, count: int) -> bytes:
            self._socket.release()
            try:
                return read(index, offset, count)
            finally:
                self._socket.acquire()
        return on_read

    def _writer(self, index: int) -> Callable[[int, bytes], None]:
        write = self.device.region_write

        def on_write(offset: int, data: bytes) -> None:
            self._socket.release()
            try:
                write(index, offset, data)
            finally:
                self._socket.acquire()
        return on_write

    # -- callbacks from the library (loop thread) -------------------------------------

    @staticmethod
    def _region(info: DmaInfo) -> DmaRegion:
        return DmaRegion(info.iova, info.length, readable=bool(info.prot & 1),
                         writable=bool(info.prot & 2))

    def _dma_map(self, info: DmaInfo) -> None:
        self.device.dma_map(self._region(info))
        self.direct.add(info.iova, info.length, info.vaddr, bool(info.prot & 2))

    def _dma_unmap(self, info: DmaInfo) -> None:
        # no direct copy may touch the mapping once this returns (the library
        # unmaps it next); the device's own DMA stops in its dma_unmap
        self.direct.remove(info.iova, info.length)
        self._mark_dirty()
        self.device.dma_unmap(self._region(info))

    def _reset(self, kind: ResetType) -> None:
        if kind is not ResetType.LOST_CONN:
            self.device.reset()
        elif self._attached:  # vfu_destroy_ctx reports LOST_CONN again
            self._attached = False
            self.direct.clear()
            self._drop_irq_fds()
            self.device.detach()
            self._notify("waiting for a client")

    # -- interrupts -------------------------------------------------------------------

    def _irq_state_cb(self, irq: IrqType) -> Callable[[int, int, bool], None]:
        def on_state(start: int, count: int, masked: bool) -> None:
            action = (wire.SetIrqsFlags.ACTION_MASK if masked
                      else wire.SetIrqsFlags.ACTION_UNMASK)
            self.device.set_irqs(irq, action, start, count, None, None)
        return on_state

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
        """Run ``fn``, which uses the library's socket, on the loop thread
        (directly when already there); or on this thread if the loop thread
        enters a region access before taking it (see the module docstring)."""
        if threading.get_ident() == self._loop_thread:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        job = (fn, fut)
        with self._jobs_lock:
            self._jobs.append(job)
        self.wake()
        while True:
            try:
                return fut.result(timeout=0.005)
            except concurrent.futures.TimeoutError:
                pass
            if not self._socket.acquire(blocking=False):
                continue  # the loop thread is in the library or idle: it will run the job
            try:
                with self._jobs_lock:
                    mine = any(j is job for j in self._jobs)
                    if mine:
                        self._jobs = [j for j in self._jobs if j is not job]
                if mine:
                    return fn()
            finally:
                self._socket.release()

    def wake(self) -> None:
        """Make the loop run its jobs and dirty marks soon (from any thread)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake already

    def _mark_dirty(self) -> None:
        for iova, length in self.direct.take_dirty():
            try:
                self.ctx.mark_dirty(iova, length)
            except OSError as exc:  # unmapped meanwhile: nothing left to log
                log.debug("dirty mark %#x+%#x dropped: %s", iova, length, exc)

    def _run_jobs(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        self._mark_dirty()
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
        self._socket.acquire()
        try:
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
        finally:
            self._socket.release()
        self._fail_jobs()

    def _step(self) -> None:
        if not self._attached and not self._refused:
            try:
                # accepts and reads VERSION (blocking: a silent client stalls us,
                # as it stalls libvfio-user's own samples)
                self.ctx.attach()
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # the library closed the bad client
                    log.info("client refused at VERSION: %s", exc)
                return
            if not self._permitted():
                self._refused = True  # the next run() sees it gone
                return
            self._attached = True
            self.device.attach(_Context(self))
            self._give_irq_fds()
            self._notify("client connected")
            return
        try:
            self.ctx.run()
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                self._refused = False
            elif exc.errno not in (errno.EAGAIN, errno.EINTR):  # EINTR: a signal, e.g. SIGTERM
                raise

    def _permitted(self) -> bool:
        """Check the client's uid; cut off one that is not allowed.

        The library already answered its VERSION; shutting the connection
        down makes the next ``vfu_run_ctx`` see it gone (ENOTCONN), and the
        library then waits for the next client.
        """
        if self.allowed_uids is None:
            return True
        conn = socket.socket(fileno=os.dup(self.ctx.poll_fd()))
        try:
            cred = peer_credentials(conn)
            if cred is None or cred.uid in self.allowed_uids:
                return True
            log.warning("refusing client pid %d uid %d", cred.pid, cred.uid)
            conn.shutdown(socket.SHUT_RDWR)
            return False
        finally:
            conn.close()

    def _notify(self, state: str) -> None:
        if self.on_state is not None:
            self.on_state(state)

    def _fail_jobs(self) -> None:
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
        for _, fut in jobs:
            fut.set_exception(ConnectionError("libvfio-user engine stopped"))

    def stop(self) -> None:
        """Make :meth:`serve` return (from any thread)."""
        self._stopping = True
        self.wake()

    def close(self) -> None:
        """After :meth:`serve` returned: destroy the context (unlinks the socket)."""
        self.ctx.destroy()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _adopting_context(listener: socket.socket) -> Context:
    """A nonblocking Context that accepts on ``listener`` instead of its own socket.

    See the module docstring: the library binds a private path, then its
    listening descriptor is replaced by a duplicate of ``listener``'s.
    """
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        raise ValueError("libvfio-user serves UNIX stream sockets only "
                         f"(got {listener.family.name}/{listener.type.name})")
    tmp = tempfile.mkdtemp(prefix="xdev-lvu-")
    try:
        ctx = Context(os.path.join(tmp, "unused.sock"), nonblocking=True)
        try:
            # O_NONBLOCK lives in the open file description dup2 shares: the
            # library opened its own socket nonblocking (ATTACH_NB) and
            # expects accept() to say EAGAIN
            listener.setblocking(False)
            os.dup2(listener.fileno(), ctx.poll_fd(), inheritable=False)
        except BaseException:
            ctx.destroy()
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ctx


class LvuServer:
    """:class:`LvuEngine` behind the native :class:`~xdevproto.server.Server`'s
    face (``serve(listener)``, ``stop()``, ``on_state``), for the daemons."""

    def __init__(self, device: Device, *, allowed_uids: Iterable[int] | None = None) -> None:
        self.device = device
        self.allowed_uids = allowed_uids
        self.on_state: Callable[[str], None] | None = None
        self._engine: LvuEngine | None = None
        self._stopped = False
        # re-entrant: stop() runs in signal handlers, maybe while serve() holds it
        self._lock = threading.RLock()

    def serve(self, listener: socket.socket) -> None:
        """Serve clients on ``listener`` until :meth:`stop`."""
        engine = LvuEngine(self.device, listener=listener, allowed_uids=self.allowed_uids)
        engine.on_state = self.on_state
        with self._lock:
            self._engine = engine
            if self._stopped:
                engine.stop()
        try:
            if self.on_state is not None:
                self.on_state("waiting for a client")
            engine.serve()
        finally:
            with self._lock:
                self._engine = None
            engine.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._engine is not None:
                self._engine.stop()
