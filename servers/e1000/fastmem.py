"""In-place access to fd-mapped guest RAM for the packet paths.

The framework's :class:`xdevproto.pci.GuestMemory` pins a region per access
so that DMA_UNMAP can wait for it; that costs several microseconds per
access, more than the rest of a frame's handling. The e1000 does all its DMA
under the device lock, so it can keep its own mapping of each fd-backed
region and drop it under that lock before the framework unmaps: no access
can be in flight then. Anything else (message DMA, addresses outside these
mappings, dirty logging for migration) goes to the framework's object.
"""

from __future__ import annotations

import mmap
import os

from xdevproto.device import DmaRegion
from xdevproto.pci import GuestMemory


class FastGuestMemory:
    def __init__(self, slow: GuestMemory) -> None:
        self.slow = slow
        self.enabled = True  # False while dirty logging needs every write to be seen
        self._maps: list[tuple[int, int, bool, mmap.mmap, memoryview]] = []

    def add(self, region: DmaRegion, fd: int) -> None:
        """Map ``fd`` (a duplicate of the region's; closed here) as well."""
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if region.writable else 0)
            mm = mmap.mmap(fd, region.size + region.fd_offset, prot=prot)
        except (OSError, ValueError):
            return  # the slow path still serves the region
        finally:
            os.close(fd)
        view = memoryview(mm)[region.fd_offset:region.fd_offset + region.size]
        self._maps.append((region.iova, region.size, region.writable, mm, view))

    def remove(self, region: DmaRegion) -> None:
        for i, (iova, size, _, mm, view) in enumerate(self._maps):
            if iova == region.iova and size == region.size:
                del self._maps[i]
                view.release()
                mm.close()
                return

    def clear(self) -> None:
        for _, _, _, mm, view in self._maps:
            view.release()
            mm.close()
        self._maps.clear()

    def read(self, addr: int, length: int) -> bytes:
        if self.enabled:
            for iova, size, _, _, view in self._maps:
                if iova <= addr and addr + length <= iova + size:
                    return bytes(view[addr - iova:addr - iova + length])
        return self.slow.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if self.enabled:
            for iova, size, writable, _, view in self._maps:
                if writable and iova <= addr and addr + len(data) <= iova + size:
                    view[addr - iova:addr - iova + len(data)] = data
                    return
        self.slow.write(addr, data)
