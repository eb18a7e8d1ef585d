"""Guest memory through Xen foreign mappings, for the bridge and for device
servers that may map the guest themselves.

The bridge serves DMA_READ/DMA_WRITE from :class:`DmaMemory`. It also offers
the xdev VERSION extension ``{"xdev": {"guest_memory": {"kind":
"xen-foreign", "domid": N}}}``; a device server started with
``--xen-foreign-dma`` (running in a domain allowed to map the guest, e.g.
dom0 or a stub domain targeting it) accepts it through
:data:`GUEST_MAPPERS` and then reaches guest memory directly instead of by
messages. Standard peers ignore the key.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from bridge.xen.errors import XenError
from bridge.xen.guestmem import DEFAULT_MAX_BUCKETS, GuestMemory
from xdevproto.errors import DeviceError

KIND = "xen-foreign"
#: Up to 4 GiB of the guest mapped by a server that maps it itself: all of a
#: small guest, as QEMU's mapcache keeps it. With 64 buckets, such servers
#: wrote a wrong file block in 4 of 9 Xen-tier runs; with this many (no
#: unmapping after boot) 5 runs were clean. The emulated host corrupts dom0
#: memory while a guest runs (docs/emuhost.md), so neither count is xdev's
#: for certain; the larger cache stays until a sound host says otherwise.
FOREIGN_MAX_BUCKETS = DEFAULT_MAX_BUCKETS


class DmaMemory:
    """Guest RAM with Xen's errors turned into the reply's errno (EFAULT).

    The bridge serves DMA messages from one; a device server that took the
    offer maps the guest through its own, which drops its mappings when the
    bridge passes an INVALIDATE on (XDEV_GUEST_MEMORY_INVALIDATE).
    """

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def read(self, addr: int, length: int) -> bytes:
        try:
            return self.memory.read(addr, length)
        except XenError as exc:
            raise DeviceError(str(exc), errno.EFAULT) from None

    def write(self, addr: int, data: bytes) -> None:
        try:
            self.memory.write(addr, data)
        except XenError as exc:
            raise DeviceError(str(exc), errno.EFAULT) from None

    def invalidate(self) -> None:
        self.memory.invalidate()

    def close(self) -> None:
        self.memory.close()

    def file_io(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int,
                to_guest: bool, flags: int = 0) -> int:
        """Disk data straight between a file and the guest (see GuestMemory.file_io)."""
        try:
            return self.memory.file_io(fd, ranges, offset, to_guest, flags)
        except XenError as exc:
            raise DeviceError(str(exc), errno.EFAULT) from None


def offer(domid: int) -> dict[str, Any]:
    return {"kind": KIND, "domid": domid}


def xen_foreign_memory(params: dict[str, Any]) -> DmaMemory:
    """A device server's mapper for the bridge's offer."""
    from bridge.xen.libs import XenLibs

    domid = params.get("domid")
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 < domid < 0x7FF0:
        raise ValueError(f"bad domid {domid!r} in the guest-memory offer")
    return DmaMemory(GuestMemory(XenLibs(), domid, max_buckets=FOREIGN_MAX_BUCKETS))


GUEST_MAPPERS = {KIND: xen_foreign_memory}
