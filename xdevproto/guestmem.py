"""Guest memory on the client side: what a client maps into a server with
DMA_MAP and serves DMA_READ/DMA_WRITE from.

:class:`MemfdRam` is guest RAM held in a memfd: its fd is what DMA_MAP
passes, and it answers message DMA too. The bridge provides its own object
(foreign mappings of a Xen guest) with the same two methods.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Protocol

from .errors import DeviceError
from .wire import IoreqServe


class GuestMemory(Protocol):
    """Answers a server's DMA_READ/DMA_WRITE. Raise
    :class:`~xdevproto.errors.VfioUserError` (EFAULT) for an address the
    server may not reach."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class MappedGuestMemory(GuestMemory, Protocol):
    """Guest memory a *server* maps by itself (the xdev guest-memory
    extension, e.g. Xen foreign mappings): besides read and write it drops
    every mapping on :meth:`invalidate` (the client's
    XDEV_GUEST_MEMORY_INVALIDATE; later accesses map afresh) and for good on
    :meth:`close` (the session's end; later accesses fail)."""

    def invalidate(self) -> None: ...

    def close(self) -> None: ...


class MemfdRam:
    """``size`` bytes of RAM at guest address ``base``, backed by a memfd."""

    def __init__(self, size: int, base: int = 0, name: str = "xdev-guest-ram") -> None:
        self.base = base
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.view = memoryview(self.map)

    def _range(self, addr: int, length: int) -> slice:
        start = addr - self.base
        if length < 0 or start < 0 or start + length > self.size:
            raise DeviceError(f"guest address {addr:#x}+{length} not in RAM", errno.EFAULT)
        return slice(start, start + length)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view[self._range(addr, length)])

    def write(self, addr: int, data: bytes) -> None:
        self.view[self._range(addr, len(data))] = data

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.fd)

    def __enter__(self) -> MemfdRam:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class IoreqAttachment(Protocol):
    """A server's side of the xdev ioreq extension (e.g. a Xen ioreq server
    the client created, served here): :meth:`serve` starts serving, or
    changes the ranges served; :meth:`release` stops, after which nothing
    reaches the device through it; it may serve again later."""

    def serve(self, request: IoreqServe) -> None: ...

    def release(self) -> None: ...
