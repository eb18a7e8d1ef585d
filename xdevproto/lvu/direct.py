"""Guest memory the library mapped, copied from any thread (the engine's DMA fast path).

libvfio-user is not thread-safe, so ``vfu_sgl_read``/``vfu_sgl_write`` may
only run on the engine's loop thread; a device worker would have to hand
every DMA to that thread and wait. But for a region the client mapped with
an fd, the library has already mmap'ed it (``vfu_dma_info_t.vaddr``), and a
copy from or to that mapping needs no library call. :class:`DirectMaps`
keeps those mappings and copies on the caller's thread:

* a region leaves the table at DMA_UNMAP (the library's unregister callback,
  on the loop thread) and :meth:`DirectMaps.remove` waits until no copy uses
  it any more, before the library unmaps it;
* writes are dirty-logged by the library only when they go through
  ``vfu_sgl_write``, so each direct write is queued (:meth:`take_dirty`) for
  the loop thread to mark with ``vfu_sgl_mark_dirty``. The loop drains the
  queue before it reads the next client message, and a device completes
  (and STOP drains) its DMA before the client can ask for the report, so a
  report never misses a write.

Ranges not inside one mapped region (message-only memory, or crossing two
regions) return None and the engine takes the loop path.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass

from xdevproto.errors import VfioUserError
from xdevproto.lvu.loader import ffi


@dataclass
class _Mapping:
    iova: int
    length: int
    vaddr: int
    writable: bool
    users: int = 0


class DirectMaps:
    """The fd-mapped DMA regions, by iova; safe from any thread."""

    def __init__(self) -> None:
        self._maps: list[_Mapping] = []
        self._cond = threading.Condition()
        self._dirty: list[tuple[int, int]] = []

    def add(self, iova: int, length: int, vaddr: int, writable: bool) -> None:
        if vaddr:
            with self._cond:
                self._maps.append(_Mapping(iova, length, vaddr, writable))

    def remove(self, iova: int, length: int) -> None:
        """Forget the region and wait until no copy uses it."""
        with self._cond:
            gone = [m for m in self._maps if m.iova == iova and m.length == length]
            self._maps = [m for m in self._maps if m not in gone]
            self._cond.wait_for(lambda: all(m.users == 0 for m in gone))

    def clear(self) -> None:
        with self._cond:
            gone, self._maps = self._maps, []
            self._cond.wait_for(lambda: all(m.users == 0 for m in gone))

    def _acquire(self, iova: int, length: int) -> _Mapping | None:
        with self._cond:
            for m in self._maps:
                if m.iova <= iova and iova + length <= m.iova + m.length:
                    m.users += 1
                    return m
        return None

    def _release(self, m: _Mapping) -> None:
        with self._cond:
            m.users -= 1
            if m.users == 0:
                self._cond.notify_all()

    def read(self, iova: int, length: int) -> bytes | None:
        """The bytes at ``iova``, or None when no single mapped region holds them."""
        m = self._acquire(iova, length)
        if m is None:
            return None
        try:
            return ffi.buffer(ffi.cast("char *", m.vaddr + iova - m.iova), length)[:]
        finally:
            self._release(m)

    def write(self, iova: int, data: bytes | memoryview) -> bool:
        """Copy ``data`` to ``iova``; False when no single mapped region holds it."""
        length = len(data)
        m = self._acquire(iova, length)
        if m is None:
            return False
        try:
            if not m.writable:  # what vfu_sgl_write answers for a read-only region
                raise VfioUserError(f"DMA write to read-only {iova:#x}+{length:#x}",
                                    errno.EPERM)
            ffi.memmove(ffi.cast("char *", m.vaddr + iova - m.iova), data, length)
            with self._cond:
                self._dirty.append((iova, length))
        finally:
            self._release(m)
        return True

    def take_dirty(self) -> list[tuple[int, int]]:
        """The direct writes since the last call (for ``vfu_sgl_mark_dirty``)."""
        with self._cond:
            out, self._dirty = self._dirty, []
        return out

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)
