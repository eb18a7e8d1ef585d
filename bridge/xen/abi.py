"""Byte layouts of Xen's ioreq ABI, and validation of every field.

Source: Xen public header ``xen/include/public/hvm/ioreq.h`` (as shipped by
Debian's ``libxen-dev`` 4.17 in ``/usr/include/xen/hvm/ioreq.h``).  The
layouts below are checked against that header by
``tests/bridge/xen/test_abi_probe.py``, which compiles a C probe.

``struct ioreq`` (32 bytes, one per vCPU in ``shared_iopage_t``)::

    @0  u64 addr       physical address / port / PCI SBDF+register
    @8  u64 data       value, or guest paddr of the data if data_is_ptr
    @16 u32 count      rep count
    @20 u32 size       bytes per element
    @24 u32 vp_eport   event channel (guest side) for this vCPU
    @28 u16 _pad0
    @30 u8  state:4 | data_is_ptr:1 | dir:1 | df:1 | _pad1:1   (LSB first)
    @31 u8  type

``struct buf_ioreq`` (8 bytes): the first little-endian dword holds
``type`` (bits 0-7), ``pad`` (8), ``dir`` (9), ``size`` (10-11, log2 of the
byte count) and ``addr`` (12-31, 20 bits; GCC packs the ``uint32_t addr:20``
bit field into the same dword); ``data`` is the second dword.  An 8-byte
write takes two slots, the high half in the second slot's data.

``struct buffered_iopage``: ``read_pointer`` u32 @0, ``write_pointer`` u32
@4, then ``IOREQ_BUFFER_SLOT_NUM`` (511) slots from @8.

Security: the guest may be able to write these pages (pages placed in the
guest physmap on hypervisors without resource mapping; XSA-199 /
CVE-2016-9637), so :func:`decode_ioreq` and :func:`decode_buf_ioreq`
validate every field and decode from one private snapshot of the bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from bridge.xen.errors import InvalidIoreq

PAGE_SIZE = 4096
DOMID_SELF = 0x7FF0  # public/xen.h: the calling domain
PAGE_SHIFT = 12

IOREQ_SIZE = 32
IOREQ_STRUCT = struct.Struct("<QQIIIHBB")
IOREQ_STATE_OFFSET = 30
IOREQ_DATA_OFFSET = 8
IOREQ_VP_EPORT_OFFSET = 24
MAX_VCPUS_PER_PAGE = PAGE_SIZE // IOREQ_SIZE

IOREQ_BUFFER_SLOT_NUM = 511
BUF_IOREQ_SIZE = 8
BUF_IOREQ_STRUCT = struct.Struct("<II")
BUFFERED_READ_POINTER_OFFSET = 0
BUFFERED_WRITE_POINTER_OFFSET = 4
BUFFERED_SLOTS_OFFSET = 8
BUF_IOREQ_ADDR_BITS = 20

# Bit positions inside byte 30 of struct ioreq.
_STATE_MASK = 0x0F
_DATA_IS_PTR_BIT = 1 << 4
_DIR_BIT = 1 << 5
_DF_BIT = 1 << 6

# Bit positions inside the first dword of struct buf_ioreq.
_BUF_TYPE_MASK = 0xFF
_BUF_PAD_BIT = 1 << 8
_BUF_DIR_BIT = 1 << 9
_BUF_SIZE_SHIFT = 10
_BUF_ADDR_SHIFT = 12

# Xen clips a rep string to one page of guest RAM (one element per byte at
# worst), so 4096 elements is a generous bound that still caps the work one
# request can cause.
MAX_REP_COUNT = 4096
PIO_PORT_LIMIT = 0x10000
PCI_CONFIG_SPACE_SIZE = 0x1000
_U64 = 1 << 64


class IoreqState(enum.IntEnum):
    """``STATE_*`` values of ``ioreq.state``."""

    NONE = 0
    IOREQ_READY = 1
    IOREQ_INPROCESS = 2
    IORESP_READY = 3


class IoreqDir(enum.IntEnum):
    """``IOREQ_READ`` / ``IOREQ_WRITE``."""

    WRITE = 0
    READ = 1


class IoreqType(enum.IntEnum):
    """``IOREQ_TYPE_*`` values understood by this server."""

    PIO = 0
    COPY = 1  # MMIO
    PCI_CONFIG = 2
    TIMEOFFSET = 7
    INVALIDATE = 8


class BufioreqMode(enum.IntEnum):
    """``HVM_IOREQSRV_BUFIOREQ_*`` (public/hvm/hvm_op.h)."""

    OFF = 0
    LEGACY = 1
    ATOMIC = 2


XENMEM_RESOURCE_IOREQ_SERVER = 0
XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ = 0


def resource_frame_ioreq(n: int) -> int:
    """``XENMEM_resource_ioreq_server_frame_ioreq(n)`` (public/memory.h)."""
    return 1 + n


def size_mask(size: int) -> int:
    """All-ones of ``size`` bytes: the value of a read nobody answers."""
    return (1 << (8 * size)) - 1


@dataclass(frozen=True, slots=True)
class Sbdf:
    """A PCI function address as Xen encodes it in a PCI_CONFIG ioreq."""

    segment: int
    bus: int
    device: int
    function: int

    @classmethod
    def from_int(cls, sbdf: int) -> Sbdf:
        """Split ``addr >> 32`` of a PCI_CONFIG ioreq (segment 16, bus 8, dev 5, fn 3)."""
        return cls((sbdf >> 16) & 0xFFFF, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F, sbdf & 0x7)

    def to_int(self) -> int:
        if not (0 <= self.segment <= 0xFFFF and 0 <= self.bus <= 0xFF
                and 0 <= self.device <= 0x1F and 0 <= self.function <= 0x7):
            raise ValueError(f"PCI address out of range: {self}")
        return (self.segment << 16) | (self.bus << 8) | (self.device << 3) | self.function

    def __str__(self) -> str:
        return f"{self.segment:04x}:{self.bus:02x}:{self.device:02x}.{self.function}"


@dataclass(frozen=True, slots=True)
class Ioreq:
    """One validated request.  Only :func:`decode_ioreq`/:func:`decode_buf_ioreq` build these.

    ``data`` is the value to write, or the guest-physical address of the
    first element when ``data_is_ptr``.  For PCI_CONFIG, :attr:`sbdf` and
    :attr:`reg` split ``addr``.
    """

    type: IoreqType
    dir: IoreqDir
    addr: int
    data: int
    size: int
    count: int
    data_is_ptr: bool
    df: bool

    @property
    def sbdf(self) -> int:
        return self.addr >> 32

    @property
    def reg(self) -> int:
        return self.addr & 0xFFFFFFFF

    @property
    def step(self) -> int:
        """Signed address step between elements (direction flag)."""
        return -self.size if self.df else self.size


@dataclass(frozen=True, slots=True)
class RawIoreq:
    """Every field of ``struct ioreq`` as stored, before validation."""

    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    pad0: int
    state: int
    data_is_ptr: int
    dir: int
    df: int
    pad1: int
    type: int


def unpack_ioreq(buf: bytes | memoryview) -> RawIoreq:
    """Split 32 bytes into the raw fields (no validation)."""
    addr, data, count, size, eport, pad0, bits, typ = IOREQ_STRUCT.unpack(buf)
    return RawIoreq(addr, data, count, size, eport, pad0, bits & _STATE_MASK,
                    (bits >> 4) & 1, (bits >> 5) & 1, (bits >> 6) & 1, (bits >> 7) & 1, typ)


def pack_ioreq(r: RawIoreq) -> bytes:
    """The inverse of :func:`unpack_ioreq` (used by the fake Xen and the tests)."""
    bits = ((r.state & _STATE_MASK) | (r.data_is_ptr & 1) << 4 | (r.dir & 1) << 5
            | (r.df & 1) << 6 | (r.pad1 & 1) << 7)
    return IOREQ_STRUCT.pack(r.addr, r.data, r.count, r.size, r.vp_eport, r.pad0, bits, r.type)


def state_of(bits: int) -> int:
    """The state nibble of byte 30."""
    return bits & _STATE_MASK


def with_state(bits: int, state: IoreqState) -> int:
    """Byte 30 with the state replaced and the other bit fields kept."""
    return (bits & ~_STATE_MASK & 0xFF) | int(state)


def _check_span(field: str, start: int, size: int, count: int, df: bool, limit: int) -> None:
    """Elements ``start, start±size, ...`` must lie in ``[0, limit)`` without wrapping."""
    span = size * count
    if df:
        lowest = start - (count - 1) * size
        if lowest < 0:
            raise InvalidIoreq(field, start, f"descending string of {span} bytes wraps below 0")
        if start + size > limit:
            raise InvalidIoreq(field, start, f"beyond {limit:#x}")
    elif start + span > limit:
        raise InvalidIoreq(field, start, f"string of {span} bytes wraps or exceeds {limit:#x}")


def validate(raw: RawIoreq) -> Ioreq:
    """Turn a raw request whose state is READY into an :class:`Ioreq`, or raise.

    Rules (ioreq.h; QEMU's xen-hvm-common.c handle_ioreq for what a device
    model may assume): known type; size 1/2/4 for port I/O, 1/2/4/8 for
    MMIO, 1/2/4 with count 1 for PCI config; 1 <= count <= MAX_REP_COUNT;
    ports within 64 KiB; strings that do not wrap; data_is_ptr only for
    port and memory strings.
    """
    if raw.state != IoreqState.IOREQ_READY:
        raise InvalidIoreq("state", raw.state, "not IOREQ_READY")
    try:
        typ = IoreqType(raw.type)
    except ValueError:
        raise InvalidIoreq("type", raw.type, "unknown ioreq type") from None
    direction = IoreqDir(raw.dir)
    ptr, df = bool(raw.data_is_ptr), bool(raw.df)
    if typ in (IoreqType.TIMEOFFSET, IoreqType.INVALIDATE):
        # No addressing: only the data (time offset) is used.
        if ptr:
            raise InvalidIoreq("data_is_ptr", 1, f"meaningless for {typ.name}")
        return Ioreq(typ, direction, 0, raw.data, 8, 1, False, False)
    allowed = {IoreqType.PIO: (1, 2, 4), IoreqType.COPY: (1, 2, 4, 8),
               IoreqType.PCI_CONFIG: (1, 2, 4)}[typ]
    if raw.size not in allowed:
        raise InvalidIoreq("size", raw.size, f"{typ.name} allows sizes {allowed}")
    if not 1 <= raw.count <= MAX_REP_COUNT:
        raise InvalidIoreq("count", raw.count, f"must be 1..{MAX_REP_COUNT}")
    if typ is IoreqType.PCI_CONFIG:
        if raw.count != 1 or ptr or df:
            raise InvalidIoreq("count", raw.count, "PCI_CONFIG needs count 1, no pointer, no df")
        reg = raw.addr & 0xFFFFFFFF
        if reg + raw.size > PCI_CONFIG_SPACE_SIZE:
            raise InvalidIoreq("addr", raw.addr, "register beyond 4 KiB config space")
    elif typ is IoreqType.PIO:
        # The port does not advance along a string; only the memory side does.
        if raw.addr + raw.size > PIO_PORT_LIMIT:
            raise InvalidIoreq("addr", raw.addr, "port + size beyond 0x10000")
    else:
        _check_span("addr", raw.addr, raw.size, raw.count, df, _U64)
    if ptr:
        _check_span("data", raw.data, raw.size, raw.count, df, _U64)
    data = raw.data if ptr else raw.data & size_mask(raw.size)
    return Ioreq(typ, direction, raw.addr, data, raw.size, raw.count, ptr, df)


def decode_ioreq(buf: bytes | memoryview) -> Ioreq:
    """Validate and decode one ``struct ioreq`` snapshot (32 bytes)."""
    if len(buf) != IOREQ_SIZE:
        raise ValueError(f"ioreq snapshot must be {IOREQ_SIZE} bytes, got {len(buf)}")
    return validate(unpack_ioreq(buf))


@dataclass(frozen=True, slots=True)
class RawBufIoreq:
    """Every field of ``struct buf_ioreq`` as stored."""

    type: int
    pad: int
    dir: int
    size_log2: int
    addr: int
    data: int


def unpack_buf_ioreq(buf: bytes | memoryview) -> RawBufIoreq:
    w0, data = BUF_IOREQ_STRUCT.unpack(buf)
    return RawBufIoreq(w0 & _BUF_TYPE_MASK, (w0 >> 8) & 1, (w0 >> 9) & 1,
                       (w0 >> _BUF_SIZE_SHIFT) & 3, w0 >> _BUF_ADDR_SHIFT, data)


def pack_buf_ioreq(r: RawBufIoreq) -> bytes:
    w0 = ((r.type & _BUF_TYPE_MASK) | (r.pad & 1) << 8 | (r.dir & 1) << 9
          | (r.size_log2 & 3) << _BUF_SIZE_SHIFT
          | (r.addr & ((1 << BUF_IOREQ_ADDR_BITS) - 1)) << _BUF_ADDR_SHIFT)
    return BUF_IOREQ_STRUCT.pack(w0, r.data & 0xFFFFFFFF)


def buf_ioreq_slots(first: bytes | memoryview) -> int:
    """How many ring slots the entry starting with ``first`` takes (2 for 8 bytes)."""
    return 2 if unpack_buf_ioreq(first).size_log2 == 3 else 1


def decode_buf_ioreq(first: bytes | memoryview, second: bytes | memoryview | None) -> Ioreq:
    """Validate a buffered ioreq; ``second`` is the next slot when the size is 8.

    Buffered ioreqs are writes only, count 1, never pointers (ioreq.h).
    """
    raw = unpack_buf_ioreq(first)
    if raw.dir != IoreqDir.WRITE:
        raise InvalidIoreq("dir", raw.dir, "buffered ioreqs are writes only")
    size = 1 << raw.size_log2
    data = raw.data
    if size == 8:
        if second is None:
            raise InvalidIoreq("size", size, "8-byte buffered ioreq without its second slot")
        data |= unpack_buf_ioreq(second).data << 32
    if raw.type not in (IoreqType.PIO, IoreqType.COPY, IoreqType.TIMEOFFSET):
        raise InvalidIoreq("type", raw.type, "not valid in the buffered ring")
    return validate(RawIoreq(raw.addr, data, 1, size, 0, 0, IoreqState.IOREQ_READY,
                             0, IoreqDir.WRITE, 0, 0, raw.type))


def ioreq_slot(page: memoryview, vcpu: int) -> memoryview:
    """The 32-byte view of vCPU ``vcpu``'s slot in a ``shared_iopage_t``."""
    if not 0 <= vcpu < len(page) // IOREQ_SIZE:
        raise IndexError(f"vCPU {vcpu} has no slot in a {len(page)}-byte page")
    return page[vcpu * IOREQ_SIZE:(vcpu + 1) * IOREQ_SIZE]


def buf_slot_offset(index: int) -> int:
    """Byte offset of ring slot ``index`` (taken modulo the slot count)."""
    return BUFFERED_SLOTS_OFFSET + (index % IOREQ_BUFFER_SLOT_NUM) * BUF_IOREQ_SIZE
