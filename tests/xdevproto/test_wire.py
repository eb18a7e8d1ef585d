"""Golden bytes for every vfio-user message, in both directions.

The bytes below are written by hand from the tables of the vfio-user
specification (QEMU ``docs/interop/vfio-user.rst``) and from what
libvfio-user sends where it differs -- never produced by our encoder.
Every field sits on its own line with its name. Each case is checked both
ways: encoding the object gives the golden bytes, decoding the golden bytes
gives the object. All integers are little-endian.
"""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xdevproto import wire
from xdevproto.connection import Connection, InvalidMessage, Reply, Request, Role
from xdevproto.errors import PeerProtocolError
from xdevproto.wire import (
    Capabilities,
    Command,
    DeviceFeature,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    FeatDmaLogging,
    FeatDmaLoggingReport,
    FeatMigration,
    FeatMigState,
    IoFdEntry,
    IrqInfo,
    MigData,
    RawCap,
    RegionAccess,
    RegionInfo,
    RegionIoFds,
    RegionWriteMulti,
    SetIrqs,
    SparseArea,
    SparseMmapCap,
    TwinSocket,
    TypeCap,
    Version,
    WriteMultiEntry,
    WriteMultiReply,
)


def hx(text: str) -> bytes:
    """Hex with spaces, newlines and ``#`` comments allowed."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


# -- golden messages -----------------------------------------------------------
# (name, command, is_reply, golden message bytes, payload object)

CLIENT_CAPS_JSON = (
    b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
    b'"max_dma_maps":65535,"pgsizes":4096,"twin_socket":{"supported":true},'
    b'"write_multiple":true,"migration":{"pgsize":4096}}}'
)
CLIENT_CAPS = Capabilities(
    max_msg_fds=8, max_data_xfer_size=1048576, max_dma_maps=65535, pgsizes=4096,
    twin_socket=TwinSocket(True), write_multiple=True, migration={"pgsize": 4096},
    present=frozenset({"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                       "twin_socket", "write_multiple", "migration"}),
)
SERVER_CAPS_JSON = (
    b'{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":65536,'
    b'"max_dma_maps":16,"pgsizes":4096,"twin_socket":{"supported":true,"fd_index":0}}}'
)
SERVER_CAPS = Capabilities(
    max_msg_fds=1, max_data_xfer_size=65536, max_dma_maps=16, pgsizes=4096,
    twin_socket=TwinSocket(True, 0),
    present=frozenset({"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                       "twin_socket"}),
)
assert len(CLIENT_CAPS_JSON) == 182 and len(SERVER_CAPS_JSON) == 140


GOLDEN: list[tuple[str, Command, bool, bytes, wire.Payload]] = [
    ("VERSION request", Command.VERSION, False, hx("""
        0100 0100 # msg_id 1, command VERSION
        cb000000  # msg_size 16 + 4 + 182 + 1 = 203
        00000000  # flags: command
        00000000  # error
        0000      # major 0
        0200      # minor 2
        """) + CLIENT_CAPS_JSON + b"\0", Version(0, 2, CLIENT_CAPS)),
    ("VERSION reply", Command.VERSION, True, hx("""
        0100 0100 # msg_id 1, command VERSION
        a1000000  # msg_size 16 + 4 + 140 + 1 = 161
        01000000  # flags: reply
        00000000  # error
        0000 0100 # major 0, minor 1
        """) + SERVER_CAPS_JSON + b"\0", Version(0, 1, SERVER_CAPS)),
    ("DMA_MAP request", Command.DMA_MAP, False, hx("""
        0200 0200 30000000 00000000 00000000  # id 2, DMA_MAP, size 48, command
        20000000          # argsz 32
        03000000          # flags READ|WRITE
        0010000000000000  # offset 0x1000
        0000000001000000  # address 0x1_0000_0000
        0020000000000000  # size 0x2000
        """), DmaMap(32, 3, 0x1000, 0x1_0000_0000, 0x2000)),
    ("DMA_MAP reply", Command.DMA_MAP, True, hx("""
        0200 0200 10000000 01000000 00000000  # id 2, DMA_MAP, size 16, reply
        """), wire.EMPTY),
    ("DMA_UNMAP request", Command.DMA_UNMAP, False, hx("""
        0300 0300 28000000 00000000 00000000  # id 3, DMA_UNMAP, size 40, command
        18000000          # argsz 24
        00000000          # flags
        0000000001000000  # address 0x1_0000_0000
        0020000000000000  # size 0x2000
        """), DmaUnmap(24, 0, 0x1_0000_0000, 0x2000)),
    ("DMA_UNMAP reply", Command.DMA_UNMAP, True, hx("""
        0300 0300 28000000 01000000 00000000  # the reply echoes the request
        18000000 00000000 0000000001000000 0020000000000000
        """), DmaUnmap(24, 0, 0x1_0000_0000, 0x2000)),
    ("DMA_UNMAP FLAG_ALL request", Command.DMA_UNMAP, False, hx("""
        0400 0300 28000000 00000000 00000000
        18000000          # argsz 24
        02000000          # flags VFIO_DMA_UNMAP_FLAG_ALL
        0000000000000000  # address 0
        0000000000000000  # size 0
        """), DmaUnmap(24, 2, 0, 0)),
    ("DEVICE_GET_INFO request", Command.DEVICE_GET_INFO, False, hx("""
        0500 0400 20000000 00000000 00000000  # id 5, GET_INFO, size 32
        10000000 00000000 00000000 00000000   # argsz 16, flags, num_regions, num_irqs
        """), DeviceInfo(16, 0, 0, 0)),
    ("DEVICE_GET_INFO reply", Command.DEVICE_GET_INFO, True, hx("""
        0500 0400 20000000 01000000 00000000
        10000000  # argsz 16
        03000000  # flags RESET|PCI
        09000000  # num_regions 9
        05000000  # num_irqs 5
        """), DeviceInfo(16, 3, 9, 5)),
    ("GET_REGION_INFO request", Command.DEVICE_GET_REGION_INFO, False, hx("""
        0600 0500 30000000 00000000 00000000  # size 16 + 32
        50000000 00000000  # argsz 80, flags
        02000000 00000000  # index 2, cap_offset
        0000000000000000   # size
        0000000000000000   # offset
        """), RegionInfo(80, 0, 2, 0, 0, 0)),
    ("GET_REGION_INFO reply with caps", Command.DEVICE_GET_REGION_INFO, True, hx("""
        0600 0500 60000000 01000000 00000000  # size 16 + 80
        50000000          # argsz 80
        0f000000          # flags READ|WRITE|MMAP|CAPS
        02000000          # index 2
        20000000          # cap_offset 32
        0000010000000000  # size 0x10000
        0000000000000000  # offset 0
        0100 0100         # cap id SPARSE_MMAP, version 1
        40000000          # next 64
        01000000          # nr_areas 1
        00000000          # reserved
        0000000000000000  # area offset 0
        0080000000000000  # area size 0x8000
        0200 0100         # cap id TYPE, version 1
        00000000          # next 0: end of chain
        01000000          # type 1
        03000000          # subtype 3
        """), RegionInfo(80, 0xF, 2, 32, 0x10000, 0,
                         (SparseMmapCap((SparseArea(0, 0x8000),)), TypeCap(1, 3)))),
    ("GET_REGION_INFO truncated reply", Command.DEVICE_GET_REGION_INFO, True, hx("""
        0600 0500 30000000 01000000 00000000  # size 16 + 32: no room for caps
        50000000          # argsz 80: what the full reply needs
        07000000          # flags READ|WRITE|MMAP (no CAPS, as libvfio-user)
        02000000 00000000 # index 2, cap_offset 0
        0000010000000000  # size 0x10000
        0000000000000000  # offset
        """), RegionInfo(80, 7, 2, 0, 0x10000, 0)),
    ("GET_REGION_IO_FDS request", Command.DEVICE_GET_REGION_IO_FDS, False, hx("""
        0700 0600 20000000 00000000 00000000
        38000000 00000000 # argsz 56, flags 0
        00000000 00000000 # index 0, count 0
        """), RegionIoFds(56, 0, 0, 0)),
    ("GET_REGION_IO_FDS reply", Command.DEVICE_GET_REGION_IO_FDS, True, hx("""
        0700 0600 48000000 01000000 00000000  # size 16 + 16 + 40
        38000000 00000000 # argsz 56, flags
        00000000 01000000 # index 0, count 1
        1000000000000000  # offset 0x10
        0400000000000000  # size 4
        00000000          # fd_index 0
        00000000          # type IOEVENTFD
        01000000          # flags KVM_IOEVENTFD_FLAG_DATAMATCH
        00000000          # padding
        3412000000000000  # datamatch 0x1234
        """), RegionIoFds(56, 0, 0, 1, (IoFdEntry(0x10, 4, 0, 0, 1, 0x1234),))),
    ("GET_REGION_IO_FDS truncated reply", Command.DEVICE_GET_REGION_IO_FDS, True, hx("""
        0700 0600 20000000 01000000 00000000
        38000000 00000000 00000000 01000000  # argsz 56 needed, count 1, no entries
        """), RegionIoFds(56, 0, 0, 1)),
    ("GET_IRQ_INFO request", Command.DEVICE_GET_IRQ_INFO, False, hx("""
        0800 0700 20000000 00000000 00000000
        10000000 00000000 02000000 00000000  # argsz 16, flags, index MSI-X, count
        """), IrqInfo(16, 0, 2, 0)),
    ("GET_IRQ_INFO reply", Command.DEVICE_GET_IRQ_INFO, True, hx("""
        0800 0700 20000000 01000000 00000000
        10000000  # argsz
        09000000  # flags EVENTFD|NORESIZE
        02000000  # index 2
        04000000  # count 4
        """), IrqInfo(16, 9, 2, 4)),
    ("SET_IRQS reply", Command.DEVICE_SET_IRQS, True, hx("""
        0900 0800 10000000 01000000 00000000
        """), wire.EMPTY),
    ("REGION_READ request", Command.REGION_READ, False, hx("""
        0a00 0900 20000000 00000000 00000000
        1000000000000000  # offset 0x10
        00000000          # region BAR0
        04000000          # count 4
        """), RegionAccess(0x10, 0, 4)),
    ("REGION_READ reply", Command.REGION_READ, True, hx("""
        0a00 0900 24000000 01000000 00000000  # size 36
        1000000000000000 00000000 04000000
        efbeadde          # data
        """), RegionAccess(0x10, 0, 4, b"\xef\xbe\xad\xde")),
    ("REGION_WRITE request", Command.REGION_WRITE, False, hx("""
        0b00 0a00 22000000 00000000 00000000  # size 34
        0400000000000000 07000000 02000000    # offset 4, region CONFIG, count 2
        0600              # data
        """), RegionAccess(4, 7, 2, b"\x06\x00")),
    ("REGION_WRITE reply", Command.REGION_WRITE, True, hx("""
        0b00 0a00 20000000 01000000 00000000
        0400000000000000 07000000 02000000
        """), RegionAccess(4, 7, 2)),
    ("DMA_READ request", Command.DMA_READ, False, hx("""
        0c00 0b00 20000000 00000000 00000000
        0000100000000000  # address 0x100000
        0300000000000000  # count 3
        """), DmaAccess(0x100000, 3)),
    ("DMA_READ reply", Command.DMA_READ, True, hx("""
        0c00 0b00 23000000 01000000 00000000  # size 35
        0000100000000000 0300000000000000
        616263            # data
        """), DmaAccess(0x100000, 3, b"abc")),
    ("DMA_WRITE request", Command.DMA_WRITE, False, hx("""
        0d00 0c00 22000000 00000000 00000000
        0000100000000000 0200000000000000 7879  # address, count 2, data
        """), DmaAccess(0x100000, 2, b"xy")),
    ("DMA_WRITE reply (libvfio-user, 16-byte echo)", Command.DMA_WRITE, True, hx("""
        0d00 0c00 20000000 01000000 00000000
        0000100000000000 0200000000000000
        """), DmaAccess(0x100000, 2)),
    ("DEVICE_RESET request", Command.DEVICE_RESET, False, hx("""
        0e00 0d00 10000000 00000000 00000000
        """), wire.EMPTY),
    ("DEVICE_RESET reply", Command.DEVICE_RESET, True, hx("""
        0e00 0d00 10000000 01000000 00000000
        """), wire.EMPTY),
    # xdev's own command: header only both ways, command 0xC000.
    ("XDEV_GUEST_MEMORY_INVALIDATE request", Command.XDEV_GUEST_MEMORY_INVALIDATE, False, hx("""
        2a00 00c0 10000000 00000000 00000000
        """), wire.EMPTY),
    ("XDEV_GUEST_MEMORY_INVALIDATE reply", Command.XDEV_GUEST_MEMORY_INVALIDATE, True, hx("""
        2a00 00c0 10000000 01000000 00000000
        """), wire.EMPTY),
    # xdev's own: serve an ioreq server (0xC001), release it (0xC002).
    ("XDEV_IOREQ_SERVE request", Command.XDEV_IOREQ_SERVE, False, hx("""
        2b00 01c0 50000000 00000000 00000000  # size 16 + 16 + 2*24
        03000000 28000000 02000000 02000000   # ioservid 3, sbdf 00:05.0, 2 vCPUs, 2 ranges
        000000f000000000 0000020000000000 00000000 01000000  # MMIO 0xf0000000+128K: BAR0
        00c0000000000000 4000000000000000 01000000 00000000  # ports 0xc000+64: BAR1
        """), wire.IoreqServe(3, 0x28, 2, (wire.IoreqRange(0xF000_0000, 0x20000, 0, True),
                                            wire.IoreqRange(0xC000, 0x40, 1, False)))),
    ("XDEV_IOREQ_SERVE reply", Command.XDEV_IOREQ_SERVE, True, hx("""
        2b00 01c0 10000000 01000000 00000000
        """), wire.EMPTY),
    ("XDEV_IOREQ_RELEASE request", Command.XDEV_IOREQ_RELEASE, False, hx("""
        2c00 02c0 10000000 00000000 00000000
        """), wire.EMPTY),
    ("XDEV_IOREQ_RELEASE reply", Command.XDEV_IOREQ_RELEASE, True, hx("""
        2c00 02c0 10000000 01000000 00000000
        """), wire.EMPTY),
    ("REGION_WRITE_MULTI request", Command.REGION_WRITE_MULTI, False, hx("""
        0f00 0f00 48000000 00000000 00000000  # size 16 + 8 + 2*24
        0200000000000000  # wr_cnt 2
        0000000000000000 00000000 04000000 0100000000000000  # BAR0+0, 4 bytes
        0800000000000000 02000000 01000000 ff00000000000000  # BAR2+8, 1 byte
        """), RegionWriteMulti((WriteMultiEntry(0, 0, 4, b"\x01" + b"\0" * 7),
                                WriteMultiEntry(8, 2, 1, b"\xff" + b"\0" * 7)))),
    ("REGION_WRITE_MULTI reply", Command.REGION_WRITE_MULTI, True, hx("""
        0f00 0f00 18000000 01000000 00000000
        0200000000000000  # wr_cnt 2
        """), WriteMultiReply(2)),
    ("DEVICE_FEATURE MIGRATION GET", Command.DEVICE_FEATURE, False, hx("""
        1000 1000 18000000 00000000 00000000
        10000000  # argsz 16: room for the u64 flags
        01000100  # flags: feature MIGRATION | GET
        """), DeviceFeature(16, 0x10001)),
    ("DEVICE_FEATURE MIGRATION GET reply", Command.DEVICE_FEATURE, True, hx("""
        1000 1000 20000000 01000000 00000000
        10000000 01000100
        0500000000000000  # STOP_COPY|PRE_COPY
        """), DeviceFeature(16, 0x10001, hx("0500000000000000"))),
    ("DEVICE_FEATURE MIG_DEVICE_STATE SET", Command.DEVICE_FEATURE, False, hx("""
        1100 1000 20000000 00000000 00000000
        10000000  # argsz 16
        02000200  # flags: feature MIG_DEVICE_STATE | SET
        03000000  # device_state STOP_COPY
        ffffffff  # data_fd -1
        """), DeviceFeature(16, 0x20002, hx("03000000 ffffffff"))),
    ("DEVICE_FEATURE DMA_LOGGING_START SET", Command.DEVICE_FEATURE, False, hx("""
        1200 1000 38000000 00000000 00000000
        28000000          # argsz 40
        06000200          # flags: DMA_LOGGING_START | SET
        0010000000000000  # page_size 4096
        01000000 00000000 # num_ranges 1, reserved
        0000100000000000  # iova 0x100000
        0000010000000000  # length 0x10000
        """), DeviceFeature(40, 0x20006, hx(
            "0010000000000000 01000000 00000000 0000100000000000 0000010000000000"))),
    ("DEVICE_FEATURE DMA_LOGGING_STOP SET", Command.DEVICE_FEATURE, False, hx("""
        1300 1000 28000000 00000000 00000000
        18000000          # argsz 24
        07000200          # flags: DMA_LOGGING_STOP | SET
        0010000000000000 00000000 00000000  # page_size, no ranges
        """), DeviceFeature(24, 0x20007, hx("0010000000000000 00000000 00000000"))),
    ("DEVICE_FEATURE DMA_LOGGING_REPORT GET", Command.DEVICE_FEATURE, False, hx("""
        1400 1000 30000000 00000000 00000000
        28000000          # argsz 40: 8 + 24 + one bitmap word
        08000100          # flags: DMA_LOGGING_REPORT | GET
        0000100000000000  # iova
        0000010000000000  # length 0x10000: 16 pages
        0010000000000000  # page_size
        """), DeviceFeature(40, 0x10008, hx(
            "0000100000000000 0000010000000000 0010000000000000"))),
    ("DEVICE_FEATURE DMA_LOGGING_REPORT reply", Command.DEVICE_FEATURE, True, hx("""
        1400 1000 38000000 01000000 00000000
        28000000 08000100
        0000100000000000 0000010000000000 0010000000000000
        0580000000000000  # bitmap: pages 0, 2 and 15 dirty
        """), DeviceFeature(40, 0x10008, hx(
            "0000100000000000 0000010000000000 0010000000000000 0580000000000000"))),
    ("DEVICE_FEATURE PROBE", Command.DEVICE_FEATURE, False, hx("""
        1500 1000 18000000 00000000 00000000
        08000000 02000400  # argsz 8, flags MIG_DEVICE_STATE | PROBE
        """), DeviceFeature(8, 0x40002)),
    ("MIG_DATA_READ request", Command.MIG_DATA_READ, False, hx("""
        1600 1100 18000000 00000000 00000000
        10000000 08000000  # argsz 16, size 8
        """), MigData(16, 8)),
    ("MIG_DATA_READ reply", Command.MIG_DATA_READ, True, hx("""
        1600 1100 1b000000 01000000 00000000  # size 16 + 8 + 3
        10000000 03000000  # argsz 16, size 3: less than asked, no more for now
        414243
        """), MigData(16, 3, b"ABC")),
    ("MIG_DATA_WRITE request", Command.MIG_DATA_WRITE, False, hx("""
        1700 1200 1b000000 00000000 00000000
        0b000000 03000000 414243  # argsz 11, size 3, data
        """), MigData(11, 3, b"ABC")),
    ("MIG_DATA_WRITE reply", Command.MIG_DATA_WRITE, True, hx("""
        1700 1200 10000000 01000000 00000000
        """), wire.EMPTY),
]

# SET_IRQS requests, one per data type x action ("DEVICE_SET_IRQS").
SET_IRQS_FLAGS = {
    ("NONE", "MASK"): "09000000", ("NONE", "UNMASK"): "11000000",
    ("NONE", "TRIGGER"): "21000000", ("BOOL", "MASK"): "0a000000",
    ("BOOL", "UNMASK"): "12000000", ("BOOL", "TRIGGER"): "22000000",
    ("EVENTFD", "MASK"): "0c000000", ("EVENTFD", "UNMASK"): "14000000",
    ("EVENTFD", "TRIGGER"): "24000000",
}
for (dtype, action), flags_hex in SET_IRQS_FLAGS.items():
    data = b"\x01\x00" if dtype == "BOOL" else b""
    argsz = 20 + len(data)
    GOLDEN.append((f"SET_IRQS {dtype}|{action} request", Command.DEVICE_SET_IRQS, False, hx(f"""
        1800 0800 {16 + argsz:02x}000000 00000000 00000000
        {argsz:02x}000000  # argsz: the whole request
        {flags_hex}        # flags
        01000000           # index MSI
        01000000           # start 1
        02000000           # count 2
        """) + data, SetIrqs(argsz, int.from_bytes(bytes.fromhex(flags_hex), "little"), 1, 1, 2,
                             data)))


@pytest.mark.parametrize("name,cmd,is_reply,golden,obj", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_message(name: str, cmd: Command, is_reply: bool, golden: bytes,
                        obj: wire.Payload) -> None:
    hdr = wire.Header.decode(golden)
    assert hdr.command == cmd and hdr.is_reply == is_reply and hdr.msg_size == len(golden)
    flags = wire.HeaderFlags.REPLY if is_reply else 0
    assert wire.encode_message(hdr.msg_id, cmd, flags, obj.encode()) == golden
    assert wire.decode_payload(cmd, is_reply, golden[16:]) == obj


def test_every_command_has_request_and_reply_golden() -> None:
    seen = {(cmd, is_reply) for _, cmd, is_reply, _, _ in GOLDEN}
    assert seen == {(cmd, r) for cmd in Command for r in (False, True)}


# -- decode-only cases: what other peers send and we do not ---------------------


def test_version_libvfio_user_reply() -> None:
    """libvfio-user answers with three keys; the rest take spec defaults."""
    raw = hx("0000 0200") + (b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
                             b'"migration":{"pgsize":4096}}}\0')
    v = wire.decode_payload(Command.VERSION, True, raw)
    assert isinstance(v, Version)
    assert (v.major, v.minor) == (0, 2)
    caps = v.capabilities
    assert (caps.max_msg_fds, caps.max_data_xfer_size) == (8, 1 << 20)
    assert (caps.max_dma_maps, caps.pgsizes) == (65535, 4096)
    assert caps.migration == {"pgsize": 4096} and caps.twin_socket is None
    assert not caps.write_multiple
    assert caps.present == {"max_msg_fds", "max_data_xfer_size", "migration"}


@pytest.mark.parametrize("json_bytes", [b"", b"\0", b" \0"])
def test_version_without_capabilities_takes_defaults(json_bytes: bytes) -> None:
    v = Version.decode(hx("0000 0100") + json_bytes)
    assert v == Version(0, 1, Capabilities())


def test_version_json_without_nul_is_accepted() -> None:
    v = Version.decode(hx("0000 0100") + b'{"capabilities":{"max_msg_fds":2}}')
    assert v.capabilities.max_msg_fds == 2


def test_version_unknown_keys_survive_round_trip() -> None:
    raw = hx("0000 0200") + b'{"capabilities":{"xdev":{"a":1}}}\0'
    v = Version.decode(raw)
    assert v.capabilities.extensions == {"xdev": {"a": 1}}
    assert Version.decode(v.encode()).capabilities.extensions == {"xdev": {"a": 1}}


def test_region_io_fds_libvfio_user_48_byte_entry() -> None:
    """libvfio-user's shadow ioeventfd entry (48 bytes), as sent by
    shadow_ioeventfd_server: argsz 64, count 1, entry (0, 4, 0, 2, 0, 1, 0, 0)."""
    raw = hx("""
        40000000 00000000 00000000 01000000  # argsz 64, flags, index 0, count 1
        0000000000000000  # gpa_offset 0
        0400000000000000  # size 4
        00000000          # fd_index 0
        02000000          # type IOEVENTFD_SHADOW
        00000000          # flags
        01000000          # shadow_mem_fd_index 1
        0000000000000000  # shadow_offset
        0000000000000000  # datamatch
        """)
    p = wire.decode_payload(Command.DEVICE_GET_REGION_IO_FDS, True, raw)
    assert p == RegionIoFds(64, 0, 0, 1, (IoFdEntry(0, 4, 0, 2, 0, 0, 1, 0),))


def test_dma_write_reply_spec_12_bytes() -> None:
    """The spec prints the DMA_WRITE reply as ``u64 address, u32 count``."""
    raw = hx("0000100000000000 02000000")
    assert wire.decode_payload(Command.DMA_WRITE, True, raw) == DmaAccess(0x100000, 2)


def test_dma_write_reply_qemu_empty() -> None:
    """QEMU's DMA_WRITE reply is header-only."""
    assert wire.decode_payload(Command.DMA_WRITE, True, b"") == DmaAccess(0, 0)


def test_dma_write_reply_other_sizes_refused() -> None:
    with pytest.raises(PeerProtocolError):
        wire.decode_payload(Command.DMA_WRITE, True, b"\0" * 8)


def test_mig_data_read_libvfio_user_padded_reply() -> None:
    """libvfio-user pads the READ reply to the requested size: the ``size``
    field, not msg_size, says how much is data."""
    raw = hx("10000000 03000000 414243 0000000000")
    assert wire.decode_payload(Command.MIG_DATA_READ, True, raw) == MigData(16, 3, b"ABC")


def test_region_info_unknown_capability_kept_raw() -> None:
    raw = hx("""
        30000000 08000000 09000000 20000000 0010000000000000 0000000000000000
        0700 0200 00000000  # unknown cap id 7, version 2, last
        aabbccdd eeff0011   # its body
        """)
    p = RegionInfo.decode(raw)
    assert p.caps == (RawCap(7, 2, hx("aabbccdd eeff0011")),)
    assert p.encode() == raw


# -- per-feature data ("DEVICE_FEATURE") -----------------------------------------

FEATURE_DATA: list[tuple[bytes, wire.Payload]] = [
    (hx("0500000000000000"), FeatMigration(5)),
    (hx("02000000 ffffffff"), FeatMigState(2, -1)),
    (hx("06000000 00000000"), FeatMigState(6, 0)),
    (hx("0010000000000000 02000000 00000000"
        "0000100000000000 0010000000000000"
        "0000200000000000 0020000000000000"),
     FeatDmaLogging(4096, ((0x100000, 0x1000), (0x200000, 0x2000)))),
    (hx("0010000000000000 00000000 00000000"), FeatDmaLogging(4096)),
    (hx("0000100000000000 0000010000000000 0010000000000000"),
     FeatDmaLoggingReport(0x100000, 0x10000, 4096)),
    (hx("0000100000000000 0000010000000000 0010000000000000 0580000000000000"),
     FeatDmaLoggingReport(0x100000, 0x10000, 4096, hx("0580000000000000"))),
]


@pytest.mark.parametrize("golden,obj", FEATURE_DATA)
def test_feature_data(golden: bytes, obj: wire.Payload) -> None:
    assert obj.encode() == golden
    assert type(obj).decode(golden) == obj


# -- error replies, both directions ("Header": Error bit and errno) --------------


def negotiated_pair() -> tuple[Connection, Connection]:
    """A client and a server Connection after VERSION (no I/O)."""
    client = Connection(Role.CLIENT, Capabilities(max_msg_fds=8, write_multiple=True))
    server = Connection(Role.SERVER, Capabilities(max_msg_fds=8, write_multiple=True))
    server.receive_data(client.start_version())
    req = server.next_event()
    assert isinstance(req, Request)
    reply = server.accept_version(req)
    client.receive_data(server.send_reply(req, reply))
    assert isinstance(client.next_event(), Reply)
    return client, server


CLIENT_COMMANDS = [c for c in Command if c not in wire.SERVER_TO_CLIENT and c != Command.VERSION]


@pytest.mark.parametrize("cmd", list(Command), ids=lambda c: c.name)
def test_error_reply_golden(cmd: Command) -> None:
    golden = hx(f"""
        2a00 {int(cmd) & 0xFF:02x}{int(cmd) >> 8:02x}  # msg_id 42, the command
        10000000  # msg_size 16: header only
        21000000  # flags: reply | ERROR
        16000000  # error EINVAL (22)
        """)
    assert Connection.send_error(42, cmd, errno.EINVAL) == golden


def test_error_reply_errno_zero_or_too_big_becomes_einval() -> None:
    assert Connection.send_error(1, 9, 0)[12:] == hx("16000000")
    assert Connection.send_error(1, 9, 5000)[12:] == hx("16000000")


@pytest.mark.parametrize("cmd", [*CLIENT_COMMANDS, Command.DMA_READ, Command.DMA_WRITE],
                         ids=lambda c: c.name)
def test_error_reply_received(cmd: Command) -> None:
    client, server = negotiated_pair()
    me = server if cmd in wire.SERVER_TO_CLIENT else client
    msg_id, _ = me.send_request(cmd, b"")
    me.receive_data(struct.pack("<HH", msg_id, cmd)
                    + hx("10000000 21000000 05000000"))  # size 16, reply|ERROR, EIO
    ev = me.next_event()
    assert ev == Reply(msg_id, cmd, None, [], errno.EIO)


def test_error_reply_with_payload_ignored() -> None:
    """libvfio-user: a failed REGION_READ of 4 bytes came back with flags
    0x21, error 22 and its 20-byte payload still attached."""
    client, _ = negotiated_pair()
    msg_id, _ = client.send_request(Command.REGION_READ, RegionAccess(0, 0, 4))
    client.receive_data(struct.pack("<HHIII", msg_id, 9, 36, 0x21, 22)
                        + hx("0000000000000000 00000000 04000000 00000000"))
    assert client.next_event() == Reply(msg_id, Command.REGION_READ, None, [], errno.EINVAL)
    assert client.buffered == 0


def test_error_reply_with_errno_zero_means_einval() -> None:
    client, _ = negotiated_pair()
    msg_id, _ = client.send_request(Command.DEVICE_RESET, b"")
    client.receive_data(struct.pack("<HHIII", msg_id, 13, 16, 0x21, 0))
    ev = client.next_event()
    assert isinstance(ev, Reply) and ev.error == errno.EINVAL


def test_error_reply_to_version_closes() -> None:
    client = Connection(Role.CLIENT)
    client.start_version()
    client.receive_data(hx("0100 0100 10000000 21000000 10000000"))  # EBUSY
    ev = client.next_event()
    assert isinstance(ev, Reply) and ev.error == errno.EBUSY
    assert client.state.value == "closed"


# -- the struct fast paths equal the construct declarations ------------------------

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=50, deadline=None)
@given(U16, U16, U32, U32, U32)
def test_fast_header_equals_construct(msg_id: int, cmd: int, size: int, flags: int,
                                      err: int) -> None:
    d = {"msg_id": msg_id, "command": cmd, "msg_size": size, "flags": flags, "error": err}
    packed = wire.HEADER.pack(msg_id, cmd, size, flags, err)
    assert packed == wire.HEADER_S.build(d)
    parsed = wire.HEADER_S.parse(packed)
    assert wire.HEADER.unpack(packed) == tuple(parsed[k] for k in d)
    assert wire.Header.decode(packed) == wire.Header(msg_id, cmd, size, flags, err)


@settings(max_examples=50, deadline=None)
@given(U64, U32, U32)
def test_fast_region_access_equals_construct(offset: int, region: int, count: int) -> None:
    d = {"offset": offset, "region": region, "count": count}
    packed = wire.REGION_ACCESS.pack(offset, region, count)
    assert packed == wire.REGION_ACCESS_S.build(d)
    parsed = wire.REGION_ACCESS_S.parse(packed)
    assert RegionAccess.decode(packed) == RegionAccess(parsed.offset, parsed.region, parsed.count)


@settings(max_examples=50, deadline=None)
@given(U64, U64)
def test_fast_dma_access_equals_construct(address: int, count: int) -> None:
    packed = wire.DMA_ACCESS.pack(address, count)
    assert packed == wire.DMA_ACCESS_S.build({"address": address, "count": count})
    parsed = wire.DMA_ACCESS_S.parse(packed)
    assert DmaAccess.decode(packed) == DmaAccess(parsed.address, parsed.count)


@settings(max_examples=50, deadline=None)
@given(st.tuples(U16, U16, U32, U32, U32, U64, U32, U32))
def test_fast_header_region_access_equals_construct(values: tuple[int, ...]) -> None:
    names = [s.name for s in wire.HEADER_REGION_ACCESS_S.subcons]
    packed = wire.HEADER_REGION_ACCESS.pack(*values)
    assert packed == wire.HEADER_S.build(dict(zip(names[:5], values[:5], strict=True))) \
        + wire.REGION_ACCESS_S.build(dict(zip(names[5:], values[5:], strict=True)))


@pytest.mark.parametrize("cls", [DmaMap, DmaUnmap, DeviceInfo, IrqInfo, WriteMultiReply,
                                 FeatMigration, FeatMigState])
def test_fixed_classes_equal_their_declaration(cls: type[wire.Payload]) -> None:
    decl = cls.DECL  # type: ignore[attr-defined]
    names = [s.name for s in decl.subcons]
    values = [(-7 if n == "data_fd" else 0x0102030405060708 >> (64 - 8 * s.subcon.sizeof()))
              for n, s in zip(names, decl.subcons, strict=True)]
    obj = cls(*values)
    assert obj.encode() == decl.build(dict(zip(names, values, strict=True)))
    assert cls.decode(obj.encode()) == obj


def test_fast_view_refuses_variable_fields() -> None:
    import construct as c
    with pytest.raises(TypeError):
        wire.fast_view(c.Struct("x" / c.GreedyBytes))


def test_fast_region_paths_equal_general_paths() -> None:
    """Connection.region_request/region_reply/fast_request/region_reply_data
    agree with the general encoder and the event path."""
    client, server = negotiated_pair()
    msg_id, fast, expect = client.region_request(Command.REGION_WRITE, 0x20, 2, 4, b"abcd")
    assert fast == wire.encode_message(msg_id, Command.REGION_WRITE, 0,
                                       RegionAccess(0x20, 2, 4, b"abcd").encode())
    assert server.fast_request(fast) == (msg_id, 10, 0x20, 2, 4, b"abcd", False)
    # A posted write is the same command with NO_REPLY, and is taken as one.
    posted = client.posted_write(0x20, 2, b"abcd")
    assert posted == wire.encode_message(msg_id + 1, Command.REGION_WRITE,
                                         wire.HeaderFlags.NO_REPLY,
                                         RegionAccess(0x20, 2, 4, b"abcd").encode())
    assert server.fast_request(posted) == (msg_id + 1, 10, 0x20, 2, 4, b"abcd", True)
    _, server2 = negotiated_pair()
    server2.receive_data(fast)
    ev = server2.next_event()
    assert isinstance(ev, Request) and ev.payload == RegionAccess(0x20, 2, 4, b"abcd")
    rep = server.region_reply(msg_id, Command.REGION_READ, 0x20, 2, 4, b"wxyz")
    assert rep == wire.encode_message(msg_id, Command.REGION_READ, wire.HeaderFlags.REPLY,
                                      RegionAccess(0x20, 2, 4, b"wxyz").encode())
    # The expected header is the successful reply's, byte for byte.
    ok = server.region_reply(msg_id, Command.REGION_WRITE, 0x20, 2, 4)
    assert ok == expect
    # region_reply_data takes only that reply, whole: not another command's,
    # nor one for another access or id, an error, or a partial message.
    assert client.region_reply_data(bytearray(rep), len(rep), expect, 32) is None
    for other in (server.region_reply(msg_id, Command.REGION_WRITE, 0x24, 2, 4),
                  server.region_reply(msg_id + 1, Command.REGION_WRITE, 0x20, 2, 4),
                  Connection.send_error(msg_id, Command.REGION_WRITE, errno.EINVAL)):
        assert client.region_reply_data(bytearray(other), len(other), expect, 32) is None
    assert client.region_reply_data(bytearray(ok) + bytes(8), 40, expect, 32) is None
    assert client.region_reply_data(bytearray(ok), 32, expect, 32) == b""
    # A read's data comes back; the general path sees the reply once expected.
    msg_id, _, expect = client.region_request(Command.REGION_READ, 0x20, 2, 4)
    rep = server.region_reply(msg_id, Command.REGION_READ, 0x20, 2, 4, b"wxyz")
    assert client.region_reply_data(bytearray(rep), 30, expect, 36) is None
    assert client.region_reply_data(bytearray(rep), 36, expect, 36) == b"wxyz"
    msg_id, _, _ = client.region_request(Command.REGION_READ, 0x20, 2, 4)
    client.expect_reply(msg_id, Command.REGION_READ)
    client.receive_data(server.region_reply(msg_id, Command.REGION_READ, 0x20, 2, 4, b"abcd"))
    ev = client.next_event()
    assert isinstance(ev, Reply) and ev.payload == RegionAccess(0x20, 2, 4, b"abcd")


def test_fast_request_declines_what_needs_checks() -> None:
    _, server = negotiated_pair()
    bad = [
        wire.encode_message(1, 9, 0x10, RegionAccess(0, 0, 4).encode()),  # a read, NO_REPLY
        wire.encode_message(1, 10, 0x20, RegionAccess(0, 0, 1, b"a").encode()),  # ERROR bit
        wire.encode_message(1, 10, 0, RegionAccess(0, 0, 4, b"ab").encode()),  # short data
        wire.encode_message(1, 9, 0, RegionAccess(0, 0, 1 << 21).encode()),  # over max
        wire.encode_message(1, 4, 0, DeviceInfo(16, 0, 0, 0).encode()),
    ]
    for raw in bad:
        assert server.fast_request(raw) is None
    server.receive_data(bad[1])
    ev = server.next_event()
    assert isinstance(ev, InvalidMessage) and ev.error.errno == errno.EINVAL


@pytest.mark.parametrize("body, why", [
    ("03000000 28000000 01000000 11000000", "ranges, at most"),          # 17 ranges
    ("03000000 28000000 01000000 01000000", "size does not match"),      # range missing
    ("03000000 28000000 01000000 01000000"
     "0000000000000000 0000000000000000 00000000 01000000", "bad range"),  # empty
    ("03000000 28000000 01000000 01000000"
     "00f0ffffffffffff 0000010000000000 00000000 01000000", "bad range"),  # past 2**64
    ("03000000 28000000 01000000 01000000"
     "00ff000000000000 0002000000000000 01000000 00000000", "bad range"),  # ports past 64K
    ("03000000 28000000 01000000 01000000"
     "0000000000000000 0010000000000000 00000000 03000000", "flags"),      # unknown flag
    ("03000000 28000000 01000000 02000000"
     "0000000000000000 0010000000000000 00000000 01000000"
     "0008000000000000 0010000000000000 02000000 01000000", "overlap"),
])
def test_ioreq_serve_rejects_bad_ranges(body: str, why: str) -> None:
    with pytest.raises(PeerProtocolError, match=why):
        wire.decode_payload(Command.XDEV_IOREQ_SERVE, False, hx(body))
