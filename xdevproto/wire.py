"""The vfio-user wire format: every message of the protocol, declared once.

Source: the vfio-user specification (QEMU ``docs/interop/vfio-user.rst``);
section names below refer to it. Where libvfio-user, the reference server,
sends something else, the decoder accepts what real peers send and the
choice is documented at the declaration (see also
``shared/reference/vfio-user-notes.md``).

Layout of this module:

* enums and flag sets, each value defined once;
* ``construct`` declarations of every fixed-layout payload (``*_S``);
* for the hot messages (header, REGION_READ/WRITE, DMA_READ/WRITE),
  ``struct.Struct`` views *generated from the same declarations*
  (:func:`fast_view`), so that a register access does not pay for a generic
  parse; tests prove both agree;
* one small frozen dataclass per payload, with ``encode()`` and a
  ``decode(payload)`` class method. Decoding validates sizes and raises
  :class:`~xdevproto.errors.PeerProtocolError` -- never anything else -- on
  bad input.

Nothing outside this module knows a byte offset of the protocol.
"""

from __future__ import annotations

import enum
import errno
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import construct as c

from .errors import PeerProtocolError

# --------------------------------------------------------------------------
# Enums ("Commands", "Header" and the per-command sections of the spec)


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    # 14 was DIRTY_PAGES (migration v1); it is not a command any more.
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18
    #: xdev's own (not in the spec), sent only to a server that accepted the
    #: xdev guest-memory extension in VERSION: drop every mapping of guest
    #: memory the server made itself, before replying (see XDEV_EXTENSION).
    XDEV_GUEST_MEMORY_INVALIDATE = 0xC000
    #: xdev's own, sent only to a server that accepted the xdev ioreq
    #: extension: serve this ioreq server's requests for these ranges of the
    #: device's regions yourself (payload IoreqServe; see XDEV_EXTENSION).
    XDEV_IOREQ_SERVE = 0xC001
    #: xdev's own: stop serving the ioreq server of XDEV_IOREQ_SERVE (unbind
    #: from it, lower the INTx line) before replying.
    XDEV_IOREQ_RELEASE = 0xC002


#: Commands a server may send to its client ("Server-to-client commands").
SERVER_TO_CLIENT = frozenset({Command.DMA_READ, Command.DMA_WRITE})

COMMAND_BY_VALUE: dict[int, Command] = {int(m): m for m in Command}


class HeaderFlags(enum.IntFlag):
    """Header ``flags``: bits 0-3 message type, bit 4 no-reply, bit 5 error."""

    TYPE_MASK = 0xF
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


HEADER_FLAGS_KNOWN = 0x3F
MSG_TYPE_COMMAND = 0
MSG_TYPE_REPLY = 1


class DeviceInfoFlags(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCapId(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2


class PciRegion(enum.IntEnum):
    """Region indexes of a PCI device (VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class IrqIndex(enum.IntEnum):
    """Interrupt indexes of a PCI device (VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5


class IrqInfoFlags(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class SetIrqsFlags(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


SET_IRQS_DATA_MASK = 0x7
SET_IRQS_ACTION_MASK = 0x38


class DmaMapFlags(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0  # migration v1 (libvfio-user only); refused by us
    ALL = 1 << 1


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1
    IOEVENTFD_SHADOW = 2  # libvfio-user extension


class Feature(enum.IntEnum):
    """DEVICE_FEATURE indexes (flags bits 0-15)."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


class FeatureFlags(enum.IntFlag):
    INDEX_MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class MigrationFlags(enum.IntFlag):
    STOP_COPY = 1 << 0
    P2P = 1 << 1
    PRE_COPY = 1 << 2


class MigState(enum.IntEnum):
    """Migration v2 device states (vfio_device_mig_state)."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


# --------------------------------------------------------------------------
# Limits and defaults ("Version", capability table)

HEADER_SIZE = 16
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
#: The largest message we ever accept: a data transfer plus its headers.
#: Anything larger is refused before it is buffered.
MAX_MESSAGE_SIZE = DEFAULT_MAX_DATA_XFER_SIZE + 64
#: Upper bound on a VERSION JSON string, so a peer cannot make us parse megabytes.
MAX_VERSION_JSON = 16384
#: Upper bound on fds we accept in one message (libvfio-user allows 1024).
MAX_MSG_FDS_LIMIT = 1024
WRITE_MULTI_MAX = 200  # QEMU's batch size; the spec sets no bound beyond msg size
WRITE_MULTI_DATA = 8

#: Capability key of xdev's own VERSION extensions. A peer that does not know
#: it ignores it (unknown keys are ignored by the spec), and a server only
#: echoes what it accepted, so standard peers are unaffected.
#:
#: ``{"xdev": {"guest_memory": {"kind": K, ...}}}`` from a client offers
#: guest memory the server may map itself (e.g. Xen foreign mappings of the
#: guest), so that its DMA needs no DMA_READ/DMA_WRITE messages. A server
#: accepts by echoing ``{"guest_memory": {"kind": K, "invalidate": true}}``:
#: it then answers XDEV_GUEST_MEMORY_INVALIDATE, which the client sends
#: whenever the guest's memory map changes (Xen's IOREQ_TYPE_INVALIDATE) and
#: which must drop every mapping before its reply. A client refuses an
#: acceptance without ``invalidate``: such a server would keep using frames
#: that no longer belong to the guest.
#:
#: ``{"xdev": {"ioreq": {"kind": "xen", "domid": N}}}`` from a client offers
#: the guest's accesses to the device's BARs straight from the hypervisor:
#: the client (xdev-bridge) keeps an ioreq server per device and routes the
#: BARs there; a server that echoes ``{"ioreq": {"kind": "xen"}}`` serves
#: that ioreq server's requests itself after XDEV_IOREQ_SERVE, and drives
#: the device's INTx line itself meanwhile (the client sees no BAR access to
#: end an interrupt by), until XDEV_IOREQ_RELEASE or the session's end.
XDEV_EXTENSION = "xdev"

# Domain aliases keep the declarations readable.
Iova = c.Int64ul
Offset = c.Int64ul
Size64 = c.Int64ul
ArgSz = c.Int32ul
Flags32 = c.Int32ul

# --------------------------------------------------------------------------
# construct declarations (one per fixed layout)

HEADER_S = c.Struct(
    "msg_id" / c.Int16ul,
    "command" / c.Int16ul,
    "msg_size" / c.Int32ul,
    "flags" / c.Int32ul,
    "error" / c.Int32ul,
)
VERSION_S = c.Struct("major" / c.Int16ul, "minor" / c.Int16ul)
DMA_MAP_S = c.Struct(
    "argsz" / ArgSz, "flags" / Flags32, "offset" / Offset, "address" / Iova, "size" / Size64
)
DMA_UNMAP_S = c.Struct("argsz" / ArgSz, "flags" / Flags32, "address" / Iova, "size" / Size64)
DEVICE_INFO_S = c.Struct(
    "argsz" / ArgSz, "flags" / Flags32, "num_regions" / c.Int32ul, "num_irqs" / c.Int32ul
)
REGION_INFO_S = c.Struct(
    "argsz" / ArgSz,
    "flags" / Flags32,
    "index" / c.Int32ul,
    "cap_offset" / c.Int32ul,
    "size" / Size64,
    "offset" / Offset,
)
CAP_HEADER_S = c.Struct("id" / c.Int16ul, "version" / c.Int16ul, "next" / c.Int32ul)
SPARSE_HEAD_S = c.Struct("nr_areas" / c.Int32ul, "reserved" / c.Int32ul)
SPARSE_AREA_S = c.Struct("offset" / Offset, "size" / Size64)
CAP_TYPE_S = c.Struct("type" / c.Int32ul, "subtype" / c.Int32ul)
REGION_IO_FDS_S = c.Struct(
    "argsz" / ArgSz, "flags" / Flags32, "index" / c.Int32ul, "count" / c.Int32ul
)
#: Sub-region entry as the spec prints it (40 bytes).
IO_FD_ENTRY_S = c.Struct(
    "offset" / Offset,
    "size" / Size64,
    "fd_index" / c.Int32ul,
    "type" / c.Int32ul,
    "flags" / c.Int32ul,
    "padding" / c.Int32ul,
    "datamatch" / c.Int64ul,
)
#: Sub-region entry as libvfio-user sends it (48 bytes, shadow ioeventfd).
IO_FD_ENTRY_LVU_S = c.Struct(
    "offset" / Offset,
    "size" / Size64,
    "fd_index" / c.Int32ul,
    "type" / c.Int32ul,
    "flags" / c.Int32ul,
    "shadow_fd_index" / c.Int32ul,
    "shadow_offset" / c.Int64ul,
    "datamatch" / c.Int64ul,
)
IRQ_INFO_S = c.Struct("argsz" / ArgSz, "flags" / Flags32, "index" / c.Int32ul, "count" / c.Int32ul)
SET_IRQS_S = c.Struct(
    "argsz" / ArgSz,
    "flags" / Flags32,
    "index" / c.Int32ul,
    "start" / c.Int32ul,
    "count" / c.Int32ul,
)
REGION_ACCESS_S = c.Struct("offset" / Offset, "region" / c.Int32ul, "count" / c.Int32ul)
DMA_ACCESS_S = c.Struct("address" / Iova, "count" / c.Int64ul)
#: DMA_WRITE reply as the spec prints it (u64 address, u32 count). libvfio-user
#: and its sample client use the 16-byte DMA_ACCESS_S layout, QEMU sends none.
DMA_WRITE_REPLY_SPEC_S = c.Struct("address" / Iova, "count" / c.Int32ul)
WRITE_MULTI_HEAD_S = c.Struct("wr_cnt" / c.Int64ul)
WRITE_MULTI_ENTRY_S = c.Struct(
    "offset" / Offset,
    "region" / c.Int32ul,
    "count" / c.Int32ul,
    "data" / c.Bytes(WRITE_MULTI_DATA),
)
DEVICE_FEATURE_S = c.Struct("argsz" / ArgSz, "flags" / Flags32)
FEAT_MIGRATION_S = c.Struct("flags" / c.Int64ul)
FEAT_MIG_STATE_S = c.Struct("device_state" / c.Int32ul, "data_fd" / c.Int32sl)
FEAT_LOGGING_S = c.Struct("page_size" / c.Int64ul, "num_ranges" / c.Int32ul, "reserved" / c.Int32ul)
FEAT_LOGGING_RANGE_S = c.Struct("iova" / Iova, "length" / Size64)
FEAT_REPORT_S = c.Struct("iova" / Iova, "length" / Size64, "page_size" / c.Int64ul)
MIG_DATA_S = c.Struct("argsz" / ArgSz, "size" / c.Int32ul)
#: XDEV_IOREQ_SERVE: which ioreq server, the guest's PCI address of the
#: device (Xen's SBDF), the guest's vCPUs, then ``nr_ranges`` ranges.
IOREQ_SERVE_HEAD_S = c.Struct(
    "ioservid" / c.Int32ul, "sbdf" / c.Int32ul, "nr_vcpus" / c.Int32ul, "nr_ranges" / c.Int32ul
)
#: One range of XDEV_IOREQ_SERVE: guest address, length, the device region it
#: shows, flags (IOREQ_RANGE_MMIO; port I/O without it).
IOREQ_RANGE_S = c.Struct(
    "start" / c.Int64ul, "size" / Size64, "region" / c.Int32ul, "flags" / Flags32
)
IOREQ_RANGE_MMIO = 1
IOREQ_SERVE_MAX_RANGES = 16  # six BARs and a ROM, with room to spare


def fast_view(decl: c.Struct) -> struct.Struct:
    """A ``struct.Struct`` equal to a declaration made only of fixed-size fields.

    Generated from the construct declaration so the two cannot drift apart.
    """
    fmt = "<"
    for sub in decl.subcons:
        inner = sub.subcon
        if isinstance(inner, c.FormatField):
            fmt += inner.fmtstr.lstrip("<>=!")
        elif isinstance(inner, c.Bytes) and isinstance(inner.length, int):
            fmt += f"{inner.length}s"
        else:
            raise TypeError(f"field {sub.name!r} has no fixed struct format")
    view = struct.Struct(fmt)
    if view.size != decl.sizeof():
        raise TypeError("fast view and declaration disagree in size")
    return view


HEADER = fast_view(HEADER_S)
REGION_ACCESS = fast_view(REGION_ACCESS_S)
DMA_ACCESS = fast_view(DMA_ACCESS_S)
#: Header and REGION_READ/WRITE body in one view: a register access is packed
#: and unpacked with one call.
HEADER_REGION_ACCESS_S = c.Struct(*HEADER_S.subcons, *REGION_ACCESS_S.subcons)
HEADER_REGION_ACCESS = fast_view(HEADER_REGION_ACCESS_S)
assert HEADER.size == HEADER_SIZE  # our own constant, not peer input

# --------------------------------------------------------------------------
# Header


@dataclass(frozen=True, slots=True)
class Header:
    """The 16-byte header carried by every message ("Header")."""

    msg_id: int
    command: int
    msg_size: int
    flags: int
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & HeaderFlags.TYPE_MASK == MSG_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlags.ERROR)

    def encode(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.msg_size, self.flags, self.error)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Header:
        if len(data) < HEADER_SIZE:
            raise PeerProtocolError("short header", fatal=True)
        return cls(*HEADER.unpack_from(data))


def check_header(hdr: Header) -> None:
    """Framing checks that make a stream untrustworthy when they fail."""
    if hdr.msg_size < HEADER_SIZE:
        raise PeerProtocolError(f"msg_size {hdr.msg_size} below the header size", fatal=True)
    if hdr.msg_size > MAX_MESSAGE_SIZE:
        raise PeerProtocolError(f"msg_size {hdr.msg_size} exceeds the limit", fatal=True)
    mtype = hdr.flags & HeaderFlags.TYPE_MASK
    if mtype not in (MSG_TYPE_COMMAND, MSG_TYPE_REPLY) or hdr.flags & ~HEADER_FLAGS_KNOWN:
        raise PeerProtocolError(f"bad header flags {hdr.flags:#x}")


# --------------------------------------------------------------------------
# Payload classes

P = TypeVar("P", bound="Payload")


def _short(name: str, have: int, need: int) -> PeerProtocolError:
    return PeerProtocolError(f"{name}: payload of {have} bytes, need {need}")


def _parse(decl: c.Struct, data: bytes | memoryview, name: str) -> c.Container:
    size = decl.sizeof()
    if len(data) < size:
        raise _short(name, len(data), size)
    return decl.parse(bytes(data[:size]))


class Payload:
    """Base of all payload classes."""

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls: type[P], data: bytes | memoryview) -> P:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """A payload of no bytes (DEVICE_RESET, most replies without data)."""

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Empty:
        return EMPTY


EMPTY = Empty()


@dataclass(frozen=True, slots=True)
class TwinSocket:
    supported: bool = False
    fd_index: int | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The VERSION capabilities object ("Version", capability table).

    ``migration`` keeps the v1 leftover ``{"pgsize": N}`` that libvfio-user
    still sends; ``extensions`` keeps any other key (ours: ``"xdev"``), so a
    standard peer's capabilities survive a decode/encode round trip.
    """

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES
    twin_socket: TwinSocket | None = None
    write_multiple: bool = False
    migration: Mapping[str, int] | None = None
    extensions: Mapping[str, Any] = field(default_factory=dict)
    #: keys present on the wire (absent ones took their defaults)
    present: frozenset[str] = frozenset()

    def to_json_obj(self) -> dict[str, Any]:
        caps: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
        }
        if self.twin_socket is not None:
            ts: dict[str, Any] = {"supported": self.twin_socket.supported}
            if self.twin_socket.fd_index is not None:
                ts["fd_index"] = self.twin_socket.fd_index
            caps["twin_socket"] = ts
        if self.write_multiple:
            caps["write_multiple"] = True
        if self.migration is not None:
            caps["migration"] = dict(self.migration)
        caps.update(self.extensions)
        return {"capabilities": caps}

    @classmethod
    def from_json_obj(cls, obj: Any) -> Capabilities:
        if not isinstance(obj, dict):
            raise PeerProtocolError("VERSION JSON is not an object")
        caps = obj.get("capabilities", {})
        if not isinstance(caps, dict):
            raise PeerProtocolError("VERSION capabilities is not an object")
        kw: dict[str, Any] = {}
        for key, lo, hi in (
            ("max_msg_fds", 0, MAX_MSG_FDS_LIMIT),
            ("max_data_xfer_size", 1, 1 << 32),
            ("max_dma_maps", 0, 1 << 32),
            ("pgsizes", 1, 1 << 64),
        ):
            if key in caps:
                kw[key] = _json_int(caps[key], key, lo, hi)
        if "twin_socket" in caps:
            kw["twin_socket"] = _twin_socket(caps["twin_socket"])
        if "write_multiple" in caps:
            if not isinstance(caps["write_multiple"], bool):
                raise PeerProtocolError("write_multiple is not a boolean")
            kw["write_multiple"] = caps["write_multiple"]
        if "migration" in caps:
            mig = caps["migration"]
            if not isinstance(mig, dict):
                raise PeerProtocolError("migration capability is not an object")
            kw["migration"] = {k: _json_int(v, k, 0, 1 << 64) for k, v in mig.items()}
        known = {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                 "twin_socket", "write_multiple", "migration"}
        kw["extensions"] = {k: v for k, v in caps.items() if k not in known}
        kw["present"] = frozenset(caps)
        return cls(**kw)


def _json_int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PeerProtocolError(f"capability {key} is not an integer")
    if not lo <= value <= hi:
        raise PeerProtocolError(f"capability {key}={value} out of range")
    return value


def _twin_socket(value: Any) -> TwinSocket:
    if not isinstance(value, dict):
        raise PeerProtocolError("twin_socket is not an object")
    supported = value.get("supported", False)
    if not isinstance(supported, bool):
        raise PeerProtocolError("twin_socket.supported is not a boolean")
    fd_index = value.get("fd_index")
    if fd_index is not None:
        fd_index = _json_int(fd_index, "twin_socket.fd_index", 0, MAX_MSG_FDS_LIMIT)
    return TwinSocket(supported, fd_index)


@dataclass(frozen=True, slots=True)
class Version(Payload):
    """VERSION request and reply: ``u16 major, u16 minor, char json[]``.

    The JSON is NUL-terminated on the wire. We always send the NUL; we also
    accept a string without it (some peers omit it) and an empty string
    (no capabilities: all defaults).
    """

    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)

    def encode(self) -> bytes:
        text = json.dumps(self.capabilities.to_json_obj(), separators=(",", ":"))
        return VERSION_S.build({"major": self.major, "minor": self.minor}) + text.encode() + b"\0"

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Version:
        head = _parse(VERSION_S, data, "VERSION")
        raw = bytes(data[VERSION_S.sizeof():])
        if len(raw) > MAX_VERSION_JSON:
            raise PeerProtocolError("VERSION JSON too long")
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        if b"\0" in raw:
            raise PeerProtocolError("VERSION JSON has an embedded NUL")
        if not raw.strip():
            return cls(head.major, head.minor, Capabilities())
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise PeerProtocolError(f"VERSION JSON does not parse: {exc}") from None
        return cls(head.major, head.minor, Capabilities.from_json_obj(obj))


def _fixed(decl: c.Struct, name: str) -> Callable[[type[P]], type[P]]:
    """Give a dataclass whose fields match ``decl`` its encode/decode."""

    names = [sub.name for sub in decl.subcons]
    view = fast_view(decl)
    size = view.size

    def wrap(cls: type[P]) -> type[P]:
        def encode(self: Any) -> bytes:
            return view.pack(*(getattr(self, n) for n in names))

        def decode(klass: type[P], data: bytes | memoryview) -> P:
            if len(data) < size:
                raise _short(name, len(data), size)
            return klass(*view.unpack_from(data))

        cls.encode = encode  # type: ignore[method-assign]
        cls.decode = classmethod(decode)  # type: ignore[assignment,method-assign]
        cls.SIZE = size  # type: ignore[attr-defined]
        cls.DECL = decl  # type: ignore[attr-defined]
        return cls

    return wrap


@_fixed(DMA_MAP_S, "DMA_MAP")
@dataclass(frozen=True, slots=True)
class DmaMap(Payload):
    """DMA_MAP request ("DMA_MAP"): argsz is the request size (32)."""

    argsz: int
    flags: int
    offset: int
    address: int
    size: int
    SIZE: ClassVar[int]


@_fixed(DMA_UNMAP_S, "DMA_UNMAP")
@dataclass(frozen=True, slots=True)
class DmaUnmap(Payload):
    """DMA_UNMAP request and reply (the reply echoes the request)."""

    argsz: int
    flags: int
    address: int
    size: int
    SIZE: ClassVar[int]


@_fixed(DEVICE_INFO_S, "DEVICE_GET_INFO")
@dataclass(frozen=True, slots=True)
class DeviceInfo(Payload):
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int
    SIZE: ClassVar[int]


@_fixed(IRQ_INFO_S, "DEVICE_GET_IRQ_INFO")
@dataclass(frozen=True, slots=True)
class IrqInfo(Payload):
    argsz: int
    flags: int
    index: int
    count: int
    SIZE: ClassVar[int]


@dataclass(frozen=True, slots=True)
class SparseArea:
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP (id 1, version 1)."""

    areas: tuple[SparseArea, ...]
    ID: ClassVar[int] = RegionCapId.SPARSE_MMAP
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        out = SPARSE_HEAD_S.build({"nr_areas": len(self.areas), "reserved": 0})
        return out + b"".join(SPARSE_AREA_S.build({"offset": a.offset, "size": a.size})
                              for a in self.areas)


@dataclass(frozen=True, slots=True)
class TypeCap:
    """VFIO_REGION_INFO_CAP_TYPE (id 2): marks a device-specific region."""

    type: int
    subtype: int
    ID: ClassVar[int] = RegionCapId.TYPE
    VERSION: ClassVar[int] = 1

    def body(self) -> bytes:
        return CAP_TYPE_S.build({"type": self.type, "subtype": self.subtype})


@dataclass(frozen=True, slots=True)
class RawCap:
    """A region capability we do not interpret, kept as bytes."""

    id: int
    version: int
    data: bytes

    def body(self) -> bytes:
        return self.data


RegionCap = SparseMmapCap | TypeCap | RawCap
MAX_REGION_CAPS = 16
MAX_SPARSE_AREAS = 1024


@dataclass(frozen=True, slots=True)
class RegionInfo(Payload):
    """DEVICE_GET_REGION_INFO request and reply (``struct vfio_region_info``).

    A reply whose capabilities did not fit the client's argsz carries only
    the 32-byte struct, with ``argsz`` set to the size needed ("Message
    sizes": the client retries with a bigger buffer).
    """

    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int
    caps: tuple[RegionCap, ...] = ()
    SIZE: ClassVar[int] = REGION_INFO_S.sizeof()

    def encode(self) -> bytes:
        chain = b""
        pos = self.SIZE
        bodies = [(cap, cap.body()) for cap in self.caps]
        for i, (cap, body) in enumerate(bodies):
            cap_id = cap.id if isinstance(cap, RawCap) else cap.ID
            version = cap.version if isinstance(cap, RawCap) else cap.VERSION
            end = pos + CAP_HEADER_S.sizeof() + len(body)
            nxt = end if i + 1 < len(bodies) else 0
            chain += CAP_HEADER_S.build({"id": cap_id, "version": version, "next": nxt}) + body
            pos = end
        cap_offset = self.SIZE if self.caps else self.cap_offset
        head = REGION_INFO_S.build({
            "argsz": self.argsz, "flags": self.flags, "index": self.index,
            "cap_offset": cap_offset, "size": self.size, "offset": self.offset,
        })
        return head + chain

    @property
    def encoded_size(self) -> int:
        return self.SIZE + sum(CAP_HEADER_S.sizeof() + len(cap.body()) for cap in self.caps)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> RegionInfo:
        head = _parse(REGION_INFO_S, data, "DEVICE_GET_REGION_INFO")
        caps: list[RegionCap] = []
        if head.flags & RegionFlags.CAPS and head.cap_offset:
            caps = _decode_caps(bytes(data), head.cap_offset)
        return cls(head.argsz, head.flags, head.index, head.cap_offset, head.size, head.offset,
                   tuple(caps))


def _decode_caps(data: bytes, first: int) -> list[RegionCap]:
    """Walk a capability chain. Offsets must move forward and stay inside the
    payload, so a hostile chain can neither loop nor read out of bounds."""
    caps: list[RegionCap] = []
    pos = first
    hsize = CAP_HEADER_S.sizeof()
    while pos:
        if pos < REGION_INFO_S.sizeof() or pos + hsize > len(data):
            raise PeerProtocolError(f"region capability at {pos} is out of bounds")
        if len(caps) >= MAX_REGION_CAPS:
            raise PeerProtocolError("too many region capabilities")
        ch = CAP_HEADER_S.parse(data[pos:pos + hsize])
        if ch.next and ch.next < pos + hsize:
            raise PeerProtocolError("region capability chain goes backwards")
        end = ch.next or len(data)
        if end > len(data):
            raise PeerProtocolError("region capability runs past the payload")
        body = data[pos + hsize:end]
        caps.append(_decode_cap(ch.id, ch.version, body))
        pos = ch.next
    return caps


def _decode_cap(cap_id: int, version: int, body: bytes) -> RegionCap:
    if cap_id == RegionCapId.SPARSE_MMAP:
        sh = _parse(SPARSE_HEAD_S, body, "sparse mmap capability")
        asize = SPARSE_AREA_S.sizeof()
        if sh.nr_areas > MAX_SPARSE_AREAS or 8 + sh.nr_areas * asize > len(body):
            raise PeerProtocolError("sparse mmap capability: bad area count")
        areas = tuple(
            SparseArea(*struct.unpack_from("<QQ", body, 8 + i * asize))
            for i in range(sh.nr_areas)
        )
        return SparseMmapCap(areas)
    if cap_id == RegionCapId.TYPE:
        t = _parse(CAP_TYPE_S, body, "type capability")
        return TypeCap(t.type, t.subtype)
    return RawCap(cap_id, version, bytes(body))


@dataclass(frozen=True, slots=True)
class IoFdEntry:
    """A sub-region of DEVICE_GET_REGION_IO_FDS.

    ``shadow_fd_index``/``shadow_offset`` exist only in libvfio-user's 48-byte
    entries (shadow ioeventfd); the spec's entries are 40 bytes.
    """

    offset: int
    size: int
    fd_index: int
    type: int
    flags: int
    datamatch: int
    shadow_fd_index: int | None = None
    shadow_offset: int = 0


MAX_IO_FD_ENTRIES = 1024


@dataclass(frozen=True, slots=True)
class RegionIoFds(Payload):
    argsz: int
    flags: int
    index: int
    count: int
    entries: tuple[IoFdEntry, ...] = ()
    SIZE: ClassVar[int] = REGION_IO_FDS_S.sizeof()

    def encode(self) -> bytes:
        out = REGION_IO_FDS_S.build({"argsz": self.argsz, "flags": self.flags,
                                     "index": self.index, "count": self.count})
        for e in self.entries:
            out += IO_FD_ENTRY_S.build({
                "offset": e.offset, "size": e.size, "fd_index": e.fd_index, "type": e.type,
                "flags": e.flags, "padding": 0, "datamatch": e.datamatch,
            })
        return out

    @classmethod
    def decode(cls, data: bytes | memoryview) -> RegionIoFds:
        h = _parse(REGION_IO_FDS_S, data, "DEVICE_GET_REGION_IO_FDS")
        rest = bytes(data[cls.SIZE:])
        entries: list[IoFdEntry] = []
        if rest:
            if h.count == 0 or h.count > MAX_IO_FD_ENTRIES or len(rest) % h.count:
                raise PeerProtocolError("region io fds: entries do not match count")
            stride = len(rest) // h.count
            if stride == IO_FD_ENTRY_S.sizeof():
                for i in range(h.count):
                    e = IO_FD_ENTRY_S.parse(rest[i * stride:(i + 1) * stride])
                    entries.append(IoFdEntry(e.offset, e.size, e.fd_index, e.type, e.flags,
                                             e.datamatch))
            elif stride == IO_FD_ENTRY_LVU_S.sizeof():
                for i in range(h.count):
                    e = IO_FD_ENTRY_LVU_S.parse(rest[i * stride:(i + 1) * stride])
                    entries.append(IoFdEntry(e.offset, e.size, e.fd_index, e.type, e.flags,
                                             e.datamatch, e.shadow_fd_index, e.shadow_offset))
            else:
                raise PeerProtocolError(f"region io fds: unknown entry size {stride}")
        return cls(h.argsz, h.flags, h.index, h.count, tuple(entries))


@dataclass(frozen=True, slots=True)
class SetIrqs(Payload):
    """DEVICE_SET_IRQS request; ``data`` holds the DATA_BOOL bytes."""

    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    SIZE: ClassVar[int] = SET_IRQS_S.sizeof()

    def encode(self) -> bytes:
        return SET_IRQS_S.build({"argsz": self.argsz, "flags": self.flags, "index": self.index,
                                 "start": self.start, "count": self.count}) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> SetIrqs:
        h = _parse(SET_IRQS_S, data, "DEVICE_SET_IRQS")
        return cls(h.argsz, h.flags, h.index, h.start, h.count, bytes(data[cls.SIZE:]))


@dataclass(slots=True)  # not frozen: made on every access, four times cheaper
class RegionAccess(Payload):
    """REGION_READ/REGION_WRITE request and reply: ``u64 offset, u32 region,
    u32 count`` then, for a write request or a read reply, ``count`` bytes."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    def encode(self) -> bytes:
        return REGION_ACCESS.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> RegionAccess:
        if len(data) < REGION_ACCESS.size:
            raise _short("REGION access", len(data), REGION_ACCESS.size)
        offset, region, count = REGION_ACCESS.unpack_from(data)
        return cls(offset, region, count, bytes(data[REGION_ACCESS.size:]))


@dataclass(slots=True)  # not frozen: made on every access, four times cheaper
class DmaAccess(Payload):
    """DMA_READ/DMA_WRITE request and reply: ``u64 address, u64 count`` and,
    for a write request or a read reply, ``count`` bytes.

    The DMA_WRITE reply is ambiguous among peers: the spec prints a 12-byte
    ``{u64, u32}``, libvfio-user requires a 16-byte echo, QEMU sends nothing.
    We send the 16-byte echo and accept all three (count 0 when absent).
    """

    address: int
    count: int
    data: bytes = b""

    def encode(self) -> bytes:
        return DMA_ACCESS.pack(self.address, self.count) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> DmaAccess:
        if len(data) < DMA_ACCESS.size:
            raise _short("DMA access", len(data), DMA_ACCESS.size)
        address, count = DMA_ACCESS.unpack_from(data)
        return cls(address, count, bytes(data[DMA_ACCESS.size:]))

    @classmethod
    def decode_write_reply(cls, data: bytes | memoryview) -> DmaAccess:
        if len(data) == 0:
            return cls(0, 0)
        if len(data) == DMA_WRITE_REPLY_SPEC_S.sizeof():
            r = DMA_WRITE_REPLY_SPEC_S.parse(bytes(data))
            return cls(r.address, r.count)
        if len(data) == DMA_ACCESS.size:
            return cls(*DMA_ACCESS.unpack_from(data))
        raise PeerProtocolError(f"DMA_WRITE reply of {len(data)} bytes")


@dataclass(frozen=True, slots=True)
class WriteMultiEntry:
    offset: int
    region: int
    count: int
    data: bytes  # always 8 bytes on the wire; the first ``count`` are written


@dataclass(frozen=True, slots=True)
class RegionWriteMulti(Payload):
    """REGION_WRITE_MULTI request: ``u64 wr_cnt`` then 32-byte entries."""

    entries: tuple[WriteMultiEntry, ...]

    def encode(self) -> bytes:
        out = WRITE_MULTI_HEAD_S.build({"wr_cnt": len(self.entries)})
        for e in self.entries:
            out += WRITE_MULTI_ENTRY_S.build({"offset": e.offset, "region": e.region,
                                              "count": e.count,
                                              "data": e.data.ljust(WRITE_MULTI_DATA, b"\0")})
        return out

    @classmethod
    def decode(cls, data: bytes | memoryview) -> RegionWriteMulti:
        h = _parse(WRITE_MULTI_HEAD_S, data, "REGION_WRITE_MULTI")
        esize = WRITE_MULTI_ENTRY_S.sizeof()
        if h.wr_cnt == 0 or h.wr_cnt > WRITE_MULTI_MAX:
            raise PeerProtocolError(f"REGION_WRITE_MULTI: wr_cnt {h.wr_cnt} out of range")
        if len(data) != 8 + h.wr_cnt * esize:
            raise PeerProtocolError("REGION_WRITE_MULTI: size does not match wr_cnt")
        entries = []
        for i in range(h.wr_cnt):
            e = WRITE_MULTI_ENTRY_S.parse(bytes(data[8 + i * esize:8 + (i + 1) * esize]))
            if e.count > WRITE_MULTI_DATA:
                raise PeerProtocolError("REGION_WRITE_MULTI: entry count above 8")
            entries.append(WriteMultiEntry(e.offset, e.region, e.count, e.data))
        return cls(tuple(entries))


@_fixed(WRITE_MULTI_HEAD_S, "REGION_WRITE_MULTI reply")
@dataclass(frozen=True, slots=True)
class WriteMultiReply(Payload):
    wr_cnt: int


@dataclass(frozen=True, slots=True)
class DeviceFeature(Payload):
    """DEVICE_FEATURE request and reply: ``u32 argsz, u32 flags, data``.

    ``data`` is interpreted per feature by the ``Feat*`` classes below.
    """

    argsz: int
    flags: int
    data: bytes = b""
    SIZE: ClassVar[int] = DEVICE_FEATURE_S.sizeof()

    @property
    def feature(self) -> int:
        return self.flags & FeatureFlags.INDEX_MASK

    def encode(self) -> bytes:
        return DEVICE_FEATURE_S.build({"argsz": self.argsz, "flags": self.flags}) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> DeviceFeature:
        h = _parse(DEVICE_FEATURE_S, data, "DEVICE_FEATURE")
        return cls(h.argsz, h.flags, bytes(data[cls.SIZE:]))


@_fixed(FEAT_MIGRATION_S, "MIGRATION feature")
@dataclass(frozen=True, slots=True)
class FeatMigration(Payload):
    flags: int
    SIZE: ClassVar[int]


@_fixed(FEAT_MIG_STATE_S, "MIG_DEVICE_STATE feature")
@dataclass(frozen=True, slots=True)
class FeatMigState(Payload):
    device_state: int
    data_fd: int = -1
    SIZE: ClassVar[int]


MAX_LOGGING_RANGES = 4096


@dataclass(frozen=True, slots=True)
class FeatDmaLogging(Payload):
    """DMA_LOGGING_START/STOP data: page size and ranges (none = everything)."""

    page_size: int
    ranges: tuple[tuple[int, int], ...] = ()

    def encode(self) -> bytes:
        out = FEAT_LOGGING_S.build({"page_size": self.page_size,
                                    "num_ranges": len(self.ranges), "reserved": 0})
        return out + b"".join(FEAT_LOGGING_RANGE_S.build({"iova": i, "length": n})
                              for i, n in self.ranges)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> FeatDmaLogging:
        h = _parse(FEAT_LOGGING_S, data, "DMA logging")
        rsize = FEAT_LOGGING_RANGE_S.sizeof()
        base = FEAT_LOGGING_S.sizeof()
        if h.num_ranges > MAX_LOGGING_RANGES or len(data) < base + h.num_ranges * rsize:
            raise PeerProtocolError("DMA logging: bad range count")
        ranges = tuple(struct.unpack_from("<QQ", data, base + i * rsize)
                       for i in range(h.num_ranges))
        return cls(h.page_size, ranges)


@dataclass(frozen=True, slots=True)
class FeatDmaLoggingReport(Payload):
    """DMA_LOGGING_REPORT data: the range asked about and, in the reply, a
    bitmap of u64 words, bit n standing for page ``iova + n * page_size``."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes = b""
    SIZE: ClassVar[int] = FEAT_REPORT_S.sizeof()

    def encode(self) -> bytes:
        return FEAT_REPORT_S.build({"iova": self.iova, "length": self.length,
                                    "page_size": self.page_size}) + self.bitmap

    @classmethod
    def decode(cls, data: bytes | memoryview) -> FeatDmaLoggingReport:
        h = _parse(FEAT_REPORT_S, data, "DMA logging report")
        return cls(h.iova, h.length, h.page_size, bytes(data[cls.SIZE:]))


@dataclass(frozen=True, slots=True)
class MigData(Payload):
    """MIG_DATA_READ/MIG_DATA_WRITE: ``u32 argsz, u32 size`` then data.

    A MIG_DATA_READ request has no data. libvfio-user pads its READ reply to
    the requested size: the ``size`` field, not the message size, says how
    much is data.
    """

    argsz: int
    size: int
    data: bytes = b""
    SIZE: ClassVar[int] = MIG_DATA_S.sizeof()

    def encode(self) -> bytes:
        return MIG_DATA_S.build({"argsz": self.argsz, "size": self.size}) + self.data

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MigData:
        h = _parse(MIG_DATA_S, data, "MIG_DATA")
        body = bytes(data[cls.SIZE:])
        if len(body) > h.size:
            body = body[:h.size]
        return cls(h.argsz, h.size, body)


@dataclass(frozen=True, slots=True)
class IoreqRange:
    start: int
    size: int
    region: int
    mmio: bool


@dataclass(frozen=True, slots=True)
class IoreqServe(Payload):
    """XDEV_IOREQ_SERVE request: ``IOREQ_SERVE_HEAD_S`` then ``nr_ranges``
    times ``IOREQ_RANGE_S``. Ranges are non-empty, inside 64 bits (port
    ranges inside 16), and do not overlap."""

    ioservid: int
    sbdf: int
    nr_vcpus: int
    ranges: tuple[IoreqRange, ...] = ()

    def encode(self) -> bytes:
        out = IOREQ_SERVE_HEAD_S.build({"ioservid": self.ioservid, "sbdf": self.sbdf,
                                        "nr_vcpus": self.nr_vcpus,
                                        "nr_ranges": len(self.ranges)})
        for r in self.ranges:
            out += IOREQ_RANGE_S.build({"start": r.start, "size": r.size, "region": r.region,
                                        "flags": IOREQ_RANGE_MMIO if r.mmio else 0})
        return out

    @classmethod
    def decode(cls, data: bytes | memoryview) -> IoreqServe:
        h = _parse(IOREQ_SERVE_HEAD_S, data, "XDEV_IOREQ_SERVE")
        hsize, rsize = IOREQ_SERVE_HEAD_S.sizeof(), IOREQ_RANGE_S.sizeof()
        if h.nr_ranges > IOREQ_SERVE_MAX_RANGES:
            raise PeerProtocolError(f"XDEV_IOREQ_SERVE: {h.nr_ranges} ranges, at most "
                                    f"{IOREQ_SERVE_MAX_RANGES}")
        if len(data) != hsize + h.nr_ranges * rsize:
            raise PeerProtocolError("XDEV_IOREQ_SERVE: size does not match nr_ranges")
        ranges: list[IoreqRange] = []
        for i in range(h.nr_ranges):
            e = IOREQ_RANGE_S.parse(bytes(data[hsize + i * rsize:hsize + (i + 1) * rsize]))
            if e.flags & ~IOREQ_RANGE_MMIO:
                raise PeerProtocolError(f"XDEV_IOREQ_SERVE: unknown range flags {e.flags:#x}")
            mmio = bool(e.flags & IOREQ_RANGE_MMIO)
            limit = 1 << 64 if mmio else 1 << 16
            if not e.size or e.start + e.size > limit:
                raise PeerProtocolError(f"XDEV_IOREQ_SERVE: bad range {e.start:#x}+{e.size:#x}")
            ranges.append(IoreqRange(e.start, e.size, e.region, mmio))
        for a in ranges:
            for b in ranges:
                if a is not b and a.mmio == b.mmio and a.start < b.start + b.size \
                        and b.start < a.start + a.size:
                    raise PeerProtocolError("XDEV_IOREQ_SERVE: ranges overlap")
        return cls(h.ioservid, h.sbdf, h.nr_vcpus, tuple(ranges))


# --------------------------------------------------------------------------
# Which payload class each command uses, per direction

REQUEST_TYPES: dict[Command, type[Payload]] = {
    Command.VERSION: Version,
    Command.DMA_MAP: DmaMap,
    Command.DMA_UNMAP: DmaUnmap,
    Command.DEVICE_GET_INFO: DeviceInfo,
    Command.DEVICE_GET_REGION_INFO: RegionInfo,
    Command.DEVICE_GET_REGION_IO_FDS: RegionIoFds,
    Command.DEVICE_GET_IRQ_INFO: IrqInfo,
    Command.DEVICE_SET_IRQS: SetIrqs,
    Command.REGION_READ: RegionAccess,
    Command.REGION_WRITE: RegionAccess,
    Command.DMA_READ: DmaAccess,
    Command.DMA_WRITE: DmaAccess,
    Command.DEVICE_RESET: Empty,
    Command.REGION_WRITE_MULTI: RegionWriteMulti,
    Command.DEVICE_FEATURE: DeviceFeature,
    Command.MIG_DATA_READ: MigData,
    Command.MIG_DATA_WRITE: MigData,
    Command.XDEV_GUEST_MEMORY_INVALIDATE: Empty,
    Command.XDEV_IOREQ_SERVE: IoreqServe,
    Command.XDEV_IOREQ_RELEASE: Empty,
}

REPLY_TYPES: dict[Command, type[Payload]] = {
    **REQUEST_TYPES,
    Command.DMA_MAP: Empty,
    Command.DEVICE_SET_IRQS: Empty,
    Command.REGION_WRITE_MULTI: WriteMultiReply,
    Command.MIG_DATA_WRITE: Empty,
    Command.XDEV_IOREQ_SERVE: Empty,
}


def decode_payload(command: int, is_reply: bool, data: bytes | memoryview) -> Payload:
    """Decode a payload; unknown commands and bad bytes raise PeerProtocolError."""
    cmd = COMMAND_BY_VALUE.get(command)
    if cmd is None:
        raise PeerProtocolError(f"unknown command {command}", errno.ENOSYS)
    if is_reply and cmd is Command.DMA_WRITE:
        return DmaAccess.decode_write_reply(data)
    table = REPLY_TYPES if is_reply else REQUEST_TYPES
    try:
        return table[cmd].decode(data)
    except PeerProtocolError:
        raise
    except (c.ConstructError, struct.error, ValueError, OverflowError) as exc:
        raise PeerProtocolError(f"{cmd.name}: {exc}") from None


def encode_message(msg_id: int, command: int, flags: int, payload: bytes, error: int = 0) -> bytes:
    """Header plus payload, as one buffer to send with one sendmsg()."""
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload
