"""Atomic operations and barriers on pages shared with Xen.

The buffered ioreq ring in ``HVM_IOREQSRV_BUFIOREQ_ATOMIC`` mode needs the
consumer to advance ``read_pointer`` with an atomic add, because Xen may at
the same moment subtract a multiple of the slot count from both pointers
with a 64-bit cmpxchg (xen/common/ioreq.c, ioreq_send_buffered).  Python has
no atomic read-modify-write on foreign memory, so we call GCC's
``libatomic.so.1`` (``__atomic_fetch_add_4``, ``atomic_thread_fence``)
through cffi in ABI mode.  Without libatomic, :data:`Atomics.atomic` is
False and the ioreq server creates its server without a buffered ring.

The request/response protocol itself needs barriers between the data and
the state byte (ioreq.h; QEMU uses xen_rmb/xen_wmb): :attr:`Atomics.rw_barrier`.
On x86 that is no instruction: its memory model (TSO) keeps loads in order
with loads and stores with stores, so only the compiler must not reorder
them, and one C call per access of the page sees to that (QEMU's xen_rmb and
xen_wmb are compiler barriers on x86 too).
"""

from __future__ import annotations

import platform
import struct
from collections.abc import Callable
from typing import Any

from bridge.xen.backend import SharedMapping

_SEQ_CST = 5  # __ATOMIC_SEQ_CST
_CDEF = """
uint32_t __atomic_fetch_add_4(void *ptr, uint32_t val, int memorder);
uint32_t __atomic_load_4(void *ptr, int memorder);
void atomic_thread_fence(int memorder);
"""
_U32 = struct.Struct("<I")
#: Whether this CPU keeps loads and stores in program order among themselves.
TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


class Atomics:
    """Atomic helpers; real ones from libatomic when ``atomic`` is True."""

    def __init__(self, lib: Any | None, ffi: Any | None) -> None:
        self._lib = lib
        self._ffi = ffi
        self.atomic = lib is not None
        # getattr: a literal "__atomic_..." inside a class body would be name-mangled.
        self._fetch_add = getattr(lib, "__atomic_fetch_add_4", None)
        self._load = getattr(lib, "__atomic_load_4", None)
        #: The read/write barrier between an ioreq's fields and its state:
        #: None where the CPU needs none (x86), else a full fence.
        self.rw_barrier: Callable[[], None] | None = None if TSO else self.fence

    @classmethod
    def load(cls) -> Atomics:
        """libatomic if it can be loaded, else the non-atomic fallback."""
        try:
            import cffi

            ffi = cffi.FFI()
            ffi.cdef(_CDEF)
            return cls(ffi.dlopen("libatomic.so.1"), ffi)
        except (ImportError, OSError):
            return cls(None, None)

    def _ptr(self, mapping: SharedMapping, offset: int) -> Any:
        if not 0 <= offset <= len(mapping.view) - 4 or offset % 4:
            raise ValueError(f"unaligned or out-of-range atomic offset {offset}")
        assert self._ffi is not None
        return self._ffi.cast("void *", mapping.address + offset)

    def fetch_add_u32(self, mapping: SharedMapping, offset: int, value: int) -> int:
        """Atomically add ``value`` (mod 2**32) to the u32 at ``offset``; return the old value."""
        if self._fetch_add is None:
            old: int = _U32.unpack_from(mapping.view, offset)[0]
            _U32.pack_into(mapping.view, offset, (old + value) & 0xFFFFFFFF)
            return old
        return int(self._fetch_add(self._ptr(mapping, offset), value & 0xFFFFFFFF, _SEQ_CST))

    def load_u32(self, mapping: SharedMapping, offset: int) -> int:
        if self._load is None:
            value: int = _U32.unpack_from(mapping.view, offset)[0]
            return value
        return int(self._load(self._ptr(mapping, offset), _SEQ_CST))

    def fence(self) -> None:
        """A full barrier (rmb + wmb).  Without libatomic this relies on x86 TSO."""
        if self._lib is not None:
            self._lib.atomic_thread_fence(_SEQ_CST)
