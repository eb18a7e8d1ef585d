"""PCI configuration space: type 0 header, BARs and the capability list.

PCI Local Bus Specification 3.0, chapter 6 ("Configuration Space"); PCI
Express Base 4.0, 7.5.1 (type 0 header) and 7.2.2 (4 KiB extended space).

The space is a byte image with two masks built from the declarations: bits
in ``wmask`` are read-write, bits in ``w1c`` are write-1-to-clear, every
other bit is read-only. BAR sizing works through the masks: the low bits of
a BAR below its size are not writable, so writing all-ones reads back the
size mask with the type bits (PCI 3.0, 6.2.5.1).

Capabilities (see :mod:`.caps`) lay themselves out from offset 0x40 in
declaration order, are chained through their next pointers, and are told
about writes that touch them.
"""

from __future__ import annotations

import enum
import errno
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DeviceError

if TYPE_CHECKING:
    from .caps import Capability

log = logging.getLogger("xdevproto.pci.config")

# Type 0 header offsets (PCI 3.0, figure 6-1).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, CACHE_LINE, LATENCY, HEADER_TYPE, BIST = 0x08, 0x09, 0x0C, 0x0D, 0x0E, 0x0F
BAR0, SUBSYS_VENDOR, SUBSYS_ID, ROM_ADDR, CAP_PTR = 0x10, 0x2C, 0x2E, 0x30, 0x34
INT_LINE, INT_PIN, MIN_GNT, MAX_LAT = 0x3C, 0x3D, 0x3E, 0x3F

CMD_IO, CMD_MEMORY, CMD_MASTER = 1 << 0, 1 << 1, 1 << 2
CMD_PARITY, CMD_SERR, CMD_INTX_DISABLE = 1 << 6, 1 << 8, 1 << 10
#: the command bits a device without special-cycle/VGA/fast-b2b support implements
CMD_WRITABLE = CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE
STS_INTERRUPT, STS_CAP_LIST = 1 << 3, 1 << 4
#: master/target abort, SERR, parity: write 1 to clear (PCI 3.0, 6.2.3)
STS_W1C = 0xF900

CONFIG_SIZE = 256
PCIE_CONFIG_SIZE = 4096
CAPS_START = 0x40
ROM_ENABLE = 1


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True, slots=True)
class Bar:
    """A base address register (PCI 3.0, 6.2.5.1).

    ``size`` is a power of two (at least 4 for I/O, 16 for memory). A 64-bit
    BAR also takes the next BAR slot. The PCI device maps the BAR's accesses
    to ``regs`` (a :class:`~.regs.RegisterLayout`) or, when None, to its
    ``bar_read``/``bar_write`` methods.
    """

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False
    regs: object | None = None

    def flags(self) -> int:
        if self.kind is BarKind.IO:
            return 0x1
        return (0x4 if self.kind is BarKind.MEM64 else 0) | (0x8 if self.prefetchable else 0)

    def validate(self) -> None:
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index}: size {self.size:#x} is not a power of two "
                             f">= {minimum}")
        last = self.index + (1 if self.kind is BarKind.MEM64 else 0)
        if self.index < 0 or last > 5:
            raise ValueError(f"BAR{self.index}: index out of 0..5")
        if self.kind is BarKind.IO and self.size > 256:
            raise ValueError(f"BAR{self.index}: I/O BARs are at most 256 bytes")
        if self.kind is not BarKind.MEM64 and self.size > 1 << 31:
            raise ValueError(f"BAR{self.index}: too large for a 32-bit BAR")


@dataclass(frozen=True, slots=True)
class Identity:
    """What the header says about the function."""

    vendor_id: int
    device_id: int
    class_code: int  # base class << 16 | subclass << 8 | prog-if
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = 1  # INTA#; 0 = no INTx
    multifunction: bool = False


WriteHook = Callable[[int, int], None]


class ConfigSpace:
    """The config space image of one function, with its masks."""

    def __init__(self, ident: Identity, bars: Sequence[Bar], caps: Sequence[Capability],
                 pcie: bool = False, rom_size: int = 0) -> None:
        self.size = PCIE_CONFIG_SIZE if pcie else CONFIG_SIZE
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1c = bytearray(self.size)
        self.bars = {b.index: b for b in bars}
        self.caps = tuple(caps)
        self.rom_size = rom_size
        #: called after a write with (offset, length); the device hooks in here
        self.on_command: Callable[[int], None] | None = None
        self._build_header(ident)
        self._build_bars(bars)
        self._build_caps()
        self.reset_image = bytes(self.data)

    # -- construction ------------------------------------------------------------------
    def set(self, off: int, width: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        """Lay out a field: reset ``value``, writable bits, write-1-to-clear bits."""
        self.data[off:off + width] = value.to_bytes(width, "little")
        self.wmask[off:off + width] = wmask.to_bytes(width, "little")
        self.w1c[off:off + width] = w1c.to_bytes(width, "little")

    def _build_header(self, ident: Identity) -> None:
        if ident.interrupt_pin not in range(5):
            raise ValueError(f"interrupt pin {ident.interrupt_pin} out of 0..4")
        self.set(VENDOR_ID, 2, ident.vendor_id)
        self.set(DEVICE_ID, 2, ident.device_id)
        cmd_mask = CMD_WRITABLE if ident.interrupt_pin else CMD_WRITABLE & ~CMD_INTX_DISABLE
        self.set(COMMAND, 2, 0, cmd_mask)
        self.set(STATUS, 2, STS_CAP_LIST if self.caps else 0, 0, STS_W1C)
        self.set(REVISION, 1, ident.revision)
        self.set(CLASS_PROG, 3, ident.class_code)
        self.set(CACHE_LINE, 1, 0, 0xFF)
        self.set(LATENCY, 1, 0, 0xFF)
        self.set(HEADER_TYPE, 1, 0x80 if ident.multifunction else 0)
        self.set(SUBSYS_VENDOR, 2, ident.subsystem_vendor_id)
        self.set(SUBSYS_ID, 2, ident.subsystem_id)
        self.set(INT_LINE, 1, 0, 0xFF)
        self.set(INT_PIN, 1, ident.interrupt_pin)
        if self.rom_size:
            if self.rom_size < 2048 or self.rom_size & (self.rom_size - 1):
                raise ValueError(f"ROM size {self.rom_size:#x} is not a power of two >= 2 KiB")
            self.set(ROM_ADDR, 4, 0, (~(self.rom_size - 1) & 0xFFFFF800) | ROM_ENABLE)

    def _build_bars(self, bars: Sequence[Bar]) -> None:
        taken: set[int] = set()
        for bar in bars:
            bar.validate()
            slots = {bar.index, bar.index + 1} if bar.kind is BarKind.MEM64 else {bar.index}
            if taken & slots:
                raise ValueError(f"BAR{bar.index} overlaps another BAR")
            taken |= slots
            low_bits = 0x3 if bar.kind is BarKind.IO else 0xF
            mask = ~(bar.size - 1) & ~low_bits & 0xFFFFFFFF
            self.set(BAR0 + 4 * bar.index, 4, bar.flags(), mask)
            if bar.kind is BarKind.MEM64:
                self.set(BAR0 + 4 * bar.index + 4, 4, 0, (~(bar.size - 1) >> 32) & 0xFFFFFFFF)

    def _build_caps(self) -> None:
        off = CAPS_START
        prev_next = CAP_PTR
        for cap in self.caps:
            off = (off + 3) & ~3
            if off + cap.size > CONFIG_SIZE:
                raise ValueError("capabilities do not fit in conventional config space")
            cap.offset = off
            self.data[prev_next] = off
            self.set(off, 1, cap.cap_id)
            cap.layout(self)
            prev_next = off + 1  # the last one keeps 0: the list ends there
            off += cap.size

    # -- accesses ----------------------------------------------------------------------
    def u8(self, off: int) -> int:
        return self.data[off]

    def u16(self, off: int) -> int:
        return int.from_bytes(self.data[off:off + 2], "little")

    def u32(self, off: int) -> int:
        return int.from_bytes(self.data[off:off + 4], "little")

    def put(self, off: int, width: int, value: int) -> None:
        """Device-side store (no masks): status bits, pending bits."""
        self.data[off:off + width] = value.to_bytes(width, "little")

    def read(self, off: int, count: int) -> bytes:
        self._check(off, count)
        return bytes(self.data[off:off + count])

    def write(self, off: int, data: bytes) -> None:
        """A guest write: masks applied byte by byte, then the hooks."""
        count = len(data)
        self._check(off, count)
        old = bytes(self.data[off:off + count])
        for i, b in enumerate(data):
            p = off + i
            wm, wc = self.wmask[p], self.w1c[p]
            self.data[p] = ((self.data[p] & ~wm) | (b & wm)) & ~(b & wc) & 0xFF
        if log.isEnabledFor(logging.DEBUG):
            log.debug("config write %#x+%d = %s (was %s)", off, count, data.hex(), old.hex())
        end = off + count
        if off < COMMAND + 2 and end > COMMAND and self.on_command is not None:
            self.on_command(self.u16(COMMAND))
        for cap in self.caps:
            if off < cap.offset + cap.size and end > cap.offset:
                cap.written(self, off, count)

    def _check(self, off: int, count: int) -> None:
        if off < 0 or count < 0 or off + count > self.size:
            raise DeviceError(f"config access {off:#x}+{count} outside {self.size}",
                              errno.EINVAL)

    # -- queries -----------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.u16(COMMAND)

    @property
    def bus_master(self) -> bool:
        """Command bit 2: may the function start DMA and MSI (PCI 3.0, 6.2.2)?

        Not enforced by the framework (a client that emulates the command
        register would starve the device); a device may check it.
        """
        return bool(self.u16(COMMAND) & CMD_MASTER)

    def bar_address(self, index: int) -> int:
        """The address the guest programmed into BAR ``index`` (type bits removed)."""
        bar = self.bars[index]
        raw = self.u32(BAR0 + 4 * index)
        if bar.kind is BarKind.IO:
            return raw & ~0x3
        if bar.kind is BarKind.MEM64:
            raw |= self.u32(BAR0 + 4 * index + 4) << 32
        return raw & ~0xF

    def set_interrupt_status(self, asserted: bool) -> None:
        """Status bit 3 follows the function's INTx state (PCI 3.0, 6.2.3)."""
        status = self.u16(STATUS)
        self.put(STATUS, 2, status | STS_INTERRUPT if asserted else status & ~STS_INTERRUPT)

    # -- reset and migration ------------------------------------------------------------
    def reset(self) -> None:
        self.data[:] = self.reset_image
        for cap in self.caps:
            cap.reset(self)

    def load(self, image: bytes) -> None:
        """Take a saved image: writable bits from ``image``, read-only bits ours.

        Status bits and capability state that the device sets itself are
        restored by their owners afterwards.
        """
        if len(image) != self.size:
            raise DeviceError(f"config image of {len(image)} bytes, expected {self.size}",
                              errno.EINVAL)
        for p in range(self.size):
            keep = self.wmask[p] | self.w1c[p]
            self.data[p] = (self.reset_image[p] & ~keep) | (image[p] & keep)
        self.data[STATUS:STATUS + 2] = struct.pack(
            "<H", (self.u16(STATUS) & ~STS_INTERRUPT) | (image[STATUS] & STS_INTERRUPT))
