"""Guest memory as a device sees it: DMA through the client's mappings.

:class:`GuestMemory` keeps the regions the client gave with DMA_MAP. A
region with an fd is mmap'ed once and read or written in place (zero-copy
memoryviews; :meth:`GuestMemory.preadv` / :meth:`GuestMemory.pwritev` move
file data straight into or out of guest memory). A region without an fd is
reached through DMA_READ/DMA_WRITE messages on the
:class:`~xdevproto.device.DeviceContext`, chunked by ``max_data_xfer_size``
(vfio-user spec, "DMA Read" / "DMA Write").

Every access is checked against the current mappings: it may span adjacent
regions when all of it is mapped; anything else raises :class:`DmaError`
(errno EFAULT), which the device turns into its own error status.

Unmap waits for in-flight DMA: accesses hold a use count on the regions they
touch, and :meth:`GuestMemory.unmap` removes the region from lookup first and
then waits until its count drops to zero (vfio-user spec, "DMA Unmap": the
server must not touch the region after it replies).

Dirty-page logging (DMA_LOGGING_START/REPORT) marks pages written through a
mapped fd; writes sent as DMA_WRITE messages are the client's to track.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from ..device import DeviceContext, DmaRegion
from ..errors import DeviceError, VfioUserError

#: copies up to this size are made under the table lock instead of pinning
FAST_COPY_MAX = 64 << 10

T = TypeVar("T")
A = TypeVar("A")


class DmaError(DeviceError):
    """A DMA address the device may not reach (unmapped, read-only, out of range)."""

    errno = errno.EFAULT


class WouldBlock(Exception):
    """Inside :meth:`GuestMemory.nowait`: the access needs a DMA message or
    file data that is not in the page cache. Nothing the caller relies on has
    happened; retry on a worker (a read may have filled part of its buffer)."""


@dataclass(eq=False)
class _Mapped:
    region: DmaRegion
    mem: mmap.mmap | None
    view: memoryview | None
    users: int = 0
    gone: bool = False
    dirty: bytearray | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)
    # copies of region fields, read on the fast path
    iova: int = 0
    size: int = 0
    end: int = 0
    readable: bool = False
    writable: bool = False

    def __post_init__(self) -> None:
        self.iova, self.size = self.region.iova, self.region.size
        self.end = self.iova + self.size
        self.readable, self.writable = self.region.readable, self.region.writable


@dataclass(slots=True)
class _Piece:
    """The part of one access that falls into one region."""

    entry: _Mapped
    offset: int  # into the region
    length: int
    pos: int  # into the access
    pinned: bool = False

    @property
    def iova(self) -> int:
        return self.entry.region.iova + self.offset

    def done(self) -> None:
        """Release the region (idempotent)."""
        if not self.pinned:
            return
        self.pinned = False
        entry = self.entry
        with entry.cond:
            entry.users -= 1
            if entry.users == 0 and entry.gone:
                entry.cond.notify_all()


#: Most iovecs one preadv/pwritev takes (Linux UIO_MAXIOV).
IOV_MAX = 1024


#: statfs f_type of file systems that keep file data in memory: tmpfs, ramfs.
_MEMORY_FS = frozenset((0x01021994, 0x858458F6))
_LIBC = ctypes.CDLL(None, use_errno=True)


def in_memory_fs(fd: int) -> bool:
    """Whether ``fd``'s file lives on tmpfs or ramfs (``fstatfs``), where a
    read waits on no disk although RWF_NOWAIT is refused. Asked only after
    such a refusal, so file systems that take the flag never pay for it."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on x86-64
    if _LIBC.fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _MEMORY_FS  # f_type, the first field


class _NoWait:
    """The context of :meth:`GuestMemory.nowait`."""

    __slots__ = ("_tls",)

    def __init__(self, tls: threading.local) -> None:
        self._tls = tls

    def __enter__(self) -> None:
        self._tls.nowait = True

    def __exit__(self, *_exc: object) -> None:
        self._tls.nowait = False


@dataclass(frozen=True, slots=True)
class SgEntry:
    """One scatter-gather element: ``length`` bytes at guest address ``addr``."""

    addr: int
    length: int


class GuestMemory:
    """The device's view of guest memory (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tls = threading.local()  # per-thread: inside nowait()
        self._starts: list[int] = []
        self._regions: list[_Mapped] = []
        self.ctx: DeviceContext | None = None
        self._log_page: int | None = None
        #: accesses waiting for a DMA message answer (see PciDevice.reset)
        self.in_message = 0

    # -- mapping (called from the runtime thread) ----------------------------------------
    def map(self, region: DmaRegion) -> None:
        """Take ``region`` (and ownership of its fd) into use."""
        mem = view = None
        if region.fd is not None:
            try:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if region.writable else 0)
                mem = mmap.mmap(region.fd, region.size + region.fd_offset, prot=prot)
                view = memoryview(mem)[region.fd_offset:region.fd_offset + region.size]
            except (OSError, ValueError, OverflowError) as exc:
                raise DmaError(f"cannot map DMA fd: {exc}", errno.EINVAL) from None
            finally:
                os.close(region.fd)
        entry = _Mapped(region, mem, view)
        with self._lock:
            i = bisect.bisect(self._starts, region.iova)
            if self._log_page is not None:
                entry.dirty = bytearray(_bitmap_len(region.size, self._log_page))
            self._starts.insert(i, region.iova)
            self._regions.insert(i, entry)

    def unmap(self, region: DmaRegion) -> None:
        """Remove ``region``; returns once no access uses it any more."""
        with self._lock:
            for i, entry in enumerate(self._regions):
                if entry.region.iova == region.iova and entry.region.size == region.size:
                    del self._regions[i]
                    del self._starts[i]
                    break
            else:
                return
        with entry.cond:
            entry.gone = True
            entry.cond.wait_for(lambda: entry.users == 0)
        if entry.view is not None:
            entry.view.release()
        if entry.mem is not None:
            entry.mem.close()

    def unmap_all(self) -> None:
        for entry in list(self._regions):
            self.unmap(entry.region)

    # -- lookup ----------------------------------------------------------------------------
    @contextmanager
    def _pin(self, addr: int, length: int, write: bool) -> Iterator[list[_Piece]]:
        """The pieces covering [addr, addr+length), fd-mapped ones in use.

        Each fd-mapped piece is released by :meth:`_Piece.done` as soon as it
        was copied, so that an access never holds a region while it waits for
        a DMA message (the runtime thread that answers it may be the one
        waiting in unmap). Message pieces are not pinned: once unmapped, the
        client refuses them.
        """
        pieces: list[_Piece] = []
        with self._lock:
            self._cover(addr, length, write, 0, pieces)
        try:
            yield pieces
        finally:
            for piece in pieces:
                piece.done()

    @contextmanager
    def _pin_sg(self, sg: Sequence[SgEntry], write: bool) -> Iterator[list[_Piece]]:
        """The pieces of a whole scatter-gather list, for one system call: one
        lock, and each fd-mapped region it touches pinned once for the whole
        call rather than per piece (a disk command's list can hold hundreds
        of entries). ``pos`` counts from the start of the list; do not call
        :meth:`_Piece.done` on these."""
        pieces: list[_Piece] = []
        used: list[_Mapped] = []
        try:
            with self._lock:
                pos = 0
                for e in sg:
                    self._cover(e.addr, e.length, write, pos, pieces, pin=False)
                    pos += e.length
                for entry in {id(p.entry): p.entry for p in pieces}.values():
                    if entry.view is not None:
                        entry.users += 1
                        used.append(entry)
            yield pieces
        finally:
            for entry in used:
                with entry.cond:
                    entry.users -= 1
                    if entry.users == 0 and entry.gone:
                        entry.cond.notify_all()

    def _cover(self, addr: int, length: int, write: bool, base: int,
               pieces: list[_Piece], pin: bool = True) -> None:
        """Append the pieces of [addr, addr+length) to ``pieces``, pinning the
        fd-mapped ones if ``pin`` (``_lock`` held); all or nothing is appended."""
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise DmaError(f"DMA address {addr:#x}+{length} out of range")
        first = len(pieces)
        i = bisect.bisect(self._starts, addr) - 1
        pos, end = addr, addr + length
        while pos < end or len(pieces) == first:
            if i < 0 or i >= len(self._regions):
                del pieces[first:]
                raise DmaError(f"DMA to unmapped {pos:#x} ({addr:#x}+{length})")
            entry = self._regions[i]
            if not entry.iova <= pos < entry.end and not (pos == end == entry.end):
                del pieces[first:]
                raise DmaError(f"DMA to unmapped {pos:#x} ({addr:#x}+{length})")
            if not (entry.writable if write else entry.readable):
                del pieces[first:]
                raise DmaError(f"DMA {'write' if write else 'read'} denied at {pos:#x}")
            n = min(end, entry.end) - pos
            pieces.append(_Piece(entry, pos - entry.iova, n, base + pos - addr))
            pos += n
            i += 1
        if pin:
            for piece in pieces[first:]:
                if piece.entry.view is not None:
                    piece.entry.users += 1
                    piece.pinned = True

    def _context(self) -> DeviceContext:
        if self.ctx is None:
            raise DmaError("no client attached for message DMA", errno.ENOTCONN)
        return self.ctx

    # -- accesses ----------------------------------------------------------------------------
    def _region(self, addr: int, length: int) -> _Mapped | None:
        """The region holding all of [addr, addr+length), if one does
        (``_lock`` held)."""
        i = bisect.bisect(self._starts, addr) - 1
        if i < 0 or length < 0:
            return None
        e = self._regions[i]
        return e if addr + length <= e.end else None

    def _fast(self, addr: int, length: int) -> _Mapped | None:
        """:meth:`_region` for a short access; callers copy at once if it is
        fd-mapped.

        Call with ``_lock`` held: a copy made under it needs no pin, since
        unmap takes the lock to remove the region.
        """
        return self._region(addr, length) if length <= FAST_COPY_MAX else None

    def _direct(self, e: _Mapped | None, length: int, write: bool) -> DeviceContext | None:
        """The context, when region ``e`` (from :meth:`_fast`) has no fd,
        allows the access and the runtime reaches guest memory itself
        (``ctx.direct``): a short access (a command header, a FIS) then goes
        straight to it in one call, without the pieces and accounting a DMA
        message needs (it never waits on the peer). Call with ``_lock`` held."""
        ctx = self.ctx
        if e is None or e.view is not None or ctx is None or not ctx.direct \
                or not (e.writable if write else e.readable) \
                or length > ctx.max_data_xfer_size:
            return None
        return ctx

    def _direct_sg(self, sg: Sequence[SgEntry], write: bool) -> DeviceContext | None:
        """:meth:`_direct` for a scatter-gather list (one ``file_io`` call, no
        size limit): the context when every entry lies in one such region."""
        ctx = None
        with self._lock:
            for e in sg:
                ctx = self._direct(self._region(e.addr, e.length), 0, write)
                if ctx is None:
                    return None
        return ctx

    @staticmethod
    def _ask(fn: Callable[[int, A], T], addr: int, arg: A) -> T:
        """The runtime's dma_read/dma_write; a refusal becomes a DmaError the
        device can report."""
        try:
            return fn(addr, arg)
        except DmaError:
            raise
        except VfioUserError as exc:
            raise DmaError(f"DMA through the runtime failed: {exc}",
                           exc.errno or errno.EFAULT) from None

    @staticmethod
    def _whole(data: bytes, addr: int, length: int) -> bytes:
        if len(data) != length:
            raise DmaError(f"DMA read at {addr:#x} returned {len(data)} of {length} bytes")
        return data

    def read(self, addr: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory at ``addr``."""
        with self._lock:
            e = self._fast(addr, length)
            if e is not None and e.readable and e.view is not None:
                off = addr - e.iova
                return e.view[off:off + length].tobytes()
            direct = self._direct(e, length, False)
        if direct is not None:
            return self._whole(self._ask(direct.dma_read, addr, length), addr, length)
        buf = bytearray(length)
        self.readinto(addr, buf)
        return bytes(buf)

    def readinto(self, addr: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` from guest memory at ``addr``."""
        out = memoryview(buf).cast("B")
        with self._lock:
            e = self._fast(addr, len(out))
            if e is not None and e.readable and e.view is not None:
                off = addr - e.iova
                out[:] = e.view[off:off + len(out)]
                return
            direct = self._direct(e, len(out), False)
        if direct is not None:
            out[:] = self._whole(self._ask(direct.dma_read, addr, len(out)), addr, len(out))
            return
        with self._pin(addr, len(out), False) as pieces:
            for p in pieces:
                dst = out[p.pos:p.pos + p.length]
                if p.entry.view is not None:
                    dst[:] = p.entry.view[p.offset:p.offset + p.length]
                    p.done()
                else:
                    self._msg_read(p.iova, dst)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` into guest memory at ``addr``."""
        src = memoryview(data).cast("B")
        with self._lock:
            e = self._fast(addr, len(src))
            if e is not None and e.writable and e.view is not None:
                off = addr - e.iova
                e.view[off:off + len(src)] = src
                if e.dirty is not None:
                    self._mark(e, off, len(src))
                return
            direct = self._direct(e, len(src), True)
        if direct is not None:
            self._ask(direct.dma_write, addr, src)
            return
        with self._pin(addr, len(src), True) as pieces:
            for p in pieces:
                chunk = src[p.pos:p.pos + p.length]
                if p.entry.view is not None:
                    p.entry.view[p.offset:p.offset + p.length] = chunk
                    self._mark(p.entry, p.offset, p.length)
                    p.done()
                else:
                    self._msg_write(p.iova, chunk)

    def _msg_read(self, iova: int, out: memoryview) -> None:
        ctx = self._context()
        step = max(1, ctx.max_data_xfer_size)
        for pos in range(0, len(out), step):
            n, at = min(step, len(out) - pos), iova + pos
            out[pos:pos + n] = self._whole(self._message(ctx.dma_read, at, n), at, n)

    def _msg_write(self, iova: int, src: memoryview) -> None:
        ctx = self._context()
        step = max(1, ctx.max_data_xfer_size)
        for pos in range(0, len(src), step):
            self._message(ctx.dma_write, iova + pos, src[pos:pos + step])

    def nowait(self) -> _NoWait:
        """Accesses in this thread raise :class:`WouldBlock` rather than wait
        on a peer (DMA messages) or a disk (file data not in the page cache,
        or any write to a file). A device uses it to finish short work on
        the thread that took the request, without a hand-over to a worker,
        and only where every such wait can be left to a worker instead.
        (A plain context manager class: this is on every command's path.)"""
        return _NoWait(self._tls)

    @property
    def may_wait(self) -> bool:
        """False inside :meth:`nowait` in this thread."""
        return not getattr(self._tls, "nowait", False)

    def _message(self, fn: Callable[[int, A], T], addr: int, arg: A) -> T:
        """One DMA message; a refusal becomes a DmaError the device can report."""
        if not self.may_wait and not (self.ctx and self.ctx.direct):
            raise WouldBlock("message DMA")
        with self._lock:
            self.in_message += 1
        try:
            return self._ask(fn, addr, arg)
        finally:
            with self._lock:
                self.in_message -= 1

    @contextmanager
    def view(self, addr: int, length: int, write: bool = False) -> Iterator[memoryview]:
        """A zero-copy memoryview of guest memory, usable inside the ``with``.

        Only for a range inside one fd-mapped region (DmaError otherwise); a
        writable view marks its pages dirty. Unmap waits while it is open.
        """
        with self._pin(addr, length, write) as pieces:
            p = pieces[0]
            if len(pieces) != 1 or p.entry.view is None:
                raise DmaError(f"{addr:#x}+{length} is not in one fd-mapped region")
            v = p.entry.view[p.offset:p.offset + p.length]
            try:
                yield v
            finally:
                v.release()
                if write:
                    self._mark(p.entry, p.offset, p.length)

    # -- scatter-gather --------------------------------------------------------------------
    def read_sg(self, sg: Sequence[SgEntry]) -> bytes:
        """Gather the bytes of every element, in order."""
        buf = bytearray(sum(e.length for e in sg))
        pos = 0
        for e in sg:
            self.readinto(e.addr, memoryview(buf)[pos:pos + e.length])
            pos += e.length
        return bytes(buf)

    def write_sg(self, sg: Sequence[SgEntry], data: bytes | memoryview) -> int:
        """Scatter ``data`` over the elements; returns the bytes stored."""
        src = memoryview(data).cast("B")
        pos = 0
        for e in sg:
            if pos >= len(src):
                break
            n = min(e.length, len(src) - pos)
            self.write(e.addr, src[pos:pos + n])
            pos += n
        return pos

    def preadv(self, fd: int, sg: Sequence[SgEntry], offset: int) -> int:
        """Read file ``fd`` at ``offset`` straight into guest memory (disk reads).

        When every piece is fd-mapped (the common case) a whole list goes in
        one ``os.preadv`` over memoryviews of the mappings, IOV_MAX entries
        at a time; otherwise each entry is done on its own, message pieces
        through a bounce buffer. Returns the bytes read (short at end of
        file). OSError from the file propagates.
        """
        return self._file_io(fd, sg, offset, to_guest=True)

    def pwritev(self, fd: int, sg: Sequence[SgEntry], offset: int) -> int:
        """Write guest memory straight to file ``fd`` at ``offset`` (disk writes)."""
        return self._file_io(fd, sg, offset, to_guest=False)

    def _file_io(self, fd: int, sg: Sequence[SgEntry], offset: int, to_guest: bool) -> int:
        if not self.may_wait:
            return self._file_io_nowait(fd, sg, offset, to_guest)
        total = 0
        # Half of IOV_MAX entries per call leaves room for entries that
        # cross from one DMA region into the next (two iovecs each).
        step = IOV_MAX // 2
        for start in range(0, len(sg), step):
            chunk = sg[start:start + step]
            want = sum(e.length for e in chunk)
            done = self._batched(fd, chunk, offset + total, to_guest)
            if done is None:
                done = self._one_by_one(fd, chunk, offset + total, to_guest)
            total += done
            if done < want:
                break
        return total

    def _file_io_nowait(self, fd: int, sg: Sequence[SgEntry], offset: int,
                        to_guest: bool) -> int:
        """A read that the page cache answers whole, in one ``preadv`` with
        RWF_NOWAIT; anything else raises WouldBlock (writes, message pieces,
        data not cached, file systems without RWF_NOWAIT)."""
        want = sum(e.length for e in sg)
        if not to_guest or len(sg) > IOV_MAX // 2:
            raise WouldBlock("file I/O")
        try:
            done = self._batched(fd, sg, offset, to_guest, os.RWF_NOWAIT)
        except OSError as exc:  # EAGAIN: not cached; EOPNOTSUPP/EINVAL: no RWF_NOWAIT here
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and in_memory_fs(fd):
                # tmpfs refuses the flag, yet its data is memory: no disk to wait on.
                done = self._batched(fd, sg, offset, to_guest)
            elif exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
                raise WouldBlock("file data not in the page cache") from None
            else:
                raise
        if done is None or (done < want and done != self._file_left(fd, offset, want)):
            raise WouldBlock("file data partly cached")
        return done

    @staticmethod
    def _file_left(fd: int, offset: int, want: int) -> int:
        """The bytes a read of ``want`` at ``offset`` finds before end of file."""
        return max(0, min(want, os.fstat(fd).st_size - offset))

    def _batched(self, fd: int, sg: Sequence[SgEntry], offset: int,
                 to_guest: bool, flags: int = 0) -> int | None:
        """One system call for ``sg`` if all of it is fd-mapped (or the
        runtime reaches all of it itself, see DeviceContext.file_io), else
        None (before any byte moved). ``flags`` as for ``os.preadv``."""
        direct = self._direct_sg(sg, to_guest)
        if direct is not None:
            return direct.file_io(fd, [(e.addr, e.length) for e in sg], offset, to_guest, flags)
        with self._pin_sg(sg, to_guest) as pieces:
            if any(p.entry.view is None for p in pieces):
                if self.ctx is None or any(p.entry.view is not None for p in pieces):
                    return None
                return self.ctx.file_io(fd, [(p.iova, p.length) for p in pieces], offset,
                                        to_guest, flags)
            if len(pieces) > IOV_MAX:
                return None
            views = [p.entry.view[p.offset:p.offset + p.length]  # type: ignore[index]
                     for p in pieces]
            try:
                done = (os.preadv(fd, views, offset, flags) if to_guest
                        else os.pwritev(fd, views, offset, flags))
            finally:
                for v in views:
                    v.release()
            if to_guest and self._log_page is not None:
                left = done
                for p in pieces:
                    if left <= 0:
                        break
                    self._mark(p.entry, p.offset, min(left, p.length))
                    left -= p.length
            return done

    def _one_by_one(self, fd: int, sg: Sequence[SgEntry], offset: int, to_guest: bool) -> int:
        total = 0
        for e in sg:
            with self._pin(e.addr, e.length, to_guest) as pieces:
                for p in pieces:
                    if p.entry.view is not None:
                        view = p.entry.view[p.offset:p.offset + p.length]
                        try:
                            if to_guest:
                                done = os.preadv(fd, [view], offset + total)
                                self._mark(p.entry, p.offset, done)
                            else:
                                done = os.pwritev(fd, [view], offset + total)
                        finally:
                            view.release()
                        p.done()
                    elif to_guest:
                        data = os.pread(fd, p.length, offset + total)
                        done = len(data)
                        self._msg_write(p.iova, memoryview(data))
                    else:
                        buf = bytearray(p.length)
                        self._msg_read(p.iova, memoryview(buf))
                        done = os.pwrite(fd, buf, offset + total)
                    total += done
                    if done < p.length:
                        return total
        return total

    # -- dirty-page logging ----------------------------------------------------------------
    def logging_start(self, page_size: int) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise DeviceError(f"page size {page_size} is not a power of two", errno.EINVAL)
        with self._lock:
            self._log_page = page_size
            for entry in self._regions:
                entry.dirty = bytearray(_bitmap_len(entry.region.size, page_size))

    def logging_stop(self) -> None:
        with self._lock:
            self._log_page = None
            for entry in self._regions:
                entry.dirty = None

    def _mark(self, entry: _Mapped, off: int, n: int) -> None:
        bitmap, page = entry.dirty, self._log_page
        if bitmap is None or page is None or n <= 0:
            return
        base = entry.region.iova // page
        addr = entry.region.iova + off
        for p in range(addr // page - base, (addr + n - 1) // page - base + 1):
            bitmap[p >> 3] |= 1 << (p & 7)

    def logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """Bitmap (u64 words, bit n = page n from ``iova``), cleared as reported."""
        if self._log_page is None:
            raise DeviceError("dirty logging is not on", errno.EINVAL)
        if page_size != self._log_page:
            raise DeviceError(f"page size {page_size} differs from logging's "
                              f"{self._log_page}", errno.EINVAL)
        if length <= 0 or iova % page_size:
            raise DeviceError("report range not page-aligned", errno.EINVAL)
        pages = -(-length // page_size)
        first = iova // page_size
        out = 0
        with self._lock:
            for entry in self._regions:
                if entry.dirty is None or entry.end <= iova or entry.region.iova >= iova + length:
                    continue
                base = entry.region.iova // page_size  # page number of the bitmap's bit 0
                bits = int.from_bytes(entry.dirty, "little")
                lo, hi = max(first, base), min(first + pages, base + len(entry.dirty) * 8)
                window = ((1 << (hi - lo)) - 1) << (lo - base)
                hit = bits & window
                if not hit:
                    continue
                out |= (hit >> (lo - base)) << (lo - first)
                entry.dirty[:] = (bits & ~window).to_bytes(len(entry.dirty), "little")
        return out.to_bytes(-(-pages // 64) * 8, "little")


def _bitmap_len(size: int, page: int) -> int:
    pages = -(-size // page) + 1  # +1: a region need not start on a page boundary
    return -(-pages // 8)
