"""Raw disk images: positional I/O, write-cache semantics, TRIM as hole punching.

The image is a plain (possibly sparse) file opened once. Every operation is
positional (``os.preadv``/``os.pwritev``), so NCQ commands run concurrently
on worker threads without a shared file offset.

Durability (ACS-3 9.x "Write cache"): with the write cache *disabled* a write
is on stable storage before it completes (``fdatasync`` after the write);
with it *enabled* a write completes once the kernel has it and FLUSH CACHE
(EXT) ``fdatasync``s everything completed before it.

TRIM (ACS-3 7.10 DATA SET MANAGEMENT) punches holes with ``fallocate(2)``
(``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``); where the file system
cannot punch, the range is overwritten with zeros, so trimmed sectors always
read back as zeros (IDENTIFY word 69 advertises DRAT and RZAT).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

SECTOR = 512

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)
_IOV_MAX = 1024  # os.preadv/pwritev refuse more buffers per call (IOV_MAX on Linux)


class DiskError(Exception):
    """An I/O failure the device reports to the guest as an ATA error."""


class ReadOnlyError(DiskError):
    """A write to a read-only image (ATA: ABRT, "write protected")."""


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """How to open one image (from the CLI's ``--disk``/``--cdrom``)."""

    path: str
    readonly: bool = False
    writeback: bool = True  # the write cache starts enabled, like QEMU's cache=writeback


def _load_fallocate() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` keeping the file size; False if unsupported."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise DiskError(f"fallocate: {os.strerror(err)}")


class DiskImage:
    """One open image file, sized in 512-byte sectors (a partial tail sector is ignored)."""

    def __init__(self, spec: DiskSpec) -> None:
        flags = os.O_RDONLY if spec.readonly else os.O_RDWR
        self.fd = os.open(spec.path, flags | os.O_CLOEXEC)
        self.path = spec.path
        self.readonly = spec.readonly
        self.write_cache = spec.writeback
        self.sectors = os.fstat(self.fd).st_size // SECTOR
        self._flush_lock = threading.Lock()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- checks ---------------------------------------------------------------
    def in_range(self, lba: int, count: int) -> bool:
        return lba >= 0 and count >= 0 and lba + count <= self.sectors

    # -- data -------------------------------------------------------------------
    def read_into(self, lba: int, bufs: Sequence[memoryview | bytearray]) -> int:
        """Read from sector ``lba`` into ``bufs`` (byte-sized, in order); bytes read."""
        want = sum(len(b) for b in bufs)
        offset = lba * SECTOR
        done = 0
        views = [memoryview(b).cast("B") for b in bufs]
        while done < want:
            try:
                n = os.preadv(self.fd, _skip(views, done), offset + done)
            except OSError as exc:
                raise DiskError(f"read at sector {lba}: {exc.strerror}") from exc
            if n == 0:  # the file shrank under us: report, never return garbage
                raise DiskError(f"short read at sector {lba}")
            done += n
        return done

    def write_from(self, lba: int, bufs: Sequence[memoryview | bytes | bytearray]) -> int:
        """Write ``bufs`` at sector ``lba``; durable before return when the cache is off."""
        self.check_writable()
        views = [memoryview(b).cast("B") for b in bufs]
        want = sum(len(v) for v in views)
        offset = lba * SECTOR
        done = 0
        while done < want:
            try:
                n = os.pwritev(self.fd, _skip(views, done), offset + done)
            except OSError as exc:
                raise DiskError(f"write at sector {lba}: {exc.strerror}") from exc
            if n == 0:
                raise DiskError(f"no progress writing sector {lba}")
            done += n
        self.written()
        return done

    def check_writable(self) -> None:
        """Raise :class:`ReadOnlyError` for a read-only image (before any byte moves)."""
        if self.readonly:
            raise ReadOnlyError(self.path)

    def written(self) -> None:
        """A write finished (possibly straight from guest memory): honour write-through."""
        if not self.write_cache:
            self.flush()

    def flush(self) -> None:
        """Make every completed write durable (FLUSH CACHE)."""
        if self.readonly:
            return
        with self._flush_lock:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise DiskError(f"flush: {exc.strerror}") from exc

    def trim(self, lba: int, count: int) -> None:
        """Deallocate ``count`` sectors at ``lba``; they read back as zeros."""
        if self.readonly:
            raise ReadOnlyError(self.path)
        if count == 0:
            return
        offset, length = lba * SECTOR, count * SECTOR
        if not punch_hole(self.fd, offset, length):
            while length > 0:
                n = min(length, len(_ZERO_CHUNK))
                os.pwrite(self.fd, _ZERO_CHUNK[:n], offset)
                offset += n
                length -= n
        if not self.write_cache:
            self.flush()


def _skip(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """The buffers with the first ``skip`` bytes dropped (after a short transfer)."""
    if skip == 0:
        return list(views[:_IOV_MAX])
    out: list[memoryview] = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        out.append(v[skip:])
        skip = 0
    return out[:_IOV_MAX]
