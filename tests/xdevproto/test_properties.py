"""Property tests: build->parse is the identity for every payload class, and
random bytes never raise anything but the protocol's own errors."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdevproto import wire
from xdevproto.connection import NEED_DATA, Connection, Request, Role, State
from xdevproto.errors import ConnectionClosed, PeerProtocolError
from xdevproto.wire import Capabilities, Command

#: XDEV_HYPOTHESIS_EXAMPLES raises the example count for a deeper run.
EXAMPLES = int(os.environ.get("XDEV_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
#: The per-command identity repeats the per-class one through decode_payload.
FEW = settings(SETTINGS, max_examples=max(10, EXAMPLES // 4))

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)
BLOB = st.binary(max_size=64)

JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 53), 1 << 53) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)


@st.composite
def capabilities(draw: st.DrawFn) -> Capabilities:
    twin = draw(st.none() | st.builds(wire.TwinSocket, st.booleans(),
                                      st.none() | st.integers(0, wire.MAX_MSG_FDS_LIMIT)))
    write_multiple = draw(st.booleans())
    migration = draw(st.none() | st.dictionaries(st.sampled_from(["pgsize", "max_bitmap_size"]),
                                                 st.integers(0, 1 << 64), max_size=2))
    extensions = draw(st.dictionaries(st.sampled_from(["xdev", "vendor", "x-y"]), JSON_VALUE,
                                      max_size=2))
    present = {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", *extensions}
    if twin is not None:
        present.add("twin_socket")
    if write_multiple:
        present.add("write_multiple")
    if migration is not None:
        present.add("migration")
    return Capabilities(
        max_msg_fds=draw(st.integers(0, wire.MAX_MSG_FDS_LIMIT)),
        max_data_xfer_size=draw(st.integers(1, 1 << 32)),
        max_dma_maps=draw(st.integers(0, 1 << 32)),
        pgsizes=draw(st.integers(1, 1 << 64)),
        twin_socket=twin, write_multiple=write_multiple, migration=migration,
        extensions=extensions, present=frozenset(present),
    )


REGION_CAP = st.one_of(
    st.builds(wire.SparseMmapCap, st.lists(st.builds(wire.SparseArea, U64, U64), max_size=4)
              .map(tuple)),
    st.builds(wire.TypeCap, U32, U32),
    # ids 1 and 2 are interpreted, so a raw capability has another id
    st.builds(wire.RawCap, U16.filter(lambda i: i not in (1, 2)), U16, BLOB),
)


@st.composite
def region_info(draw: st.DrawFn) -> wire.RegionInfo:
    caps = tuple(draw(st.lists(REGION_CAP, max_size=wire.MAX_REGION_CAPS)))
    flags = draw(U32)
    if caps:  # the encoder places the chain right after the struct
        flags, cap_offset = flags | wire.RegionFlags.CAPS, 32
    else:
        flags, cap_offset = flags & ~wire.RegionFlags.CAPS, draw(U32)
    return wire.RegionInfo(draw(U32), int(flags), draw(U32), cap_offset, draw(U64), draw(U64),
                           caps)


@st.composite
def region_io_fds(draw: st.DrawFn) -> wire.RegionIoFds:
    entries = tuple(draw(st.lists(st.builds(wire.IoFdEntry, U64, U64, U32, U32, U32, U64),
                                  max_size=4)))
    count = len(entries) if entries else draw(U32)
    return wire.RegionIoFds(draw(U32), draw(U32), draw(U32), count, entries)


@st.composite
def mig_data(draw: st.DrawFn) -> wire.MigData:
    data = draw(BLOB)
    return wire.MigData(draw(U32), draw(st.integers(len(data), 0xFFFFFFFF)), data)


@st.composite
def ioreq_serve(draw: st.DrawFn) -> wire.IoreqServe:
    """Valid requests: non-empty ranges inside their space, none overlapping
    (they are laid out one after another)."""
    ranges, at = [], {True: draw(st.integers(0, 1 << 40)), False: draw(st.integers(0, 0x8000))}
    for _ in range(draw(st.integers(0, wire.IOREQ_SERVE_MAX_RANGES))):
        mmio = draw(st.booleans())
        size = draw(st.integers(1, 1 << 20 if mmio else 0x100))
        if at[mmio] + size > (1 << 64 if mmio else 1 << 16):
            continue
        ranges.append(wire.IoreqRange(at[mmio], size, draw(U32), mmio))
        at[mmio] += size + draw(st.integers(0, 0x100))
    return wire.IoreqServe(draw(U32), draw(U32), draw(U32), tuple(ranges))


STRATEGIES: dict[type[wire.Payload], st.SearchStrategy[Any]] = {
    wire.Empty: st.just(wire.EMPTY),
    wire.Version: st.builds(wire.Version, U16, U16, capabilities()),
    wire.DmaMap: st.builds(wire.DmaMap, U32, U32, U64, U64, U64),
    wire.DmaUnmap: st.builds(wire.DmaUnmap, U32, U32, U64, U64),
    wire.DeviceInfo: st.builds(wire.DeviceInfo, U32, U32, U32, U32),
    wire.RegionInfo: region_info(),
    wire.RegionIoFds: region_io_fds(),
    wire.IrqInfo: st.builds(wire.IrqInfo, U32, U32, U32, U32),
    wire.SetIrqs: st.builds(wire.SetIrqs, U32, U32, U32, U32, U32, BLOB),
    wire.RegionAccess: st.builds(wire.RegionAccess, U64, U32, U32, BLOB),
    wire.DmaAccess: st.builds(wire.DmaAccess, U64, U64, BLOB),
    wire.RegionWriteMulti: st.builds(wire.RegionWriteMulti, st.lists(
        st.builds(wire.WriteMultiEntry, U64, U32, st.integers(0, 8), st.binary(min_size=8,
                                                                                max_size=8)),
        min_size=1, max_size=wire.WRITE_MULTI_MAX).map(tuple)),
    wire.WriteMultiReply: st.builds(wire.WriteMultiReply, U64),
    wire.DeviceFeature: st.builds(wire.DeviceFeature, U32, U32, BLOB),
    wire.FeatMigration: st.builds(wire.FeatMigration, U64),
    wire.FeatMigState: st.builds(wire.FeatMigState, U32, st.integers(-(1 << 31), (1 << 31) - 1)),
    wire.FeatDmaLogging: st.builds(wire.FeatDmaLogging, U64,
                                   st.lists(st.tuples(U64, U64), max_size=5).map(tuple)),
    wire.FeatDmaLoggingReport: st.builds(wire.FeatDmaLoggingReport, U64, U64, U64, BLOB),
    wire.MigData: mig_data(),
    wire.IoreqServe: ioreq_serve(),
}


def test_every_payload_class_has_a_strategy() -> None:
    classes = set(wire.REQUEST_TYPES.values()) | set(wire.REPLY_TYPES.values())
    assert classes <= set(STRATEGIES)


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_build_parse_identity(cls: type[wire.Payload], data: st.DataObject) -> None:
    obj = data.draw(STRATEGIES[cls])
    raw = obj.encode()
    assert cls.decode(raw) == obj
    assert cls.decode(memoryview(raw)) == obj


@pytest.mark.parametrize("cmd", list(Command), ids=lambda c: c.name)
@pytest.mark.parametrize("is_reply", [False, True], ids=["request", "reply"])
@FEW
@given(data=st.data())
def test_decode_payload_identity_per_command(cmd: Command, is_reply: bool,
                                             data: st.DataObject) -> None:
    cls = (wire.REPLY_TYPES if is_reply else wire.REQUEST_TYPES)[cmd]
    obj = data.draw(STRATEGIES[cls])
    if is_reply and cmd is Command.DMA_WRITE:
        obj = wire.DmaAccess(obj.address, obj.count)  # the reply is the echo only
    assert wire.decode_payload(cmd, is_reply, obj.encode()) == obj


# -- random bytes ----------------------------------------------------------------


@SETTINGS
@given(command=st.integers(0, 25), is_reply=st.booleans(), raw=st.binary(max_size=300))
def test_decode_payload_random_bytes(command: int, is_reply: bool, raw: bytes) -> None:
    try:
        wire.decode_payload(command, is_reply, raw)
    except PeerProtocolError:
        pass


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A message with a plausible header, so that random payloads reach the
    per-command checks rather than only the framing ones."""
    payload = draw(st.binary(max_size=120))
    size = 16 + len(payload)
    if draw(st.integers(0, 9)) == 0:
        size = draw(U32)
    flags = draw(st.sampled_from([0, 1, 0x10, 0x21, 0x20, 2]) | U32)
    cmd = draw(st.integers(1, 18) | U16)
    return struct.pack("<HHIII", draw(st.integers(0, 8)), cmd, size, flags, draw(U32)) + payload


def connection(role: Role, negotiated: bool) -> Connection:
    caps = Capabilities(max_msg_fds=8, write_multiple=True, max_data_xfer_size=4096)
    conn = Connection(role, caps)
    if role is Role.CLIENT:
        srv = Connection(Role.SERVER, caps)
        srv.receive_data(conn.start_version())
        if negotiated:
            req = srv.next_event()
            assert isinstance(req, Request)
            conn.receive_data(srv.send_reply(req, srv.accept_version(req)))
            conn.next_event()
            for cmd in (Command.DEVICE_GET_INFO, Command.DEVICE_GET_REGION_INFO,
                        Command.REGION_READ, Command.DEVICE_FEATURE, Command.MIG_DATA_READ,
                        Command.DEVICE_GET_REGION_IO_FDS, Command.REGION_WRITE_MULTI):
                conn.send_request(cmd, b"")  # replies to these may come
    elif negotiated:
        conn.receive_data(wire.encode_message(1, Command.VERSION, 0,
                                              wire.Version(0, 2, caps).encode()))
        req = conn.next_event()
        assert isinstance(req, Request)
        conn.accept_version(req)
    return conn


def drain(conn: Connection, chunks: list[bytes]) -> None:
    """Feed chunks; only the protocol's own errors may come out."""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for _ in range(1000):
                if conn.next_event() is NEED_DATA:
                    break
    except PeerProtocolError as exc:
        assert exc.fatal and conn.state is State.CLOSED
    except ConnectionClosed:
        assert conn.state is State.CLOSED


ROLES_STATES = pytest.mark.parametrize("role,negotiated", [
    (Role.SERVER, False), (Role.SERVER, True), (Role.CLIENT, False), (Role.CLIENT, True)])


@ROLES_STATES
@SETTINGS
@given(chunks=st.lists(st.binary(min_size=1, max_size=200), max_size=6))
def test_random_bytes_into_connection(role: Role, negotiated: bool,
                                      chunks: list[bytes]) -> None:
    drain(connection(role, negotiated), chunks)


@ROLES_STATES
@SETTINGS
@given(messages=st.lists(framed(), min_size=1, max_size=6), cut=st.integers(1, 64))
def test_random_messages_into_connection(role: Role, negotiated: bool, messages: list[bytes],
                                         cut: int) -> None:
    stream = b"".join(messages)
    drain(connection(role, negotiated), [stream[i:i + cut] for i in range(0, len(stream), cut)])
