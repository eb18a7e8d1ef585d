"""PCI capabilities built from declarations.

* :class:`PmCap` -- power management (PCI PM 1.2, chapter 3), optional reset on
  D3hot -> D0 (No_Soft_Reset clear).
* :class:`MsiCap` -- MSI, 32- or 64-bit, optional per-vector masking (PCI 3.0,
  6.8.1).
* :class:`MsixCap` -- MSI-X with its table and PBA in a BAR (PCI 3.0, 6.8.2).
* :class:`PcieCap` -- PCI Express capability of an endpoint (PCIe 4.0, 7.5.3),
  optional function-level reset (Initiate FLR, 7.5.3.4).

A capability object is declared on the device class and copied per device
instance (:meth:`Capability.clone`), so its state is per device. The config
space tells a capability about writes that touched it; the capability calls
``listener`` (set by the PCI device) when interrupt routing may have changed
(enable, mask or unmask) and ``on_reset`` when the guest asked for a reset.
"""

from __future__ import annotations

import copy
import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import DeviceError

if TYPE_CHECKING:
    from .config import ConfigSpace

CAP_PM, CAP_MSI, CAP_PCIE, CAP_MSIX = 0x01, 0x05, 0x10, 0x11


class Capability:
    """Base: ``cap_id``, ``size``; ``offset`` is assigned by the config space."""

    cap_id = 0
    size = 0

    def __init__(self) -> None:
        self.offset = 0
        self.listener: Callable[[], None] | None = None
        self.on_reset: Callable[[], None] | None = None

    def clone(self) -> Capability:
        return copy.deepcopy(self)

    def layout(self, cfg: ConfigSpace) -> None:
        """Write the reset image and masks of the fields after id/next."""

    def written(self, cfg: ConfigSpace, off: int, count: int) -> None:
        """A guest write touched [off, off+count) inside this capability."""

    def reset(self, cfg: ConfigSpace) -> None:
        """Config space went back to its reset image; drop extra state."""

    def save(self) -> bytes:
        return b""

    def load(self, data: bytes) -> None:
        if data:
            raise DeviceError(f"unexpected state for capability {self.cap_id:#x}", errno.EINVAL)

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener()


class PmCap(Capability):
    """Power management; ``reset_on_d0`` makes D3hot -> D0 reset the function."""

    cap_id, size = CAP_PM, 8
    PMCSR = 4
    D0, D3HOT = 0, 3

    def __init__(self, reset_on_d0: bool = True) -> None:
        super().__init__()
        self.reset_on_d0 = reset_on_d0
        self._state = 0

    def layout(self, cfg: ConfigSpace) -> None:
        cfg.set(self.offset + 2, 2, 0x0003)  # PMC: version 3 (PM 1.2), no D1/D2, no PME
        no_soft_reset = 0 if self.reset_on_d0 else 1 << 3
        cfg.set(self.offset + self.PMCSR, 2, no_soft_reset, 0x0003)

    def written(self, cfg: ConfigSpace, off: int, count: int) -> None:
        reg = self.offset + self.PMCSR
        value = cfg.u16(reg)
        state = value & 3
        if state in (1, 2):  # unsupported D1/D2: the write is ignored (PM 1.2, 3.2.4)
            state = self._state
            cfg.put(reg, 2, (value & ~3) | state)
        previous, self._state = self._state, state
        if (previous == self.D3HOT and state == self.D0 and self.reset_on_d0
                and self.on_reset is not None):
            self.on_reset()

    def reset(self, cfg: ConfigSpace) -> None:
        self._state = 0

    @property
    def power_state(self) -> int:
        return self._state

    def save(self) -> bytes:
        return bytes([self._state])

    def load(self, data: bytes) -> None:
        if len(data) != 1 or data[0] > 3:
            raise DeviceError("bad PM capability state", errno.EINVAL)
        self._state = data[0]


class MsiCap(Capability):
    """MSI with ``vectors`` (1, 2, 4, ..., 32) messages."""

    cap_id = CAP_MSI
    _cfg: ConfigSpace

    def __init__(self, vectors: int = 1, addr64: bool = True,
                 per_vector_mask: bool = False) -> None:
        super().__init__()
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI vectors {vectors} is not a power of two <= 32")
        self.vectors = vectors
        self.addr64 = addr64
        self.per_vector_mask = per_vector_mask
        data_off = 0x0C if addr64 else 0x08
        self.data_off = data_off
        self.mask_off = data_off + 4
        self.pending_off = data_off + 8
        self.size = data_off + (12 if per_vector_mask else 2)

    def layout(self, cfg: ConfigSpace) -> None:
        o = self.offset
        mmc = (self.vectors.bit_length() - 1) << 1
        control = mmc | (1 << 7 if self.addr64 else 0) | (1 << 8 if self.per_vector_mask else 0)
        cfg.set(o + 2, 2, control, 0x0071)  # enable + multiple message enable
        cfg.set(o + 4, 4, 0, 0xFFFFFFFC)
        if self.addr64:
            cfg.set(o + 8, 4, 0, 0xFFFFFFFF)
        cfg.set(o + self.data_off, 2, 0, 0xFFFF)
        if self.per_vector_mask:
            cfg.set(o + self.mask_off, 4, 0, (1 << self.vectors) - 1 if self.vectors < 32
                    else 0xFFFFFFFF)
            cfg.set(o + self.pending_off, 4, 0)
        self._cfg = cfg

    def written(self, cfg: ConfigSpace, off: int, count: int) -> None:
        control = cfg.u16(self.offset + 2)
        mme = (control >> 4) & 7
        mmc = (control >> 1) & 7
        if mme > mmc:  # more than requested is undefined; give what we have
            cfg.put(self.offset + 2, 2, (control & ~0x70) | (mmc << 4))
        self._changed()

    # -- queries used by the interrupt router --------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._cfg.u16(self.offset + 2) & 1)

    @property
    def enabled_vectors(self) -> int:
        return 1 << ((self._cfg.u16(self.offset + 2) >> 4) & 7)

    def masked(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self._cfg.u32(self.offset + self.mask_off)
                                             >> vector & 1)

    def set_pending(self, vector: int, pending: bool) -> None:
        if not self.per_vector_mask:
            return
        reg = self.offset + self.pending_off
        bits = self._cfg.u32(reg)
        self._cfg.put(reg, 4, bits | 1 << vector if pending else bits & ~(1 << vector))

    def pending(self, vector: int) -> bool:
        return self.per_vector_mask and bool(self._cfg.u32(self.offset + self.pending_off)
                                             >> vector & 1)

    def save(self) -> bytes:
        return struct.pack("<I", self._cfg.u32(self.offset + self.pending_off)
                           if self.per_vector_mask else 0)

    def load(self, data: bytes) -> None:
        if len(data) != 4:
            raise DeviceError("bad MSI capability state", errno.EINVAL)
        (pending,) = struct.unpack("<I", data)
        if self.per_vector_mask:
            self._cfg.put(self.offset + self.pending_off, 4, pending & ((1 << self.vectors) - 1))


class MsixCap(Capability):
    """MSI-X with ``vectors`` entries; table and PBA in BAR ``bar``.

    The PCI device routes accesses to [table_offset, +16*vectors) and
    [pba_offset, +8*ceil(vectors/64)) of that BAR here.
    """

    cap_id, size = CAP_MSIX, 12
    _cfg: ConfigSpace
    ENTRY = 16
    ENABLE, FUNCTION_MASK = 1 << 15, 1 << 14

    def __init__(self, vectors: int, bar: int, table_offset: int, pba_offset: int,
                 pba_bar: int | None = None) -> None:
        super().__init__()
        if not 1 <= vectors <= 2048:
            raise ValueError(f"MSI-X vectors {vectors} out of 1..2048")
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("MSI-X table and PBA must be 8-byte aligned")
        self.vectors = vectors
        self.bar = bar
        self.pba_bar = bar if pba_bar is None else pba_bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.table_size = self.ENTRY * vectors
        self.pba_size = 8 * -(-vectors // 64)
        self.table = bytearray(self.table_size)
        self.pba = bytearray(self.pba_size)
        self._reset_table()

    def _reset_table(self) -> None:
        self.table[:] = bytes(self.table_size)
        for v in range(self.vectors):
            self.table[v * self.ENTRY + 12] = 1  # vector control: masked
        self.pba[:] = bytes(self.pba_size)

    def layout(self, cfg: ConfigSpace) -> None:
        o = self.offset
        cfg.set(o + 2, 2, self.vectors - 1, self.ENABLE | self.FUNCTION_MASK)
        cfg.set(o + 4, 4, self.table_offset | self.bar)
        cfg.set(o + 8, 4, self.pba_offset | self.pba_bar)
        self._cfg = cfg

    def written(self, cfg: ConfigSpace, off: int, count: int) -> None:
        self._changed()

    def reset(self, cfg: ConfigSpace) -> None:
        self._reset_table()

    # -- the table and PBA in the BAR -----------------------------------------------
    def in_table(self, bar: int, offset: int, count: int) -> bool:
        return (bar == self.bar and offset < self.table_offset + self.table_size
                and offset + count > self.table_offset)

    def in_pba(self, bar: int, offset: int, count: int) -> bool:
        return (bar == self.pba_bar and offset < self.pba_offset + self.pba_size
                and offset + count > self.pba_offset)

    def table_read(self, offset: int, count: int) -> bytes:
        start = offset - self.table_offset
        return _window(self.table, start, count)

    def table_write(self, offset: int, data: bytes) -> None:
        start = offset - self.table_offset
        for i, b in enumerate(data):
            p = start + i
            if 0 <= p < self.table_size:
                if p % self.ENTRY == 12:
                    b &= 1  # vector control: only the mask bit is defined
                elif p % self.ENTRY in (13, 14, 15):
                    b = 0
                elif p % self.ENTRY == 0:
                    b &= 0xFC  # message address is dword aligned
                self.table[p] = b
        self._changed()

    def pba_read(self, offset: int, count: int) -> bytes:
        return _window(self.pba, offset - self.pba_offset, count)

    # -- queries used by the interrupt router ----------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._cfg.u16(self.offset + 2) & self.ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._cfg.u16(self.offset + 2) & self.FUNCTION_MASK)

    def masked(self, vector: int) -> bool:
        return bool(self.table[vector * self.ENTRY + 12] & 1)

    def entry(self, vector: int) -> tuple[int, int]:
        """(address, data) of a table entry."""
        lo, hi, data = struct.unpack_from("<III", self.table, vector * self.ENTRY)
        return hi << 32 | lo, data

    def set_pending(self, vector: int, pending: bool) -> None:
        if pending:
            self.pba[vector >> 3] |= 1 << (vector & 7)
        else:
            self.pba[vector >> 3] &= ~(1 << (vector & 7)) & 0xFF

    def pending(self, vector: int) -> bool:
        return bool(self.pba[vector >> 3] >> (vector & 7) & 1)

    def save(self) -> bytes:
        return bytes(self.table) + bytes(self.pba)

    def load(self, data: bytes) -> None:
        if len(data) != self.table_size + self.pba_size:
            raise DeviceError("bad MSI-X capability state", errno.EINVAL)
        self.table[:] = data[:self.table_size]
        for v in range(self.vectors):  # sanitize reserved bits like a guest write would
            self.table[v * self.ENTRY + 12] &= 1
            self.table[v * self.ENTRY + 13:v * self.ENTRY + 16] = b"\0\0\0"
        self.pba[:] = data[self.table_size:]
        spare = self.pba_size * 8 - self.vectors
        if spare:
            self.pba[-1] &= (0xFF >> spare)


class PcieCap(Capability):
    """PCI Express capability, version 2, of an endpoint (PCIe 4.0, 7.5.3)."""

    cap_id, size = CAP_PCIE, 0x3C
    DEVCAP, DEVCTL, DEVSTA, LNKCAP, LNKCTL, LNKSTA = 0x04, 0x08, 0x0A, 0x0C, 0x10, 0x12
    DEVCAP_FLR = 1 << 28
    DEVCTL_FLR = 1 << 15

    def __init__(self, flr: bool = True, port_type: int = 0) -> None:
        super().__init__()
        self.flr = flr
        self.port_type = port_type  # 0 = PCI Express endpoint, 9 = RC integrated endpoint

    def layout(self, cfg: ConfigSpace) -> None:
        o = self.offset
        cfg.set(o + 2, 2, 0x0002 | (self.port_type << 4))
        # max payload 128 bytes, role-based error reporting, FLR
        cfg.set(o + self.DEVCAP, 4, (1 << 15) | (self.DEVCAP_FLR if self.flr else 0))
        # relaxed ordering, no snoop enabled; max payload/read 128/512 bytes
        ctl_mask = 0x7FFF | (self.DEVCTL_FLR if self.flr else 0)
        cfg.set(o + self.DEVCTL, 2, 0x2810, ctl_mask)
        cfg.set(o + self.DEVSTA, 2, 0, 0, 0x000F)
        cfg.set(o + self.LNKCAP, 4, 0x00000011)  # 2.5 GT/s, x1
        cfg.set(o + self.LNKCTL, 2, 0, 0x0043)
        cfg.set(o + self.LNKSTA, 2, 0x0011)  # 2.5 GT/s, x1
        cfg.set(o + 0x24, 4, 0)  # DevCap2: no optional features

    def written(self, cfg: ConfigSpace, off: int, count: int) -> None:
        reg = self.offset + self.DEVCTL
        ctl = cfg.u16(reg)
        if ctl & self.DEVCTL_FLR:
            cfg.put(reg, 2, ctl & ~self.DEVCTL_FLR)  # Initiate FLR always reads 0
            if self.on_reset is not None:
                self.on_reset()


def _window(buf: bytearray, start: int, count: int) -> bytes:
    """``count`` bytes of ``buf`` from ``start``; outside the buffer reads 0."""
    out = bytearray(count)
    lo, hi = max(0, start), min(len(buf), start + count)
    if lo < hi:
        out[lo - start:hi - start] = buf[lo:hi]
    return bytes(out)
