"""A libvfio-user context driven from Python (``vfu_ctx_t`` and its callbacks).

One :class:`Context` owns one ``vfu_ctx_t``: a listening UNIX socket that
serves one vfio-user client at a time. The set-up order is the library's:
create, ``pci_init``, regions/IRQs/DMA/reset/migration callbacks,
:meth:`Context.realize`, then :meth:`Context.attach` (accepts a client) and
:meth:`Context.run` (serves it until it leaves: ``OSError(ENOTCONN)``).

Threading: the library is not thread-safe. Callbacks run on the thread that
called :meth:`~Context.run`; :meth:`~Context.dma_read`,
:meth:`~Context.dma_write` and :meth:`~Context.irq_trigger` must be called
from that thread too (from inside a callback, or between runs). cffi drops
the GIL while C runs, so ``run`` in a worker thread does not block Python.

Callback errors: a callback that raises :class:`~xdevproto.errors.VfioUserError`
answers the client with its errno; any other exception is logged and answers
EIO. Nothing a client sends can make a callback crash the process (and
what escapes, such as KeyboardInterrupt, cffi reports and turns into the
callback's error value).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from xdevproto.errors import VfioUserError
from xdevproto.lvu import cdef
from xdevproto.lvu.cdef import IrqType, MigrState, PciType, RegionFlag, ResetType
from xdevproto.lvu.loader import ffi, load
from xdevproto.lvu.trampoline import make_callback

log = logging.getLogger("xdevproto.lvu")

RegionRead = Callable[[int, int], bytes]
"""``(offset, count) -> exactly count bytes``."""
RegionWrite = Callable[[int, bytes], None]
"""``(offset, data)``."""

# syslog levels libvfio-user logs with (LOG_ERR .. LOG_DEBUG)
_SYSLOG_TO_LOGGING = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL,
                      3: logging.ERROR, 4: logging.WARNING, 5: logging.INFO,
                      6: logging.INFO, 7: logging.DEBUG}
_LOG_DEBUG = 7


@dataclass(frozen=True)
class DmaInfo:
    """``vfu_dma_info_t``: one DMA region the client mapped (or unmapped).

    ``vaddr`` is 0 when the client passed no fd (then only message-based DMA,
    DMA_READ/DMA_WRITE, reaches it); ``prot`` uses ``mmap.PROT_*`` bits.
    """

    iova: int
    length: int
    vaddr: int
    mapping_base: int
    mapping_length: int
    page_size: int
    prot: int


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, VfioUserError):
        return exc.errno
    log.exception("libvfio-user callback raised", exc_info=exc)
    return errno.EIO


def _fail(exc: BaseException) -> int:
    """Return -1 with errno set: cffi hands ffi.errno back to C on return."""
    ffi.errno = _errno_of(exc)
    return -1


class Context:
    """One ``vfu_ctx_t`` listening on ``socket_path`` (which must not exist yet)."""

    def __init__(self, socket_path: str | os.PathLike[str], *, nonblocking: bool = False,
                 log_level: int = logging.INFO) -> None:
        self._lib = load()
        self._keep: list[Any] = []  # cffi callbacks and buffers C holds pointers to
        self._cfg_size = 0
        self._sg_size = int(self._lib.dma_sg_size())
        flags = cdef.FLAG_ATTACH_NB if nonblocking else 0
        path = os.fsencode(socket_path)
        ctx = self._lib.vfu_create_ctx(cdef.TRANS_SOCK, path, flags, ffi.NULL,
                                       cdef.DEV_TYPE_PCI)
        if ctx == ffi.NULL:
            raise self._oserror(f"vfu_create_ctx({socket_path!s})")
        self._ctx: Any = ctx
        self._setup_log(log_level)

    # -- plumbing -----------------------------------------------------------------

    @staticmethod
    def _oserror(what: str) -> OSError:
        code = ffi.errno
        return OSError(code, f"{what}: {os.strerror(code)}")

    def _check(self, ret: int, what: str) -> int:
        if ret < 0:
            raise self._oserror(what)
        return ret

    @property
    def _c(self) -> Any:
        if self._ctx is None:
            raise ValueError("libvfio-user context already destroyed")
        return self._ctx

    def _callback(self, ctype: str, fn: Callable[..., Any], error: int | None = -1) -> Any:
        cb, keep = make_callback(ctype, fn, error)  # ctypes where W+X memory is refused
        self._keep.append(keep)
        return cb

    def _setup_log(self, level: int) -> None:
        def on_log(_ctx: Any, lvl: int, msg: Any) -> None:
            log.log(_SYSLOG_TO_LOGGING.get(lvl, logging.DEBUG), "%s",
                    ffi.string(msg).decode(errors="replace").rstrip())

        # ask the library for everything our logger would print
        syslog_level = _LOG_DEBUG if level <= logging.DEBUG else 6
        cb = self._callback("vfu_log_fn_t *", on_log, error=None)
        self._check(self._lib.vfu_setup_log(self._c, cb, syslog_level), "vfu_setup_log")

    # -- PCI ------------------------------------------------------------------------

    def pci_init(self, pci_type: PciType = PciType.CONVENTIONAL, header_type: int = 0,
                 revision: int = 0) -> None:
        """``vfu_pci_init``: the library then emulates config space (header, BARs, caps)."""
        self._check(self._lib.vfu_pci_init(self._c, pci_type, header_type, revision),
                    "vfu_pci_init")
        self._cfg_size = (cdef.PCI_CFG_SPACE_SIZE if pci_type == PciType.CONVENTIONAL
                          else cdef.PCI_CFG_SPACE_EXP_SIZE)

    def pci_set_id(self, vendor: int, device: int, subsys_vendor: int = 0,
                   subsys: int = 0) -> None:
        self._lib.vfu_pci_set_id(self._c, vendor, device, subsys_vendor, subsys)

    def pci_set_class(self, base: int, sub: int, prog_if: int = 0) -> None:
        self._lib.vfu_pci_set_class(self._c, base, sub, prog_if)

    def _config(self) -> Any:
        if not self._cfg_size:
            raise ValueError("call pci_init() before touching config space")
        return ffi.buffer(self._lib.vfu_pci_get_config_space(self._c), self._cfg_size)

    def read_config(self, offset: int, count: int) -> bytes:
        """Bytes of the config space the library keeps (``vfu_pci_get_config_space``)."""
        buf = self._config()
        if offset < 0 or count < 0 or offset + count > len(buf):
            raise ValueError(f"config read {offset:#x}+{count} outside {len(buf):#x} bytes")
        return bytes(buf[offset:offset + count])

    def write_config(self, offset: int, data: bytes) -> None:
        """Preset config space bytes (e.g. the header) before :meth:`realize`."""
        buf = self._config()
        if offset < 0 or offset + len(data) > len(buf):
            raise ValueError(f"config write {offset:#x}+{len(data)} outside {len(buf):#x} bytes")
        buf[offset:offset + len(data)] = data

    def add_capability(self, data: bytes, pos: int = 0, flags: int = 0) -> int:
        """``vfu_pci_add_capability``: returns the capability's config offset.

        ``data`` is the capability structure, ID first; the library takes its
        length from the ID, so the copy handed to C is zero-padded to 4 KiB
        to keep a short ``data`` from being over-read. ``pos`` 0 lets the
        library choose.
        """
        buf = ffi.new("uint8_t[]", max(len(data), cdef.PCI_CFG_SPACE_EXP_SIZE))
        ffi.memmove(buf, data, len(data))
        return self._check(self._lib.vfu_pci_add_capability(self._c, pos, flags, buf),
                           "vfu_pci_add_capability")

    # -- regions --------------------------------------------------------------------

    def setup_region(self, index: int, size: int, *, read: RegionRead | None = None,
                     write: RegionWrite | None = None, flags: int = RegionFlag.RW,
                     mmap_areas: Sequence[tuple[int, int]] = (), fd: int = -1,
                     fd_offset: int = 0) -> None:
        """``vfu_setup_region``.

        ``read``/``write`` serve REGION_READ/REGION_WRITE (vfio-user §4.9); a
        missing one answers EINVAL for that direction. Without either, the
        region needs ``fd`` (the client then mmaps it). ``mmap_areas`` are
        the sparse ``(offset, size)`` areas of ``fd`` the client may map.
        BAR sizes must be powers of two (libvfio-user refuses others).
        """
        cb: Any = ffi.NULL
        if read is not None or write is not None:
            cb = self._callback("vfu_region_access_cb_t *", self._access_cb(index, read, write))
        areas: Any = ffi.NULL
        if mmap_areas:
            areas = ffi.new("struct iovec[]", len(mmap_areas))
            for i, (off, length) in enumerate(mmap_areas):
                areas[i].iov_base = ffi.cast("void *", off)
                areas[i].iov_len = length
            self._keep.append(areas)
        self._check(self._lib.vfu_setup_region(self._c, index, size, cb, int(flags), areas,
                                               len(mmap_areas), fd, fd_offset),
                    f"vfu_setup_region({index})")

    @staticmethod
    def _access_cb(index: int, read: RegionRead | None,
                   write: RegionWrite | None) -> Callable[..., int]:
        def access(_ctx: Any, buf: Any, count: int, offset: int, is_write: bool) -> int:
            try:
                if is_write:
                    if write is None:
                        raise VfioUserError(f"region {index} is read-only", errno.EINVAL)
                    write(offset, ffi.buffer(buf, count)[:])
                else:
                    if read is None:
                        raise VfioUserError(f"region {index} is write-only", errno.EINVAL)
                    data = read(offset, count)
                    if len(data) != count:
                        raise VfioUserError(f"region {index} read gave {len(data)} of "
                                            f"{count} bytes", errno.EIO)
                    ffi.memmove(buf, data, count)
            except Exception as exc:
                return _fail(exc)
            return count
        return access

    # -- interrupts -----------------------------------------------------------------

    def setup_irqs(self, irq_type: IrqType, count: int) -> None:
        """``vfu_setup_device_nr_irqs`` (GET_IRQ_INFO answers with ``count``)."""
        self._check(self._lib.vfu_setup_device_nr_irqs(self._c, irq_type, count),
                    f"vfu_setup_device_nr_irqs({irq_type.name})")

    def on_irq_state(self, irq_type: IrqType, fn: Callable[[int, int, bool], None]) -> None:
        """``vfu_setup_irq_state_callback``: ``fn(start, count, masked)`` on MASK/UNMASK."""
        def state(_ctx: Any, start: int, count: int, mask: bool) -> None:
            try:
                fn(start, count, bool(mask))
            except Exception as exc:
                _errno_of(exc)
        cb = self._callback("vfu_dev_irq_state_cb_t *", state, error=None)
        self._check(self._lib.vfu_setup_irq_state_callback(self._c, irq_type, cb),
                    "vfu_setup_irq_state_callback")

    def irq_trigger(self, subindex: int = 0) -> None:
        """``vfu_irq_trigger``: signal the eventfd the client set for this vector.

        Which IRQ type fires is the library's choice: the one the client
        enabled with SET_IRQS.
        """
        self._check(self._lib.vfu_irq_trigger(self._c, subindex), "vfu_irq_trigger")

    # -- DMA ------------------------------------------------------------------------

    def setup_dma(self, register: Callable[[DmaInfo], None] | None = None,
                  unregister: Callable[[DmaInfo], None] | None = None,
                  max_regions: int = cdef.MAX_DMA_REGIONS) -> None:
        """``vfu_setup_device_dma``: accept DMA_MAP/DMA_UNMAP; callbacks are told of each."""
        def wrap(fn: Callable[[DmaInfo], None] | None) -> Any:
            if fn is None:
                return ffi.NULL

            def cb(_ctx: Any, info: Any) -> None:
                try:
                    fn(_dma_info(info))
                except Exception as exc:
                    _errno_of(exc)
            return self._callback("vfu_dma_register_cb_t *", cb, error=None)
        self._check(self._lib.vfu_setup_device_dma(self._c, max_regions, wrap(register),
                                                   wrap(unregister)), "vfu_setup_device_dma")

    def _sgl(self, iova: int, length: int, prot: int) -> tuple[Any, Any, int]:
        """``vfu_addr_to_sgl``: (owner, ``dma_sg_t *``, entries).

        The caller must hold ``owner`` (the cffi allocation) while it uses the
        pointer: a cast does not keep the memory alive.
        """
        n = 1
        while True:
            owner = ffi.new("char[]", self._sg_size * n)
            sg = ffi.cast("dma_sg_t *", owner)
            got = self._lib.vfu_addr_to_sgl(self._c, ffi.cast("vfu_dma_addr_t", iova), length,
                                            sg, n, prot)
            if got >= 0:
                return owner, sg, got
            if got == -1:
                raise self._oserror(f"vfu_addr_to_sgl({iova:#x}+{length:#x})")
            n = -got - 1  # the library says how many entries it needs

    def dma_read(self, iova: int, length: int) -> bytes:
        """Read guest memory: direct when mapped with an fd, else a DMA_READ message.

        ``VFU_SGL_DIRECT_ACCESS`` is what makes fd-mapped memory direct: without
        it the library sends messages for every region (lib/libvfio-user.c,
        vfu_dma_transfer).
        """
        owner, sg, n = self._sgl(iova, length, mmap.PROT_READ)
        buf = ffi.new("char[]", length)
        self._check(self._lib.vfu_sgl_read(self._c, sg, n, buf, cdef.SGL_DIRECT_ACCESS),
                    "vfu_sgl_read")
        del owner  # alive until here
        return ffi.buffer(buf, length)[:]

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write guest memory: direct when mapped with an fd (the library then
        marks the pages dirty while logging is on), else a DMA_WRITE message."""
        owner, sg, n = self._sgl(iova, len(data), mmap.PROT_WRITE)
        buf = ffi.from_buffer(data)
        self._check(self._lib.vfu_sgl_write(self._c, sg, n, ffi.cast("void *", buf),
                                            cdef.SGL_DIRECT_ACCESS), "vfu_sgl_write")
        del owner  # alive until here

    def mark_dirty(self, iova: int, length: int) -> None:
        """``vfu_sgl_mark_dirty``: log a write the caller made to a mapped region
        itself (a no-op in the library while dirty logging is off)."""
        owner, sg, n = self._sgl(iova, length, mmap.PROT_WRITE)
        self._lib.vfu_sgl_mark_dirty(self._c, sg, n)
        del owner  # alive until here

    # -- reset, quiesce, migration --------------------------------------------------

    def on_reset(self, fn: Callable[[ResetType], None]) -> None:
        """``vfu_setup_device_reset_cb``: DEVICE_RESET, FLR, or the client gone (LOST_CONN)."""
        def reset(_ctx: Any, kind: int) -> int:
            try:
                fn(ResetType(kind))
            except Exception as exc:
                return _fail(exc)
            return 0
        self._check(self._lib.vfu_setup_device_reset_cb(
            self._c, self._callback("vfu_reset_cb_t *", reset)), "vfu_setup_device_reset_cb")

    def on_quiesce(self, fn: Callable[[], bool]) -> None:
        """``vfu_setup_device_quiesce_cb``: ``fn()`` returns True once quiesced.

        The library asks before DMA_MAP, DMA_UNMAP, DEVICE_RESET, migration
        state changes and writes to the PCIe capability. False means "busy"
        (EBUSY to the library): :meth:`run` then raises ``OSError(EBUSY)``
        until :meth:`quiesced` is called (which executes the held request).
        Without a quiesce callback the library assumes quiesced.
        """
        def quiesce(_ctx: Any) -> int:
            try:
                if fn():
                    return 0
                ffi.errno = errno.EBUSY
                return -1
            except Exception as exc:
                return _fail(exc)
        self._lib.vfu_setup_device_quiesce_cb(self._c,
                                              self._callback("vfu_device_quiesce_cb_t *", quiesce))

    def quiesced(self, error: int = 0) -> None:
        """``vfu_device_quiesced``: finish a quiesce that ``on_quiesce``'s callback deferred."""
        self._check(self._lib.vfu_device_quiesced(self._c, error), "vfu_device_quiesced")

    def setup_migration(self, transition: Callable[[MigrState], None],
                        read_data: Callable[[int], bytes],
                        write_data: Callable[[bytes], None]) -> None:
        """``vfu_setup_device_migration_callbacks`` (migration v2).

        ``read_data(n)`` returns at most n bytes, b"" when no data is left;
        ``write_data`` must take all it is given (the library has no partial writes).
        """
        def on_transition(_ctx: Any, state: int) -> int:
            try:
                transition(MigrState(state))
            except Exception as exc:
                return _fail(exc)
            return 0

        def on_read(_ctx: Any, buf: Any, count: int) -> int:
            try:
                data = read_data(count)
                if len(data) > count:
                    raise VfioUserError(f"migration read gave {len(data)} > {count}", errno.EIO)
                ffi.memmove(buf, data, len(data))
                return len(data)
            except Exception as exc:
                return _fail(exc)

        def on_write(_ctx: Any, buf: Any, count: int) -> int:
            try:
                write_data(ffi.buffer(buf, count)[:])
            except Exception as exc:
                return _fail(exc)
            return count

        cbs = ffi.new("vfu_migration_callbacks_t *")
        cbs.version = cdef.MIGR_CALLBACKS_VERS
        cbs.transition = self._callback("int (*)(vfu_ctx_t *, int)", on_transition)
        cbs.read_data = self._callback("ssize_t (*)(vfu_ctx_t *, void *, uint64_t)", on_read)
        cbs.write_data = self._callback("ssize_t (*)(vfu_ctx_t *, void *, uint64_t)", on_write)
        self._keep.append(cbs)
        self._check(self._lib.vfu_setup_device_migration_callbacks(self._c, cbs),
                    "vfu_setup_device_migration_callbacks")

    # -- life cycle -----------------------------------------------------------------

    def realize(self) -> None:
        """``vfu_realize_ctx``: set-up is over; config space BARs are now fixed."""
        self._check(self._lib.vfu_realize_ctx(self._c), "vfu_realize_ctx")

    def attach(self) -> None:
        """``vfu_attach_ctx``: accept a client (EAGAIN in nonblocking mode if none waits)."""
        self._check(self._lib.vfu_attach_ctx(self._c), "vfu_attach_ctx")

    def run(self) -> int:
        """``vfu_run_ctx``: serve requests.

        Blocking mode: returns only by raising, ``OSError(ENOTCONN)`` when the
        client left (attach again for the next one). Nonblocking mode: returns
        how many requests were served, EAGAIN when none was pending.
        """
        return self._check(self._lib.vfu_run_ctx(self._c), "vfu_run_ctx")

    def poll_fd(self) -> int:
        """``vfu_get_poll_fd``: the listening fd before attach, the client's after."""
        return self._check(self._lib.vfu_get_poll_fd(self._c), "vfu_get_poll_fd")

    def destroy(self) -> None:
        """``vfu_destroy_ctx``: closes the sockets and unlinks the socket path.

        The library calls the reset callback (LOST_CONN) here too, even with
        no client attached: reset handlers must tolerate a repeat.
        """
        if self._ctx is not None:
            self._lib.vfu_destroy_ctx(self._ctx)
            self._ctx = None
            self._keep.clear()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *_: object) -> None:
        self.destroy()


def _dma_info(info: Any) -> DmaInfo:
    return DmaInfo(iova=int(ffi.cast("uintptr_t", info.iova.iov_base)),
                   length=int(info.iova.iov_len),
                   vaddr=int(ffi.cast("uintptr_t", info.vaddr)),
                   mapping_base=int(ffi.cast("uintptr_t", info.mapping.iov_base)),
                   mapping_length=int(info.mapping.iov_len),
                   page_size=int(info.page_size), prot=int(info.prot))
