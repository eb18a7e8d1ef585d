"""The 82540EM as a vfio-user device: PCI identity, regions, INTx and guest
memory around the :class:`~servers.e1000.nic.E1000` model.

Regions (SDM 4.1 "PCI Configuration"): BAR0 128 KiB of memory-mapped
registers, BAR1 a 64-byte I/O window (IOADDR/IODATA), config space with
vendor 8086, device 100E, class 020000 and interrupt pin A.

This glue is written against ``xdevproto.device.Device`` directly: config
space, DMA windows and the INTx line are small enough to keep here.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
from collections.abc import Sequence

from xdevproto import wire
from xdevproto.device import NO_REGION, Device, DeviceContext, DmaRegion, IrqDesc, RegionDesc
from xdevproto.errors import DeviceError
from xdevproto.wire import IrqIndex, PciRegion, RegionFlags

from .backends import Backend
from .eeprom import DEVICE_ID, INTEL, SUBSYSTEM_ID
from .nic import BAR0_SIZE, E1000, IO_SIZE
from .timers import ThreadTimers, Timers

log = logging.getLogger(__name__)

RW = RegionFlags.READ | RegionFlags.WRITE
CONFIG_SIZE = 256
CMD_WRITABLE = 0x0547  # I/O, memory, bus master, parity, SERR, INTx disable
REVISION = 0x03


def config_space() -> bytearray:
    """The type 0 header (PCI 3.0, 6.1) of an 82540EM."""
    c = bytearray(CONFIG_SIZE)
    struct.pack_into("<HHHH", c, 0, INTEL, DEVICE_ID, 0, 0x0200)  # status: DEVSEL medium
    struct.pack_into("<I", c, 0x08, 0x02000000 | REVISION)  # Ethernet controller
    struct.pack_into("<I", c, 0x10, 0x0)  # BAR0: 32-bit memory, not prefetchable
    struct.pack_into("<I", c, 0x14, 0x1)  # BAR1: I/O
    struct.pack_into("<HH", c, 0x2C, INTEL, SUBSYSTEM_ID)
    c[0x3D] = 1  # INTA#
    c[0x3E], c[0x3F] = 0xFF, 0x00  # MIN_GNT, MAX_LAT as the part reports
    return c


class GuestMemory:
    """DMA windows the client mapped; fd-backed ones are accessed in place."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.maps: list[tuple[DmaRegion, mmap.mmap | None]] = []
        self.ctx: DeviceContext | None = None

    def add(self, region: DmaRegion) -> None:
        mem = None
        if region.fd is not None:
            try:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if region.writable else 0)
                mem = mmap.mmap(region.fd, region.size + region.fd_offset, prot=prot)
            except (OSError, ValueError) as exc:
                raise DeviceError(f"cannot map DMA fd: {exc}", errno.EINVAL) from None
            finally:
                os.close(region.fd)
        with self.lock:
            self.maps.append((region, mem))

    def remove(self, region: DmaRegion) -> None:
        with self.lock:
            for i, (r, mem) in enumerate(self.maps):
                if r.iova == region.iova and r.size == region.size:
                    del self.maps[i]
                    if mem is not None:
                        mem.close()
                    return

    def _find(self, addr: int, length: int, write: bool) -> tuple[DmaRegion, mmap.mmap | None]:
        maps = self.maps
        if len(maps) == 1:  # the usual case: all guest RAM in one region
            region, mem = maps[0]
            if (region.iova <= addr and addr + length <= region.iova + region.size
                    and (region.writable if write else region.readable)):
                return region, mem
        for region, mem in maps:
            if region.iova <= addr and addr + length <= region.iova + region.size:
                if (write and not region.writable) or (not write and not region.readable):
                    break
                return region, mem
        raise DeviceError(f"DMA outside guest memory: {addr:#x}+{length}", errno.EFAULT)

    def read(self, addr: int, length: int) -> bytes:
        with self.lock:
            region, mem = self._find(addr, length, False)
            if mem is not None:
                start = addr - region.iova + region.fd_offset
                return mem[start:start + length]
            ctx = self.ctx
        if ctx is None:
            raise DeviceError("no client for message DMA", errno.ENOTCONN)
        return ctx.dma_read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            region, mem = self._find(addr, len(data), True)
            if mem is not None:
                start = addr - region.iova + region.fd_offset
                mem[start:start + len(data)] = data
                return
            ctx = self.ctx
        if ctx is None:
            raise DeviceError("no client for message DMA", errno.ENOTCONN)
        ctx.dma_write(addr, bytes(data) if isinstance(data, bytearray) else data)

    def clear(self) -> None:
        with self.lock:
            for _, mem in self.maps:
                if mem is not None:
                    mem.close()
            self.maps.clear()


class IntxLine:
    """Level-triggered INTx over an eventfd with vfio's mask/unmask: a
    signal is sent when the line rises while unmasked, or on unmask while it
    is still high (the client masks on delivery and unmasks on EOI)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.level = False
        self.masked = False
        self.lock = threading.Lock()

    def set_level(self, level: bool) -> None:
        with self.lock:
            rising = level and not self.level
            self.level = level
            if rising and not self.masked:
                self._signal()

    def _signal(self) -> None:
        if self.fd is not None:
            try:
                os.eventfd_write(self.fd, 1)
            except OSError as exc:
                log.warning("INTx eventfd: %s", exc)

    def set_fd(self, fd: int | None) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
            self.fd = fd
            if fd is not None and self.level and not self.masked:
                self._signal()

    def mask(self, masked: bool) -> None:
        with self.lock:
            self.masked = masked
            if not masked and self.level:
                self._signal()


class E1000Device(Device):
    def __init__(self, mac: bytes, backend: Backend, timers: Timers | None = None) -> None:
        self.backend = backend
        self.mem = GuestMemory()
        self.intx = IntxLine()
        self.config = config_space()
        self.timers = timers if timers is not None else ThreadTimers()
        self.nic = E1000(mac, dma=self.mem, send=backend.send, set_irq=self.intx.set_level,
                         timers=self.timers)
        self.nic.set_partner(backend.link_up)
        backend.start(self.nic.receive, self.nic.set_partner)

    def close(self) -> None:
        self.backend.close()
        self.timers.close()
        self.mem.clear()
        self.intx.set_fd(None)

    # -- description -----------------------------------------------------------------
    def region(self, index: int) -> RegionDesc:
        if index == PciRegion.BAR0:
            return RegionDesc(BAR0_SIZE, RW)
        if index == PciRegion.BAR1:
            return RegionDesc(IO_SIZE, RW)
        if index == PciRegion.CONFIG:
            return RegionDesc(CONFIG_SIZE, RW)
        return NO_REGION

    def irq(self, index: int) -> IrqDesc:
        if index == IrqIndex.INTX:
            return IrqDesc(1, wire.IrqInfoFlags.EVENTFD | wire.IrqInfoFlags.MASKABLE)
        return IrqDesc(0)

    # -- accesses ------------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == PciRegion.CONFIG:
            return bytes(self.config[offset:offset + count])
        out = bytearray()
        while len(out) < count:
            off = offset + len(out)
            size = 4 if off % 4 == 0 and count - len(out) >= 4 else 1
            if index == PciRegion.BAR0:
                value = self.nic.read(off, size)
            elif index == PciRegion.BAR1:
                value = self.nic.io_read(off, size)
            else:
                raise DeviceError(f"no region {index}", errno.EINVAL)
            out += value.to_bytes(size, "little")
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == PciRegion.CONFIG:
            self._config_write(offset, data)
            return
        pos = 0
        while pos < len(data):
            off = offset + pos
            size = 4 if off % 4 == 0 and len(data) - pos >= 4 else 1
            value = int.from_bytes(data[pos:pos + size], "little")
            if index == PciRegion.BAR0:
                self.nic.write(off, value, size)
            elif index == PciRegion.BAR1:
                self.nic.io_write(off, value, size)
            else:
                raise DeviceError(f"no region {index}", errno.EINVAL)
            pos += size

    def _config_write(self, offset: int, data: bytes) -> None:
        """Only the command register, BARs and interrupt line are writable."""
        for i, byte in enumerate(data):
            off = offset + i
            if off in (4, 5):
                mask = CMD_WRITABLE >> (8 * (off - 4)) & 0xFF
                self.config[off] = (self.config[off] & ~mask) | (byte & mask)
            elif 0x10 <= off < 0x18 or off == 0x3C:
                self.config[off] = byte
        for bar, size, low in ((0x10, BAR0_SIZE, 0x0), (0x14, IO_SIZE, 0x1)):
            value = struct.unpack_from("<I", self.config, bar)[0]
            struct.pack_into("<I", self.config, bar, (value & ~(size - 1)) | low)

    # -- session -------------------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        self.mem.ctx = ctx

    def detach(self) -> None:
        self.mem.ctx = None

    def dma_map(self, region: DmaRegion) -> None:
        self.mem.add(region)

    def dma_unmap(self, region: DmaRegion) -> None:
        # The NIC lock is held by every DMA user: taking it waits for them to finish.
        with self.nic.lock:
            self.mem.remove(region)

    def set_irqs(self, index: int, action: int, start: int, count: int,
                 fds: Sequence[int | None] | None, bools: bytes | None) -> None:
        if index != IrqIndex.INTX:
            for fd in fds or ():
                if fd is not None:
                    os.close(fd)
            if count:
                raise DeviceError(f"interrupt index {index} not supported", errno.EINVAL)
            return
        flags = wire.SetIrqsFlags
        if action == flags.ACTION_TRIGGER:
            if fds is not None:
                self.intx.set_fd(fds[0] if fds else None)
            elif count == 0:
                self.intx.set_fd(None)
            elif bools is None or bools[0]:
                self.intx._signal()
        elif action in (flags.ACTION_MASK, flags.ACTION_UNMASK):
            for fd in fds or ():
                if fd is not None:
                    os.close(fd)
            if count and (bools is None or bools[0]):
                self.intx.mask(action == flags.ACTION_MASK)

    def reset(self) -> None:
        # Config space stays: the client owns BAR addresses and the command register.
        self.nic.reset()
