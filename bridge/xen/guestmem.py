"""Guest RAM through foreign mappings, with a bounded cache.

Guest-physical memory is mapped in 1 MiB buckets (256 pages, the bucket
size QEMU's Xen mapcache uses on 64-bit hosts) with
``xenforeignmemory_map``; at most ``max_buckets`` stay mapped, least
recently used first out.  Xen sends ``IOREQ_TYPE_INVALIDATE`` when the
guest's physmap shrinks (ballooning), and :meth:`GuestMemory.invalidate`
then drops every mapping.

Pages Xen refused to map (holes, MMIO, unpopulated) are remembered per
bucket; touching one re-maps the bucket once (the guest may have populated
it since) and otherwise raises :class:`GuestMemoryError`.  Every access is
bounds-checked against ``limit`` (the guest-physical address width) and
``MAX_ACCESS``; no view of a mapping ever leaves this module, so an
evicted mapping cannot be used after unmap.

One instance serves several threads (the ioreq loop's strings, and each
device's DMA service thread), so every access holds the instance's lock from
finding its buckets to the end of its copy: otherwise another thread could
evict a bucket between the two, and the copy would go to whatever the
kernel mapped at that address next (another part of the guest).  File I/O
straight into the guest (:meth:`GuestMemory.file_io`) pins its buckets
instead of holding the lock through the system call; a pinned bucket that
is evicted or invalidated leaves the cache and is unmapped when unpinned.

Used for rep/``data_is_ptr`` strings of ioreqs and to serve vfio-user
DMA_READ/DMA_WRITE for device servers (the bridge core converts
:class:`GuestMemoryError` into the reply's errno, EFAULT).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.xen.abi import PAGE_SHIFT, PAGE_SIZE
from bridge.xen.backend import SharedMapping, XenBackend
from bridge.xen.errors import GuestMemoryError, XenCallError

BUCKET_SHIFT = 20
BUCKET_SIZE = 1 << BUCKET_SHIFT
PAGES_PER_BUCKET = BUCKET_SIZE >> PAGE_SHIFT
# Up to 4 GiB of the guest mapped, as QEMU's mapcache keeps far more than a
# small guest: each eviction is an unmap (a TLB flush on every dom0 CPU) and
# a later re-map of 256 pages. On the emulated host, runs that evicted
# (64 buckets) found guest data misplaced more often than runs that did not;
# that host is shown to corrupt dom0 memory while a guest runs
# (docs/emuhost.md), so which is cause is open, but unmapping less costs nothing.
DEFAULT_MAX_BUCKETS = 4096
DEFAULT_LIMIT = 1 << 52  # x86-64 architectural maximum physical address width
MAX_ACCESS = 1 << 24  # one call moves at most 16 MiB
IOV_MAX = 1024  # iovecs one preadv/pwritev takes (Linux UIO_MAXIOV)

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    mapping: SharedMapping
    errors: list[int]
    remapped: bool = False
    bad_pages: set[int] = field(default_factory=set)
    pins: int = 0  # file I/O in progress through views of this mapping
    doomed: bool = False  # out of the cache; unmapped when the last pin goes

    def __post_init__(self) -> None:
        self.bad_pages = {i for i, err in enumerate(self.errors) if err}


class GuestMemory:
    """Read and write one guest's RAM by guest-physical address."""

    def __init__(self, xen: XenBackend, domid: int, *, max_buckets: int = DEFAULT_MAX_BUCKETS,
                 limit: int = DEFAULT_LIMIT) -> None:
        if max_buckets < 2:
            raise ValueError("max_buckets must be at least 2")
        self._xen = xen
        self._domid = domid
        self._max = max_buckets
        self._limit = limit
        # One access never spans more buckets than the cache holds, so no
        # bucket it uses is evicted (and unmapped) before the copy.
        self._max_access = min(MAX_ACCESS, (max_buckets - 1) * BUCKET_SIZE)
        self._buckets: collections.OrderedDict[int, _Bucket] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self.maps = 0  # buckets mapped so far (tests and statistics)
        self.invalidations = 0

    def _check(self, gpa: int, length: int) -> None:
        if length < 0 or length > self._max_access:
            raise GuestMemoryError(gpa, length, f"length outside 0..{self._max_access:#x}")
        if gpa < 0 or gpa + length > self._limit:
            raise GuestMemoryError(gpa, length, f"beyond guest address limit {self._limit:#x}")

    def _map(self, index: int) -> _Bucket:
        if self._closed:
            raise GuestMemoryError(index << BUCKET_SHIFT, BUCKET_SIZE, "guest memory closed")
        first = index * PAGES_PER_BUCKET
        try:
            mapping, errors = self._xen.map_foreign(
                self._domid, list(range(first, first + PAGES_PER_BUCKET)))
        except XenCallError as exc:
            raise GuestMemoryError(index << BUCKET_SHIFT, BUCKET_SIZE,
                                   f"cannot map: {exc}") from exc
        self.maps += 1
        return _Bucket(mapping, errors)

    def _bucket(self, index: int, page: int) -> _Bucket:
        """The mapped bucket, LRU-refreshed, with ``page`` valid in it."""
        bucket = self._buckets.get(index)
        if bucket is not None and page in bucket.bad_pages and not bucket.remapped:
            self._drop(index)
            bucket = None
            remapped = True
        else:
            remapped = False
        if bucket is None:
            bucket = self._map(index)
            bucket.remapped = remapped
            self._buckets[index] = bucket
            while len(self._buckets) > self._max:
                self._drop(next(iter(self._buckets)))
        else:
            self._buckets.move_to_end(index)
        if page in bucket.bad_pages:
            gpa = (index << BUCKET_SHIFT) + (page << PAGE_SHIFT)
            raise GuestMemoryError(gpa, PAGE_SIZE,
                                   f"page not mapped (errno {bucket.errors[page]})")
        return bucket

    def _drop(self, index: int) -> None:
        bucket = self._buckets.pop(index)
        if bucket.pins:
            bucket.doomed = True  # its file I/O finishes first (see file_io)
        else:
            bucket.mapping.close()

    def _run(self, addr: int, length: int) -> tuple[_Bucket, int, int]:
        """(bucket, offset in it, bytes) of the longest piece of ``[addr,
        addr+length)`` inside one bucket, every page of it valid. A bad page
        re-maps the bucket once, before the bucket is returned, so no piece
        handed out refers to a mapping it closed."""
        index, offset = addr >> BUCKET_SHIFT, addr & (BUCKET_SIZE - 1)
        n = min(length, BUCKET_SIZE - offset)
        first = offset >> PAGE_SHIFT
        bucket = self._bucket(index, first)
        if bucket.bad_pages:
            pages = range(first, (offset + n - 1 >> PAGE_SHIFT) + 1)
            # Re-mapping may make good pages bad (the guest gave them back):
            # check the new mapping again; a second bad page raises.
            while (bad := next((p for p in pages if p in bucket.bad_pages), None)) is not None:
                bucket = self._bucket(index, bad)
        return bucket, offset, n

    def _chunks(self, gpa: int, length: int) -> list[tuple[_Bucket, int, int, int]]:
        """(bucket, offset in bucket, offset in caller's buffer, length) per page piece."""
        spans = []
        done = 0
        while done < length:
            addr = gpa + done
            index, offset = addr >> BUCKET_SHIFT, addr & (BUCKET_SIZE - 1)
            n = min(length - done, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            self._bucket(index, offset >> PAGE_SHIFT)
            spans.append((index, offset, done, n))
            done += n
        # A bad page late in the access may have re-mapped its bucket, which
        # closes the mapping the earlier pages were checked against, and the
        # new mapping may lack a page the guest gave back meanwhile: take
        # every piece from the bucket as it is now and check it again.  The
        # access spans fewer buckets than the cache holds, so none of them
        # was evicted on the way.
        pieces = []
        for index, offset, at, n in spans:
            bucket = self._buckets[index]
            page = offset >> PAGE_SHIFT
            if page in bucket.bad_pages:
                raise GuestMemoryError((index << BUCKET_SHIFT) + (page << PAGE_SHIFT), PAGE_SIZE,
                                       f"page not mapped (errno {bucket.errors[page]})")
            pieces.append((bucket, offset, at, n))
        return pieces

    def readinto(self, gpa: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` from guest-physical ``gpa``; all or nothing is validated first."""
        out = memoryview(buf).cast("B")
        self._check(gpa, len(out))
        with self._lock:
            for bucket, offset, at, n in self._chunks(gpa, len(out)):
                out[at:at + n] = bucket.mapping.view[offset:offset + n]

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        buf = bytearray(length)
        self.readinto(gpa, buf)
        return bytes(buf)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest-physical ``gpa``; every page is checked before any write."""
        src = memoryview(data).cast("B")
        self._check(gpa, len(src))
        with self._lock:
            for bucket, offset, at, n in self._chunks(gpa, len(src)):
                bucket.mapping.view[offset:offset + n] = src[at:at + n]

    def file_io(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int,
                to_guest: bool, flags: int = 0) -> int:
        """``preadv`` (``to_guest``) or ``pwritev`` between file ``fd`` at
        ``offset`` and the guest-physical ``ranges`` in order, straight
        through the mappings: a disk command's data is not copied through
        Python, and a scatter-gather list takes one system call per
        ``IOV_MAX`` pieces rather than one per page. Returns the bytes moved
        (short at end of file); GuestMemoryError before any byte moved,
        OSError from the file as it is (BlockingIOError for RWF_NOWAIT in
        ``flags``).

        The lock is held only to find and pin the buckets, not during the
        system calls, so several commands' I/O runs at once. A pinned
        bucket that is evicted or invalidated meanwhile leaves the cache at
        once (later accesses map afresh) and is unmapped when its I/O ends,
        as QEMU's mapcache treats its locked entries."""
        for gpa, length in ranges:
            self._check(gpa, length)
        call = os.preadv if to_guest else os.pwritev
        views: list[memoryview] = []
        pinned: list[_Bucket] = []
        try:
            with self._lock:
                for gpa, length in ranges:
                    pos = 0
                    while pos < length:
                        bucket, boff, n = self._run(gpa + pos, length - pos)
                        bucket.pins += 1
                        pinned.append(bucket)
                        views.append(bucket.mapping.view[boff:boff + n])
                        pos += n
            total = 0
            for first in range(0, len(views), IOV_MAX):
                group = views[first:first + IOV_MAX]
                want = sum(len(v) for v in group)
                done = call(fd, group, offset + total, flags)
                total += done
                if done < want:
                    break
            return total
        finally:
            for view in views:
                view.release()
            with self._lock:
                for bucket in pinned:
                    bucket.pins -= 1
                    if bucket.doomed and not bucket.pins:
                        bucket.mapping.close()

    def invalidate(self) -> None:
        """Drop every mapping (IOREQ_TYPE_INVALIDATE).  An access in progress
        holds the lock, so it finishes on the old mapping first; the next
        one maps the guest's frames as they are now."""
        with self._lock:
            self.invalidations += 1
            for index in list(self._buckets):
                self._drop(index)

    @property
    def mapped_buckets(self) -> int:
        return len(self._buckets)

    def close(self) -> None:
        """Drop every mapping for good: later accesses fail."""
        with self._lock:
            self._closed = True
            for index in list(self._buckets):
                self._drop(index)
