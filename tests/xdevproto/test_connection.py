"""One test per validation rule of the connection state machine.

Malformed bytes go into a :class:`Connection` (server or client role). Each
must give an :class:`InvalidMessage` with the right errno (framing intact:
the next message is still understood) or a fatal
:class:`PeerProtocolError` with the connection CLOSED -- never any other
exception. File descriptors that come with a refused message are closed.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator, Sequence

import pytest

from xdevproto import wire
from xdevproto.connection import (
    NEED_DATA,
    Connection,
    Event,
    InvalidMessage,
    Reply,
    Request,
    Role,
    State,
)
from xdevproto.errors import ConnectionClosed, PeerProtocolError
from xdevproto.wire import Capabilities, Command

EINVAL, ENOSYS, ENOTSUP = errno.EINVAL, errno.ENOSYS, errno.ENOTSUP


def msg(msg_id: int, command: int, payload: bytes = b"", flags: int = 0, error: int = 0,
        size: int | None = None) -> bytes:
    """A message with a hand-packed header (``size`` overrides msg_size)."""
    n = 16 + len(payload) if size is None else size
    return struct.pack("<HHIII", msg_id, command, n, flags, error) + payload


def version_json(caps: bytes, major: int = 0, minor: int = 2) -> bytes:
    return struct.pack("<HH", major, minor) + caps + b"\0"


VERSION_OK = version_json(b'{"capabilities":{"max_msg_fds":8,"write_multiple":true}}')
GET_INFO = msg(100, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))


def server(negotiate: bool = True, caps: Capabilities | None = None) -> Connection:
    conn = Connection(Role.SERVER, caps or Capabilities(max_msg_fds=8, write_multiple=True))
    if negotiate:
        conn.receive_data(msg(1, Command.VERSION, VERSION_OK))
        req = conn.next_event()
        assert isinstance(req, Request)
        conn.accept_version(req)
        assert conn.state is State.READY
    return conn


def client(twin: bool = False) -> Connection:
    """A client that has sent VERSION (id 1) and awaits the reply."""
    conn = Connection(Role.CLIENT, Capabilities(
        max_msg_fds=8, write_multiple=True,
        twin_socket=wire.TwinSocket(True) if twin else None))
    conn.start_version()
    return conn


def ready_client() -> Connection:
    conn = client()
    conn.receive_data(msg(1, Command.VERSION, version_json(b'{"capabilities":{}}'), flags=1))
    assert isinstance(conn.next_event(), Reply) and conn.state is State.READY
    return conn


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Two real fds; the test asserts the code under test closed them."""
    r, w = os.pipe()
    yield [r, w]
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def is_open(fd: int) -> bool:
    """Whether ``fd`` is open. (Listing /proc/self/fd would open a directory
    fd that takes the lowest free number -- likely the one just closed.)"""
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def feed(conn: Connection, data: bytes, fds: Sequence[int] = ()) -> Event | PeerProtocolError:
    """The event for ``data``, or the fatal error (checked to close)."""
    try:
        conn.receive_data(data, fds)
        return conn.next_event()
    except PeerProtocolError as exc:
        assert exc.fatal, "a non-fatal error must be an InvalidMessage event"
        assert conn.state is State.CLOSED
        return exc


def refused(conn: Connection, data: bytes, err: int = EINVAL, fds: Sequence[int] = ()) -> None:
    """``data`` is refused with ``err``; fds are closed; the stream goes on."""
    ev = feed(conn, data, fds)
    assert isinstance(ev, InvalidMessage), ev
    assert ev.error.errno == err, ev.error
    hdr = wire.Header.decode(data)
    assert (ev.msg_id, ev.command) == (hdr.msg_id, hdr.command)
    for fd in fds:
        assert not is_open(fd), f"fd {fd} leaked"
    assert conn.state is not State.CLOSED
    if conn.role is Role.SERVER and conn.state is State.READY:
        nxt = feed(conn, GET_INFO)
        assert isinstance(nxt, Request) and nxt.command is Command.DEVICE_GET_INFO


def fatal(conn: Connection, data: bytes, fds: Sequence[int] = (), err: int = EINVAL) -> None:
    ev = feed(conn, data, fds)
    assert isinstance(ev, PeerProtocolError), ev
    assert ev.errno == err
    assert conn.state is State.CLOSED
    for fd in fds:
        assert not is_open(fd), f"fd {fd} leaked"
    with pytest.raises(ConnectionClosed):
        conn.next_event()


Maker = Callable[[], Connection]
BOTH_ROLES = pytest.mark.parametrize("make", [server, ready_client], ids=["server", "client"])

# -- framing --------------------------------------------------------------------


@BOTH_ROLES
def test_short_header_needs_data_then_eof_closes(make: Maker) -> None:
    conn = make()
    conn.receive_data(GET_INFO[:10])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.state is State.CLOSED
    with pytest.raises(ConnectionClosed):
        conn.next_event()


def test_eof_closes_queued_fds(pipe_fds: list[int]) -> None:
    conn = server()
    conn.receive_data(GET_INFO[:20], pipe_fds)
    conn.receive_data(b"")
    assert not any(map(is_open, pipe_fds))


def test_data_after_close_refused_and_fds_closed(pipe_fds: list[int]) -> None:
    conn = server()
    conn.close()
    with pytest.raises(ConnectionClosed):
        conn.receive_data(GET_INFO, pipe_fds)
    assert not any(map(is_open, pipe_fds))


@BOTH_ROLES
@pytest.mark.parametrize("size", [0, 1, 15])
def test_msg_size_below_header_is_fatal(make: Maker, size: int) -> None:
    fatal(make(), msg(5, Command.DEVICE_GET_INFO, size=size))


@BOTH_ROLES
def test_oversize_msg_size_is_fatal_before_buffering(make: Maker) -> None:
    fatal(make(), msg(5, Command.REGION_WRITE, size=wire.MAX_MESSAGE_SIZE + 1))
    fatal(make(), msg(5, Command.REGION_WRITE, size=0xFFFFFFFF))


@pytest.mark.parametrize("flags", [0x2, 0x3, 0xF, 0x40, 0x80000000])
def test_bad_flags_refused(flags: int) -> None:
    refused(server(), msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                          flags=flags))


def test_error_bit_on_command_refused() -> None:
    refused(server(), msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                          flags=0x20, error=5))


@BOTH_ROLES
@pytest.mark.parametrize("command", [0, 14, 19, 0xFFFF])
def test_unknown_command(make: Maker, command: int) -> None:
    refused(make(), msg(5, command, b"\0" * 8), ENOSYS)


def test_no_reply_flag_kept_on_refusal() -> None:
    ev = feed(server(), msg(5, 14, flags=0x10))
    assert isinstance(ev, InvalidMessage) and ev.no_reply


def test_command_sent_the_wrong_way() -> None:
    refused(server(), msg(5, Command.DMA_READ, struct.pack("<QQ", 0, 4)))
    refused(ready_client(), msg(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 4)))


# -- negotiation ------------------------------------------------------------------


def test_command_before_version_refused_then_version_works() -> None:
    conn = server(negotiate=False)
    refused(conn, GET_INFO)
    assert conn.state is State.NEW
    ev = feed(conn, msg(1, Command.VERSION, VERSION_OK))
    assert isinstance(ev, Request) and ev.command is Command.VERSION


def test_version_twice_refused() -> None:
    refused(server(), msg(2, Command.VERSION, VERSION_OK))


def test_version_sent_to_client_refused() -> None:
    conn = ready_client()
    refused(conn, msg(2, Command.VERSION, VERSION_OK))


BAD_VERSION_JSON = {
    "not json": b"{capabilities",
    "not utf-8": b'{"capabilities":{"x":"\xff\xfe"}}',
    "not an object": b"[1,2]",
    "capabilities not an object": b'{"capabilities":7}',
    "max_msg_fds string": b'{"capabilities":{"max_msg_fds":"8"}}',
    "max_msg_fds negative": b'{"capabilities":{"max_msg_fds":-1}}',
    "max_msg_fds too large": b'{"capabilities":{"max_msg_fds":1025}}',
    "max_msg_fds bool": b'{"capabilities":{"max_msg_fds":true}}',
    "max_msg_fds float": b'{"capabilities":{"max_msg_fds":1.5}}',
    "max_data_xfer_size zero": b'{"capabilities":{"max_data_xfer_size":0}}',
    "pgsizes string": b'{"capabilities":{"pgsizes":"4096"}}',
    "twin_socket not object": b'{"capabilities":{"twin_socket":true}}',
    "twin_socket.supported int": b'{"capabilities":{"twin_socket":{"supported":1}}}',
    "write_multiple int": b'{"capabilities":{"write_multiple":1}}',
    "migration not object": b'{"capabilities":{"migration":4096}}',
    "migration.pgsize string": b'{"capabilities":{"migration":{"pgsize":"x"}}}',
    "deep nesting": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("text", BAD_VERSION_JSON.values(), ids=BAD_VERSION_JSON.keys())
def test_bad_version_json_refused_by_server(text: bytes) -> None:
    conn = server(negotiate=False)
    refused(conn, msg(1, Command.VERSION, version_json(text)))
    assert conn.state is State.NEW


@pytest.mark.parametrize("text", BAD_VERSION_JSON.values(), ids=BAD_VERSION_JSON.keys())
def test_bad_version_json_in_reply_is_fatal(text: bytes) -> None:
    fatal(client(), msg(1, Command.VERSION, version_json(text), flags=1))


def test_version_embedded_nul_refused() -> None:
    refused(server(negotiate=False), msg(1, Command.VERSION, version_json(b'{}\0{}')))


def test_version_short_payload_refused() -> None:
    refused(server(negotiate=False), msg(1, Command.VERSION, b"\0\0"))


def test_version_json_too_long_refused() -> None:
    big = b'{"capabilities":{"pad":"' + b"x" * wire.MAX_VERSION_JSON + b'"}}'
    refused(server(negotiate=False), msg(1, Command.VERSION, version_json(big)))


def test_server_refuses_major_mismatch() -> None:
    conn = server(negotiate=False)
    req = feed(conn, msg(1, Command.VERSION, version_json(b"{}", major=1)))
    assert isinstance(req, Request)
    with pytest.raises(PeerProtocolError) as e:
        conn.accept_version(req)
    assert e.value.fatal and e.value.errno == ENOTSUP


def test_server_answers_lower_minor() -> None:
    conn = server(negotiate=False)
    req = feed(conn, msg(1, Command.VERSION, version_json(b"{}", minor=7)))
    assert isinstance(req, Request)
    assert conn.accept_version(req).minor == 2
    assert conn.negotiated is not None and conn.negotiated.peer_max_msg_fds == 1  # default


def test_client_major_mismatch_is_fatal() -> None:
    fatal(client(), msg(1, Command.VERSION, version_json(b"{}", major=1), flags=1))


def test_client_minor_above_ours_is_fatal() -> None:
    fatal(client(), msg(1, Command.VERSION, version_json(b"{}", minor=3), flags=1))


def test_client_twin_socket_not_offered_is_fatal(pipe_fds: list[int]) -> None:
    caps = b'{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}'
    fatal(client(), msg(1, Command.VERSION, version_json(caps), flags=1), pipe_fds[:1])


def test_client_twin_socket_without_fd_is_fatal() -> None:
    caps = b'{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}'
    fatal(client(twin=True), msg(1, Command.VERSION, version_json(caps), flags=1))


def test_client_twin_socket_bad_fd_index_is_fatal(pipe_fds: list[int]) -> None:
    caps = b'{"capabilities":{"twin_socket":{"supported":true,"fd_index":1}}}'
    fatal(client(twin=True), msg(1, Command.VERSION, version_json(caps), flags=1),
          pipe_fds[:1])


def test_client_twin_socket_accepted(pipe_fds: list[int]) -> None:
    caps = b'{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}'
    conn = client(twin=True)
    ev = feed(conn, msg(1, Command.VERSION, version_json(caps), flags=1), pipe_fds[:1])
    assert isinstance(ev, Reply) and ev.fds == pipe_fds[:1]
    assert conn.negotiated is not None and conn.negotiated.twin_socket


def test_client_version_reply_fd_without_twin_is_fatal(pipe_fds: list[int]) -> None:
    fatal(client(), msg(1, Command.VERSION, version_json(b"{}"), flags=1), pipe_fds[:1])


def test_client_write_multiple_not_offered_is_fatal() -> None:
    conn = Connection(Role.CLIENT, Capabilities())
    conn.start_version()
    fatal(conn, msg(1, Command.VERSION,
                    version_json(b'{"capabilities":{"write_multiple":true}}'), flags=1))


# -- replies ---------------------------------------------------------------------


@BOTH_ROLES
def test_reply_never_asked_for_is_fatal(make: Maker) -> None:
    fatal(make(), msg(77, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), flags=1))


def test_reply_with_wrong_command_is_fatal() -> None:
    conn = ready_client()
    msg_id, _ = conn.send_request(Command.DEVICE_RESET, b"")
    fatal(conn, msg(msg_id, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                    flags=1))


def test_reply_twice_is_fatal() -> None:
    conn = ready_client()
    msg_id, _ = conn.send_request(Command.DEVICE_RESET, b"")
    assert isinstance(feed(conn, msg(msg_id, Command.DEVICE_RESET, flags=1)), Reply)
    fatal(conn, msg(msg_id, Command.DEVICE_RESET, flags=1))


def test_no_reply_command_expects_no_reply() -> None:
    conn = ready_client()
    msg_id, _ = conn.send_request(Command.DEVICE_RESET, b"", no_reply=True)
    fatal(conn, msg(msg_id, Command.DEVICE_RESET, flags=1))


def test_bad_reply_payload_is_fatal() -> None:
    conn = ready_client()
    msg_id, _ = conn.send_request(Command.DEVICE_GET_INFO, wire.DeviceInfo(16, 0, 0, 0))
    fatal(conn, msg(msg_id, Command.DEVICE_GET_INFO, b"\0" * 8, flags=1))


def test_error_reply_with_payload_and_fds_accepted(pipe_fds: list[int]) -> None:
    """libvfio-user sends the prepared payload with some error replies: the
    payload is ignored and any fds are closed."""
    conn = ready_client()
    msg_id, _ = conn.send_request(Command.DEVICE_GET_REGION_INFO,
                                  wire.RegionInfo(32, 0, 2, 0, 0, 0))
    ev = feed(conn, msg(msg_id, Command.DEVICE_GET_REGION_INFO, b"\xff" * 40, flags=0x21,
                        error=errno.EINVAL), pipe_fds[:1])
    assert ev == Reply(msg_id, Command.DEVICE_GET_REGION_INFO, None, [], EINVAL)
    assert not is_open(pipe_fds[0])


def test_server_gets_error_reply_with_payload() -> None:
    conn = server()
    msg_id, _ = conn.send_request(Command.DMA_READ, wire.DmaAccess(0x1000, 4))
    ev = feed(conn, msg(msg_id, Command.DMA_READ, b"\0" * 20, flags=0x21, error=errno.EFAULT))
    assert ev == Reply(msg_id, Command.DMA_READ, None, [], errno.EFAULT)


# -- file descriptors -------------------------------------------------------------

NO_FD_REQUESTS = {
    "DMA_UNMAP": msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0x1000, 0x1000)),
    "DEVICE_GET_INFO": msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0)),
    "GET_REGION_INFO": msg(5, Command.DEVICE_GET_REGION_INFO,
                           struct.pack("<IIIIQQ", 32, 0, 0, 0, 0, 0)),
    "GET_REGION_IO_FDS": msg(5, Command.DEVICE_GET_REGION_IO_FDS,
                             struct.pack("<IIII", 16, 0, 0, 0)),
    "GET_IRQ_INFO": msg(5, Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 0, 0)),
    "SET_IRQS NONE": msg(5, Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x21, 0, 0, 1)),
    "REGION_READ": msg(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 4)),
    "REGION_WRITE": msg(5, Command.REGION_WRITE, struct.pack("<QII", 0, 0, 1) + b"x"),
    "DEVICE_RESET": msg(5, Command.DEVICE_RESET),
    "REGION_WRITE_MULTI": msg(5, Command.REGION_WRITE_MULTI,
                              struct.pack("<QQII8s", 1, 0, 0, 1, b"x")),
    "DEVICE_FEATURE": msg(5, Command.DEVICE_FEATURE, struct.pack("<II", 8, 0x40001)),
    "MIG_DATA_READ": msg(5, Command.MIG_DATA_READ, struct.pack("<II", 8, 0)),
    "MIG_DATA_WRITE": msg(5, Command.MIG_DATA_WRITE, struct.pack("<II", 9, 1) + b"x"),
}


@pytest.mark.parametrize("data", NO_FD_REQUESTS.values(), ids=NO_FD_REQUESTS.keys())
def test_fds_on_request_that_carries_none(data: bytes, pipe_fds: list[int]) -> None:
    assert isinstance(feed(server(), data), Request)  # valid without the fd
    refused(server(), data, EINVAL, pipe_fds[:1])


def test_fds_on_version_request(pipe_fds: list[int]) -> None:
    refused(server(negotiate=False), msg(1, Command.VERSION, VERSION_OK), EINVAL, pipe_fds)


def test_dma_map_two_fds(pipe_fds: list[int]) -> None:
    refused(server(), msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0x1000)),
            EINVAL, pipe_fds)


def test_dma_map_one_fd_accepted(pipe_fds: list[int]) -> None:
    ev = feed(server(), msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0x1000, 0,
                                                             0x1000)), pipe_fds[:1])
    assert isinstance(ev, Request) and ev.fds == pipe_fds[:1]


def set_irqs(flags: int, count: int, data: bytes = b"", argsz: int | None = None,
             start: int = 0) -> bytes:
    n = 20 + len(data) if argsz is None else argsz
    return msg(5, Command.DEVICE_SET_IRQS, struct.pack("<IIIII", n, flags, 1, start, count) + data)


EVENTFD_TRIGGER = 0x24


@pytest.mark.parametrize("nfds", [1, 3])
def test_set_irqs_eventfd_wrong_fd_count(nfds: int) -> None:
    fds = [fd for _ in range(2) for fd in os.pipe()][:nfds]
    try:
        refused(server(), set_irqs(EVENTFD_TRIGGER, 2), EINVAL, fds)
    finally:
        for fd in fds:
            if is_open(fd):
                os.close(fd)


@pytest.mark.parametrize("nfds", [0, 2])
def test_set_irqs_eventfd_zero_or_count_fds_accepted(nfds: int, pipe_fds: list[int]) -> None:
    ev = feed(server(), set_irqs(EVENTFD_TRIGGER, 2), pipe_fds[:nfds])
    assert isinstance(ev, Request) and len(ev.fds) == nfds


def test_more_fds_than_max_msg_fds(pipe_fds: list[int]) -> None:
    conn = server(caps=Capabilities(max_msg_fds=1))
    refused(conn, set_irqs(EVENTFD_TRIGGER, 2), EINVAL, pipe_fds)


@pytest.mark.parametrize("cmd", [Command.DMA_READ, Command.DMA_WRITE])
def test_fds_on_server_to_client_command(cmd: Command, pipe_fds: list[int]) -> None:
    data = struct.pack("<QQ", 0, 1) + (b"x" if cmd is Command.DMA_WRITE else b"")
    refused(ready_client(), msg(5, cmd, data), EINVAL, pipe_fds[:1])


REPLY_NO_FDS = [Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_GET_INFO,
                Command.DEVICE_GET_IRQ_INFO, Command.DEVICE_SET_IRQS, Command.REGION_READ,
                Command.DEVICE_RESET]


@pytest.mark.parametrize("cmd", REPLY_NO_FDS, ids=lambda c: c.name)
def test_fds_on_reply_that_carries_none_is_fatal(cmd: Command, pipe_fds: list[int]) -> None:
    conn = ready_client()
    msg_id, _ = conn.send_request(cmd, b"")
    fatal(conn, msg(msg_id, cmd, flags=1), pipe_fds[:1])


def test_region_info_reply_with_two_fds_is_fatal(pipe_fds: list[int]) -> None:
    conn = ready_client()
    msg_id, _ = conn.send_request(Command.DEVICE_GET_REGION_INFO,
                                  wire.RegionInfo(32, 0, 2, 0, 0, 0))
    fatal(conn, msg(msg_id, Command.DEVICE_GET_REGION_INFO,
                    struct.pack("<IIIIQQ", 32, 7, 2, 0, 4096, 0), flags=1), pipe_fds)


def test_dma_reply_with_fd_to_server_is_fatal(pipe_fds: list[int]) -> None:
    conn = server()
    msg_id, _ = conn.send_request(Command.DMA_READ, wire.DmaAccess(0, 1))
    fatal(conn, msg(msg_id, Command.DMA_READ, struct.pack("<QQ", 0, 1) + b"x", flags=1),
          pipe_fds[:1])


def test_fds_arriving_mid_message_are_fatal(pipe_fds: list[int]) -> None:
    conn = server()
    data = set_irqs(EVENTFD_TRIGGER, 2)
    conn.receive_data(data[:10])
    assert conn.next_event() is NEED_DATA
    with pytest.raises(PeerProtocolError) as e:
        conn.receive_data(data[10:], pipe_fds)
    assert e.value.fatal and conn.state is State.CLOSED
    assert not any(map(is_open, pipe_fds))


def test_fds_belong_to_last_message_of_chunk(pipe_fds: list[int]) -> None:
    conn = server()
    conn.receive_data(GET_INFO + set_irqs(EVENTFD_TRIGGER, 2), pipe_fds)
    first, second = conn.next_event(), conn.next_event()
    assert isinstance(first, Request) and first.fds == []
    assert isinstance(second, Request) and second.fds == pipe_fds


def test_queued_fds_closed_when_connection_closes(pipe_fds: list[int]) -> None:
    conn = server()
    conn.receive_data(set_irqs(EVENTFD_TRIGGER, 2)[:20], pipe_fds)
    conn.close()
    assert not any(map(is_open, pipe_fds))


# -- argsz ------------------------------------------------------------------------

ARGSZ_TOO_SMALL = {
    "DMA_MAP": msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 31, 3, 0, 0, 0x1000)),
    "DMA_UNMAP": msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 23, 0, 0, 0x1000)),
    "DEVICE_GET_INFO": msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 15, 0, 0, 0)),
    "GET_REGION_INFO": msg(5, Command.DEVICE_GET_REGION_INFO,
                           struct.pack("<IIIIQQ", 31, 0, 0, 0, 0, 0)),
    "GET_REGION_IO_FDS": msg(5, Command.DEVICE_GET_REGION_IO_FDS,
                             struct.pack("<IIII", 15, 0, 0, 0)),
    "GET_IRQ_INFO": msg(5, Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 0, 0, 0, 0)),
    "SET_IRQS": set_irqs(0x22, 2, b"\1\1", argsz=20),
    "DEVICE_FEATURE": msg(5, Command.DEVICE_FEATURE, struct.pack("<IIQ", 8, 0x20002, 1)),
    "MIG_DATA_READ": msg(5, Command.MIG_DATA_READ, struct.pack("<II", 8, 16)),
    "MIG_DATA_WRITE": msg(5, Command.MIG_DATA_WRITE, struct.pack("<II", 8, 2) + b"xy"),
}


@pytest.mark.parametrize("data", ARGSZ_TOO_SMALL.values(), ids=ARGSZ_TOO_SMALL.keys())
def test_argsz_too_small(data: bytes) -> None:
    refused(server(), data)


FIXED_SIZE_WRONG = {
    "DMA_MAP short": msg(5, Command.DMA_MAP, struct.pack("<IIQQ", 32, 3, 0, 0)),
    "DMA_MAP long": msg(5, Command.DMA_MAP, struct.pack("<IIQQQQ", 32, 3, 0, 0, 1, 0)),
    "DMA_UNMAP long": msg(5, Command.DMA_UNMAP, struct.pack("<IIQQQ", 24, 0, 0, 1, 0)),
    "DEVICE_GET_INFO short": msg(5, Command.DEVICE_GET_INFO, struct.pack("<III", 16, 0, 0)),
    "GET_REGION_INFO long": msg(5, Command.DEVICE_GET_REGION_INFO,
                                struct.pack("<IIIIQQQ", 32, 0, 0, 0, 0, 0, 0)),
    "GET_REGION_IO_FDS count": msg(5, Command.DEVICE_GET_REGION_IO_FDS,
                                   struct.pack("<IIII", 16, 0, 0, 1)),
    "SET_IRQS short": msg(5, Command.DEVICE_SET_IRQS, struct.pack("<IIII", 16, 0x21, 0, 0)),
    "DEVICE_RESET with payload": msg(5, Command.DEVICE_RESET, b"\0" * 4),
    "DEVICE_FEATURE short": msg(5, Command.DEVICE_FEATURE, b"\0" * 4),
    "REGION_READ short": msg(5, Command.REGION_READ, struct.pack("<QI", 0, 0)),
    "DMA_UNMAP dirty bitmap": msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 1, 0, 1)),
}


@pytest.mark.parametrize("data", FIXED_SIZE_WRONG.values(), ids=FIXED_SIZE_WRONG.keys())
def test_wrong_payload_size_or_field(data: bytes) -> None:
    hdr = wire.Header.decode(data)
    flags = struct.unpack_from("<I", data, 20)[0] if len(data) >= 24 else 0
    dirty = hdr.command == Command.DMA_UNMAP and flags == 1
    refused(server(), data, ENOTSUP if dirty else EINVAL)


# -- per-command field rules ---------------------------------------------------------


@pytest.mark.parametrize("flags,offset,address,size,nfds", [
    (0x10, 0, 0, 0x1000, 0),  # unknown flag bit
    (0x3, 0, 0, 0, 0),  # zero size
    (0x3, 0, (1 << 64) - 0x1000, 0x2000, 0),  # address range wraps
    (0x3, (1 << 64) - 0x1000, 0, 0x2000, 1),  # file range wraps
    (0x3, 0x1000, 0, 0x1000, 0),  # offset without an fd
])
def test_dma_map_rules(flags: int, offset: int, address: int, size: int, nfds: int,
                       pipe_fds: list[int]) -> None:
    refused(server(), msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 32, flags, offset,
                                                          address, size)),
            EINVAL, pipe_fds[:nfds])


@pytest.mark.parametrize("flags,address,size", [(2, 0x1000, 0), (2, 0, 0x1000), (4, 0, 0)])
def test_dma_unmap_rules(flags: int, address: int, size: int) -> None:
    refused(server(), msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, flags, address, size)))


def test_dma_unmap_all_accepted() -> None:
    ev = feed(server(), msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 0, 0)))
    assert isinstance(ev, Request) and ev.payload == wire.DmaUnmap(24, 2, 0, 0)


@pytest.mark.parametrize("data", [
    set_irqs(0x1 | 0x2 | 0x20, 1, b"\1"),  # two data types
    set_irqs(0x1 | 0x8 | 0x20, 1),  # two actions
    set_irqs(0x20, 1),  # no data type
    set_irqs(0x1, 1),  # no action
    set_irqs(0x21 | 0x40, 1),  # unknown flag
    set_irqs(0x22, 2, b"\1"),  # BOOL: one byte for two vectors
    set_irqs(0x22, 1, b"\1\1"),  # BOOL: two bytes for one vector
    set_irqs(0x21, 1, b"\1"),  # data with DATA_NONE
    set_irqs(EVENTFD_TRIGGER, 0),  # count 0 with EVENTFD
    set_irqs(0x29, 0),  # count 0 with MASK
    set_irqs(0x21, 2, start=0xFFFFFFFF),  # start + count wraps
    set_irqs(0x21, 1, argsz=24),  # argsz above the request size
], ids=["two-types", "two-actions", "no-type", "no-action", "unknown-flag", "bool-short",
        "bool-long", "none-with-data", "eventfd-count0", "mask-count0", "wrap", "argsz-big"])
def test_set_irqs_rules(data: bytes) -> None:
    refused(server(), data)


def test_set_irqs_disable_all_accepted() -> None:
    assert isinstance(feed(server(), set_irqs(0x21, 0)), Request)


def test_region_write_payload_must_be_16_plus_count() -> None:
    refused(server(), msg(5, Command.REGION_WRITE, struct.pack("<QII", 0, 0, 4) + b"abc"))
    refused(server(), msg(5, Command.REGION_WRITE, struct.pack("<QII", 0, 0, 4) + b"abcde"))
    refused(server(), msg(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 4) + b"abcd"))


def test_region_count_above_max_data_xfer_size() -> None:
    conn = server(caps=Capabilities(max_msg_fds=8, max_data_xfer_size=64))
    refused(conn, msg(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 65)))
    refused(conn, msg(5, Command.REGION_WRITE, struct.pack("<QII", 0, 0, 65) + b"x" * 65))
    assert isinstance(feed(conn, msg(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 64))),
                      Request)


def test_dma_count_above_max_data_xfer_size() -> None:
    conn = ready_client()
    big = conn.our_caps.max_data_xfer_size + 1
    refused(conn, msg(5, Command.DMA_READ, struct.pack("<QQ", 0, big)))


@pytest.mark.parametrize("data", [
    struct.pack("<QQ", 0, 4) + b"abc",  # DMA_WRITE short data
    struct.pack("<Q", 0),  # short payload
])
def test_dma_write_request_sizes(data: bytes) -> None:
    refused(ready_client(), msg(5, Command.DMA_WRITE, data))


def test_dma_read_request_with_data_refused() -> None:
    refused(ready_client(), msg(5, Command.DMA_READ, struct.pack("<QQ", 0, 4) + b"abcd"))


def write_multi(wr_cnt: int, entries: list[tuple[int, int, int]]) -> bytes:
    body = struct.pack("<Q", wr_cnt) + b"".join(struct.pack("<QII8s", o, r, n, b"")
                                                for o, r, n in entries)
    return msg(5, Command.REGION_WRITE_MULTI, body)


def test_write_multi_without_negotiation() -> None:
    conn = server(caps=Capabilities(max_msg_fds=8))  # does not offer write_multiple
    refused(conn, write_multi(1, [(0, 0, 4)]))


@pytest.mark.parametrize("data", [
    write_multi(0, []),
    write_multi(wire.WRITE_MULTI_MAX + 1, [(0, 0, 4)] * (wire.WRITE_MULTI_MAX + 1)),
    write_multi(1, [(0, 0, 9)]),
    write_multi(2, [(0, 0, 4)]),
    write_multi(1, [(0, 0, 4), (0, 0, 4)]),
], ids=["wr_cnt-0", "wr_cnt-too-large", "count-9", "short", "long"])
def test_write_multi_rules(data: bytes) -> None:
    refused(server(), data)


@pytest.mark.parametrize("flags", [
    0x30001,  # GET|SET without PROBE
    0x80001,  # unknown flag bit
    0x00001,  # no operation
])
def test_device_feature_rules(flags: int) -> None:
    refused(server(), msg(5, Command.DEVICE_FEATURE, struct.pack("<II", 8, flags)))


def test_device_feature_get_set_probe_accepted() -> None:
    assert isinstance(feed(server(), msg(5, Command.DEVICE_FEATURE,
                                         struct.pack("<II", 8, 0x70002))), Request)


@pytest.mark.parametrize("cmd,body", [
    (Command.MIG_DATA_READ, struct.pack("<II", 16, 8) + b"x"),  # READ with data
    (Command.MIG_DATA_WRITE, struct.pack("<II", 16, 8) + b"x"),  # WRITE short
    (Command.MIG_DATA_WRITE, struct.pack("<II", 16, 1) + b"xy"),  # WRITE long
    (Command.MIG_DATA_READ, struct.pack("<II", 0xFFFFFFFF, 0x200000)),  # over max xfer
    (Command.MIG_DATA_READ, struct.pack("<I", 8)),  # short
], ids=["read-data", "write-short", "write-long", "read-too-big", "short"])
def test_mig_data_sizes(cmd: Command, body: bytes) -> None:
    refused(server(), msg(5, cmd, body))


# -- pipelining -----------------------------------------------------------------------


def test_pipelined_messages_in_one_chunk_and_byte_by_byte() -> None:
    stream = GET_INFO + msg(6, 14) + msg(7, Command.DEVICE_RESET)
    for chunks in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
        conn = server()
        events: list[Event] = []
        for ch in chunks:
            conn.receive_data(ch)
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
        assert [type(e) for e in events] == [Request, InvalidMessage, Request]
        assert [e.msg_id for e in events] == [100, 6, 7]  # type: ignore[union-attr]
