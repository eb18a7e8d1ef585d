"""Declarative register files: each register declared once.

A device lists its registers as :class:`Reg` declarations (offset, name,
width, access kind, reset value, writable mask, spec section, side-effect
hooks); :class:`RegisterLayout` turns the list into lookup tables once, at
import time, and :class:`RegisterFile` holds one device's values and answers
region reads and writes of any width and alignment.

Access kinds (the names the AHCI 1.3.1 and 8254x manuals use):

* ``RO``   read-only; writes ignored.
* ``RW``   read-write under ``mask``; bits outside ``mask`` keep their value.
  ``w1c`` names bits of an RW register that are write-1-to-clear instead.
* ``RW1C`` write 1 to clear (status bits under ``mask``).
* ``RW1S`` write 1 to set (doorbells such as AHCI PxCI).
* ``RC``   clear on read (statistics counters, 8254x ICR); writes ignored.
  Any read that touches the register, even one byte of it, clears all of it.
* ``WO``   write-only; reads return 0, the value written is kept under ``mask``.
* ``RSVD`` reserved: reads 0, writes ignored.

Hooks are method names on the owning device, resolved once per instance:

* ``on_read(index, value) -> int`` returns what the guest reads (``value`` is
  the stored value); RC clears after the hook.
* ``on_write(index, value, old) -> None`` runs after the store; ``value`` is
  the written value (for a partial write, merged with the old bytes for RW,
  zero-filled for RW1C/RW1S/WO), ``old`` the value before.

``index`` is the element number of a register array (0 for a plain register).

Partial and unaligned accesses: an access may cover part of a register or
several registers; each register sees the bytes that fall into it. Bytes
outside any register read as 0 and ignore writes. A register declared with
``partial=False`` ignores partial writes (logged) and reads normally.

Every access is logged at DEBUG on the ``xdevproto.pci.regs`` logger (or the
one given) by register name, e.g. ``BAR0 write PxCI[2] = 0x1``.
"""

from __future__ import annotations

import enum
import errno
import logging
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..errors import DeviceError

log = logging.getLogger("xdevproto.pci.regs")


# What reading a register does beyond returning its value (RegisterLayout.read_modes).
_READ_PLAIN, _READ_CLEARS, _READ_ZERO = 0, 1, 2
_DEBUG = logging.DEBUG


class Access(enum.Enum):
    RO = "RO"
    RW = "RW"
    RW1C = "RW1C"
    RW1S = "RW1S"
    RC = "RC"
    WO = "WO"
    RSVD = "reserved"


_WRITABLE_BY_DEFAULT = (Access.RW, Access.RW1C, Access.RW1S, Access.WO)


@dataclass(frozen=True, slots=True)
class Reg:
    """One register, or an array of ``count`` registers ``stride`` bytes apart.

    ``mask`` defaults to all bits for RW/RW1C/RW1S/WO and none otherwise.
    """

    offset: int
    name: str
    access: Access = Access.RW
    reset: int = 0
    mask: int | None = None
    spec: str = ""
    on_read: str | None = None
    on_write: str | None = None
    width: int = 4
    count: int = 1
    stride: int = 0
    w1c: int = 0
    partial: bool = True

    def writable_mask(self) -> int:
        full = (1 << (8 * self.width)) - 1
        if self.mask is not None:
            return self.mask & full
        return full if self.access in _WRITABLE_BY_DEFAULT else 0


def block(base: int, stride: int, count: int, regs: Iterable[Reg]) -> list[Reg]:
    """A register block repeated ``count`` times ``stride`` bytes apart (AHCI
    ports: ``block(0x100, 0x80, 32, [Reg(0x00, "PxCLB"), ...])``); offsets in
    ``regs`` are relative to the block. Element ``i`` of every register is
    block ``i``, which is the ``index`` its hooks receive."""
    out = []
    for reg in regs:
        if reg.count != 1:
            raise ValueError(f"{reg.name}: arrays inside a block are not supported")
        if reg.offset + reg.width > stride:
            raise ValueError(f"{reg.name} does not fit in a {stride:#x}-byte block")
        out.append(replace(reg, offset=base + reg.offset, count=count, stride=stride))
    return out


@dataclass(frozen=True, slots=True)
class Slot:
    """One register element after expansion (what the lookup tables index)."""

    number: int
    reg: Reg
    index: int
    offset: int
    width: int
    name: str
    mask: int
    full: int


class RegisterLayout:
    """The lookup tables of a register file, built once per declaration list.

    ``size`` is the region size; declarations must fit inside it and must not
    overlap (checked here, so a wrong table fails at import, not in a guest).
    """

    def __init__(self, name: str, size: int, regs: Iterable[Reg]) -> None:
        self.name = name
        self.size = size
        self.regs = tuple(regs)
        self.slots: list[Slot] = []
        self.by_name: dict[str, Reg] = {}
        owner = array("i", [-1]) * size
        for reg in self.regs:
            if reg.width not in (1, 2, 4, 8):
                raise ValueError(f"{name}: {reg.name} width {reg.width}")
            if reg.name in self.by_name:
                raise ValueError(f"{name}: {reg.name} declared twice")
            self.by_name[reg.name] = reg
            stride = reg.stride or reg.width
            for i in range(reg.count):
                off = reg.offset + i * stride
                if off < 0 or off + reg.width > size:
                    raise ValueError(f"{name}: {reg.name}[{i}] at {off:#x} outside {size:#x}")
                number = len(self.slots)
                label = f"{reg.name}[{i}]" if reg.count > 1 else reg.name
                for b in range(off, off + reg.width):
                    if owner[b] != -1:
                        raise ValueError(f"{name}: {label} overlaps {self.slots[owner[b]].name}")
                    owner[b] = number
                self.slots.append(Slot(number, reg, i, off, reg.width, label,
                                       reg.writable_mask() & ~reg.w1c,
                                       (1 << (8 * reg.width)) - 1))
        self.owner = owner
        #: (offset << 4 | width) -> slot number for whole-register accesses
        self.exact: dict[int, int] = {s.offset << 4 | s.width: s.number for s in self.slots}
        self.resets: tuple[int, ...] = tuple(s.reg.reset & s.full for s in self.slots)
        #: per slot, what a read does beyond returning the value (_READ_*)
        self.read_modes: tuple[int, ...] = tuple(
            _READ_CLEARS if s.reg.access is Access.RC
            else _READ_ZERO if s.reg.access in (Access.WO, Access.RSVD) else _READ_PLAIN
            for s in self.slots)
        #: per slot, whether a whole read of it is just its value (no hook, no effect)
        self.quiet_reads: tuple[bool, ...] = tuple(
            s.reg.on_read is None and mode == _READ_PLAIN
            for s, mode in zip(self.slots, self.read_modes, strict=True))
        self._first: dict[str, int] = {}
        for s in self.slots:
            self._first.setdefault(s.reg.name, s.number)
        #: "NAME" and ("NAME", index) -> slot number: the device side's lookups
        self.keys: dict[str | tuple[str, int], int] = {
            (s.reg.name, s.index): s.number for s in self.slots}
        self.keys.update(self._first)

    def slot(self, name: str, index: int = 0) -> int:
        """The slot number of ``name[index]`` (for fast device-side access)."""
        reg = self.by_name[name]
        if not 0 <= index < reg.count:
            raise IndexError(f"{name}[{index}] out of 0..{reg.count - 1}")
        return self._first[name] + index

    def hook_names(self) -> set[str]:
        return {h for r in self.regs for h in (r.on_read, r.on_write) if h}


ReadHook = Callable[[int, int], int]
WriteHook = Callable[[int, int, int], None]


class RegisterFile:
    """One device's values for a :class:`RegisterLayout`.

    ``owner`` carries the hook methods. Not thread-safe by itself: the PCI
    framework calls it under the device lock.
    """

    def __init__(self, layout: RegisterLayout, owner: Any = None,
                 logger: logging.Logger | None = None, label: str | None = None) -> None:
        self.layout = layout
        self.values: list[int] = list(layout.resets)
        self.log = logger or log
        self.label = label or layout.name
        self._read_hooks: list[ReadHook | None] = []
        self._write_hooks: list[WriteHook | None] = []
        for s in layout.slots:
            self._read_hooks.append(_bind(owner, s.reg.on_read, layout.name))
            self._write_hooks.append(_bind(owner, s.reg.on_write, layout.name))
        # the hot path needs nothing but these
        self._exact = layout.exact
        self._slots = layout.slots
        self._keys = layout.keys
        self._read_modes = layout.read_modes
        self._quiet = layout.quiet_reads

    # -- device-side access (no hooks, no side effects) ------------------------------
    def __getitem__(self, key: str | tuple[str, int]) -> int:
        n = self._keys.get(key)
        return self.values[self._slot_of(key) if n is None else n]

    def __setitem__(self, key: str | tuple[str, int], value: int) -> None:
        n = self._keys.get(key)
        if n is None:
            n = self._slot_of(key)
        self.values[n] = value & self._slots[n].full

    def _slot_of(self, key: str | tuple[str, int]) -> int:
        """The slot of a key the table lacks: raises KeyError or IndexError."""
        name, index = (key, 0) if isinstance(key, str) else key
        return self.layout.slot(name, index)

    def reset(self) -> None:
        """Every register back to its declared reset value."""
        self.values[:] = self.layout.resets

    # -- guest accesses ---------------------------------------------------------------
    def read(self, offset: int, count: int) -> bytes:
        """A guest read of ``count`` bytes at ``offset`` (any alignment)."""
        if count <= 8:
            return self.read_int(offset, count).to_bytes(count, "little")
        return self._read_bytes(offset, count)

    def write(self, offset: int, data: bytes) -> None:
        """A guest write of ``data`` at ``offset`` (any alignment)."""
        if len(data) <= 8:
            self.write_int(offset, len(data), int.from_bytes(data, "little"))
        else:
            self._write_bytes(offset, data)

    # The number forms are the register accesses proper (bridge.direct calls
    # them, the byte forms above wrap them): one register exactly, or the
    # bytes it spans.
    def read_int(self, offset: int, count: int) -> int:
        """:meth:`read` of 1-8 bytes as a little-endian number."""
        n = self._exact.get(offset << 4 | count) if count <= 8 else None
        if n is not None:
            return self._read_slot(n)
        return int.from_bytes(self._read_bytes(offset, count), "little")

    def peek_int(self, offset: int, count: int) -> int | None:
        """:meth:`read_int` for a caller without the device lock, where that
        is the same thing: a whole register with no read hook whose read
        changes nothing is one list element, read as it stands (values are
        seen in the order the device stores them, as on hardware). None for
        any other access: read_int it under the lock."""
        n = self._exact.get(offset << 4 | count) if count <= 8 else None
        if n is None or not self._quiet[n]:
            return None
        value = self.values[n]
        if self.log.isEnabledFor(_DEBUG):
            self.log.debug("%s read %s = %#x", self.label, self._slots[n].name, value)
        return value

    def write_int(self, offset: int, count: int, value: int) -> None:
        """:meth:`write` of ``value`` as ``count`` (1-8) little-endian bytes."""
        n = self._exact.get(offset << 4 | count) if count <= 8 else None
        if n is not None:
            self._write_slot(n, value, self._slots[n].full)
            return
        self._write_bytes(offset, value.to_bytes(count, "little"))

    def _check(self, offset: int, count: int) -> int:
        """The end of the declared part of the access (the BAR may be larger
        than the register layout: beyond it, reads are 0 and writes ignored)."""
        if offset < 0 or count < 0:
            raise DeviceError(f"{self.label}: access {offset:#x}+{count}", errno.EINVAL)
        return min(offset + count, self.layout.size)

    def _read_slot(self, n: int) -> int:
        value = self.values[n]
        hook = self._read_hooks[n]
        if hook is not None:
            slot = self._slots[n]
            value = hook(slot.index, value) & slot.full
        mode = self._read_modes[n]
        if mode:
            if mode == _READ_CLEARS:
                self.values[n] = 0
            else:
                value = 0
        if self.log.isEnabledFor(_DEBUG):
            self.log.debug("%s read %s = %#x", self.label, self._slots[n].name, value)
        return value

    def _write_slot(self, n: int, value: int, lanes: int) -> None:
        """Store ``value`` into slot ``n``; ``lanes`` marks the bytes written."""
        slot = self._slots[n]
        access = slot.reg.access
        if lanes != slot.full and not slot.reg.partial:
            self.log.info("%s: partial write to %s ignored", self.label, slot.name)
            return
        old = self.values[n]
        mask = slot.mask
        if access is Access.RW:
            value = (old & ~lanes) | (value & lanes)
            new = (old & ~mask) | (value & mask)
            if slot.reg.w1c:
                new &= ~(value & lanes & slot.reg.w1c)
        elif access is Access.RW1C:
            new = old & ~(value & mask)
        elif access is Access.RW1S:
            new = old | (value & mask)
        elif access is Access.WO:
            new = (old & ~lanes) | (value & mask & lanes)
        elif access is Access.RC and mask:
            new = (old & ~mask) | (value & mask)
        else:
            new = old
        self.values[n] = new
        if self.log.isEnabledFor(_DEBUG):
            self.log.debug("%s write %s = %#x (%#x -> %#x)", self.label, slot.name, value,
                           old, new)
        hook = self._write_hooks[n]
        if hook is not None:
            hook(slot.index, value, old)

    def _read_bytes(self, offset: int, count: int) -> bytes:
        end = self._check(offset, count)
        out = bytearray(count)
        pos = offset
        owner = self.layout.owner
        while pos < end:
            n = owner[pos]
            if n < 0:
                pos += 1
                continue
            slot = self._slots[n]
            raw = self._read_slot(n).to_bytes(slot.width, "little")
            lo = max(pos, slot.offset)
            hi = min(end, slot.offset + slot.width)
            out[lo - offset:hi - offset] = raw[lo - slot.offset:hi - slot.offset]
            pos = hi
        if self.log.isEnabledFor(logging.DEBUG) and all(owner[p] < 0 for p in range(offset, end)):
            self.log.debug("%s read of undeclared %#x+%d", self.label, offset, count)
        return bytes(out)

    def _write_bytes(self, offset: int, data: bytes) -> None:
        end = self._check(offset, len(data))
        pos = offset
        owner = self.layout.owner
        while pos < end:
            n = owner[pos]
            if n < 0:
                self.log.debug("%s write to undeclared %#x ignored", self.label, pos)
                pos += 1
                continue
            slot = self._slots[n]
            lo = max(pos, slot.offset)
            hi = min(end, slot.offset + slot.width)
            shift = 8 * (lo - slot.offset)
            value = int.from_bytes(data[lo - offset:hi - offset], "little") << shift
            lanes = ((1 << (8 * (hi - lo))) - 1) << shift
            self._write_slot(n, value, lanes)
            pos = hi

    # -- migration --------------------------------------------------------------------
    def save(self) -> list[int]:
        return list(self.values)

    def load(self, values: Sequence[int]) -> None:
        """Restore values from a migration stream, validated (hostile input)."""
        if len(values) != len(self.values):
            raise DeviceError(f"{self.label}: {len(values)} register values, "
                              f"expected {len(self.values)}", errno.EINVAL)
        for v, s in zip(values, self._slots, strict=True):
            if not 0 <= v <= s.full:
                raise DeviceError(f"{self.label}: {s.name} value out of range", errno.EINVAL)
        self.values[:] = values


def _bind(owner: Any, name: str | None, layout: str) -> Any:
    if name is None:
        return None
    hook = getattr(owner, name, None)
    if not callable(hook):
        raise TypeError(f"{layout}: hook {name!r} is not a method of {type(owner).__name__}")
    return hook
