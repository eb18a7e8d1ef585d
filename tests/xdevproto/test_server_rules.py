"""The validation rules end to end: raw socket bytes against the running
server with the test device. Each bad message gets an error reply with the
right errno (and the session goes on), or the server hangs up cleanly; the
server always keeps serving the next client."""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from threading import Thread
from typing import Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdevproto import wire
from xdevproto.client import Client
from xdevproto.errors import ConnectionClosed, PeerProtocolError, RemoteError
from xdevproto.guestmem import MemfdRam
from xdevproto.server import Server
from xdevproto.testdev import BUF_OFF, ID_VALUE, TestDevice
from xdevproto.transport import fds_from_ancillary, listen
from xdevproto.wire import Command


class Served(Protocol):
    """The ``served`` fixture of conftest.py: the test device on a socket."""

    path: str
    device: TestDevice

EINVAL, ENOSYS = errno.EINVAL, errno.ENOSYS
REPLY, ERROR = 0x1, 0x20


def msg(msg_id: int, command: int, payload: bytes = b"", flags: int = 0, error: int = 0,
        size: int | None = None) -> bytes:
    n = 16 + len(payload) if size is None else size
    return struct.pack("<HHIII", msg_id, command, n, flags, error) + payload


VERSION = struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_msg_fds":8}}\0'


class Raw:
    """A hand-driven client socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        self.sock.sendmsg([data], anc)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def recv(self) -> tuple[wire.Header, bytes, list[int]]:
        head, anc, _, _ = self.sock.recvmsg(16, socket.CMSG_SPACE(4 * 8))
        if not head:
            raise EOFError
        head += self._exact(16 - len(head))
        hdr = wire.Header.decode(head)
        return hdr, self._exact(hdr.msg_size - 16), fds_from_ancillary(anc)

    def call(self, data: bytes, fds: Sequence[int] = ()) -> tuple[wire.Header, bytes]:
        self.send(data, fds)
        hdr, body, rfds = self.recv()
        for fd in rfds:
            os.close(fd)
        return hdr, body

    def closed_by_peer(self) -> bool:
        try:
            while self.sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(served: Served) -> Iterator[Raw]:
    r = Raw(served.path)
    hdr, body = r.call(msg(1, Command.VERSION, VERSION))
    assert hdr.flags == REPLY and hdr.error == 0
    yield r
    r.close()


def assert_error(hdr: wire.Header, msg_id: int, command: int, err: int) -> None:
    assert (hdr.msg_id, hdr.command, hdr.msg_size) == (msg_id, command, 16)
    assert hdr.flags == REPLY | ERROR and hdr.error == err


def still_serving(r: Raw) -> None:
    hdr, body = r.call(msg(900, Command.REGION_READ, struct.pack("<QII", 0, 0, 4)))
    assert hdr.flags == REPLY and body[16:] == struct.pack("<I", ID_VALUE)


def next_client_works(served: Served) -> None:
    """The server takes a new client once it has torn the last one down
    (asynchronously: until then a newcomer is refused with EBUSY)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            c = Client.connect(served.path, timeout=10)
        except RemoteError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
            continue
        with c:
            assert c.region_read(0, 0, 4) == struct.pack("<I", ID_VALUE)
        return


def set_irqs(flags: int, count: int, data: bytes = b"", argsz: int | None = None) -> bytes:
    n = 20 + len(data) if argsz is None else argsz
    return msg(5, Command.DEVICE_SET_IRQS, struct.pack("<IIIII", n, flags, 1, 0, count) + data)


REFUSED = {
    "unknown command 14": (msg(5, 14), ENOSYS),
    "unknown command 19": (msg(5, 19, b"\0" * 8), ENOSYS),
    "unknown command 0xffff": (msg(5, 0xFFFF), ENOSYS),
    "bad type bits": (msg(5, Command.DEVICE_RESET, flags=0x2), EINVAL),
    "unknown flag bit": (msg(5, Command.DEVICE_RESET, flags=0x40), EINVAL),
    "error bit on a command": (msg(5, Command.DEVICE_RESET, flags=0x20, error=5), EINVAL),
    "VERSION twice": (msg(5, Command.VERSION, VERSION), EINVAL),
    "DMA_READ to the server": (msg(5, Command.DMA_READ, struct.pack("<QQ", 0, 4)), EINVAL),
    "DMA_MAP argsz": (msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 31, 3, 0, 0, 4096)), EINVAL),
    "DMA_MAP bad flags": (msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 0x10, 0, 0, 4096)),
                          EINVAL),
    "DMA_MAP zero size": (msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0)), EINVAL),
    "DMA_MAP wraps": (msg(5, Command.DMA_MAP,
                          struct.pack("<IIQQQ", 32, 3, 0, (1 << 64) - 4096, 8192)), EINVAL),
    "DMA_MAP offset without fd": (msg(5, Command.DMA_MAP,
                                      struct.pack("<IIQQQ", 32, 3, 4096, 0, 4096)), EINVAL),
    "DMA_UNMAP argsz": (msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 8, 0, 0, 4096)), EINVAL),
    "DMA_UNMAP ALL with address": (msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 4096, 0)),
                                   EINVAL),
    "DEVICE_GET_INFO argsz": (msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 8, 0, 0, 0)),
                              EINVAL),
    "GET_REGION_INFO argsz": (msg(5, Command.DEVICE_GET_REGION_INFO,
                                  struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0)), EINVAL),
    "GET_REGION_IO_FDS argsz": (msg(5, Command.DEVICE_GET_REGION_IO_FDS,
                                    struct.pack("<IIII", 4, 0, 0, 0)), EINVAL),
    "GET_IRQ_INFO argsz": (msg(5, Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 0, 0, 0, 0)),
                           EINVAL),
    "SET_IRQS two data types": (set_irqs(0x23, 1, b"\1"), EINVAL),
    "SET_IRQS two actions": (set_irqs(0x31, 1), EINVAL),
    "SET_IRQS BOOL length": (set_irqs(0x22, 2, b"\1"), EINVAL),
    "SET_IRQS EVENTFD count 0": (set_irqs(0x24, 0), EINVAL),
    "SET_IRQS argsz": (set_irqs(0x21, 1, argsz=16), EINVAL),
    "REGION_WRITE short data": (msg(5, Command.REGION_WRITE,
                                    struct.pack("<QII", 4, 0, 4) + b"ab"), EINVAL),
    "REGION_READ over max xfer": (msg(5, Command.REGION_READ,
                                      struct.pack("<QII", 0, 0, (1 << 20) + 1)), EINVAL),
    "REGION_WRITE_MULTI not negotiated": (msg(5, Command.REGION_WRITE_MULTI, struct.pack(
        "<QQII8s", 1, 4, 0, 4, b"abcd")), EINVAL),
    "DEVICE_FEATURE GET|SET": (msg(5, Command.DEVICE_FEATURE, struct.pack("<II", 8, 0x30002)),
                               EINVAL),
    "DEVICE_FEATURE unknown flag": (msg(5, Command.DEVICE_FEATURE,
                                        struct.pack("<II", 8, 0x80002)), EINVAL),
    "DEVICE_FEATURE GET argsz below the reply": (msg(5, Command.DEVICE_FEATURE, struct.pack(
        "<II", 8, 0x10001)), EINVAL),
    "MIG_DATA_READ argsz": (msg(5, Command.MIG_DATA_READ, struct.pack("<II", 8, 64)), EINVAL),
    "MIG_DATA_WRITE size": (msg(5, Command.MIG_DATA_WRITE, struct.pack("<II", 64, 8) + b"x"),
                            EINVAL),
    "DEVICE_RESET with payload": (msg(5, Command.DEVICE_RESET, b"\0" * 4), EINVAL),
    # refused by the device, not the connection: the same path for the client
    "no such region": (msg(5, Command.DEVICE_GET_REGION_INFO,
                           struct.pack("<IIIIQQ", 32, 0, 99, 0, 0, 0)), EINVAL),
    "REGION_READ of no region": (msg(5, Command.REGION_READ, struct.pack("<QII", 0, 99, 4)),
                                 EINVAL),
    "REGION_WRITE of no region": (msg(5, Command.REGION_WRITE,
                                      struct.pack("<QII", 0, 99, 1) + b"x"), EINVAL),
    "access beyond the region": (msg(5, Command.REGION_READ,
                                     struct.pack("<QII", 0xFFE, 0, 4)), EINVAL),
    "no such IRQ index": (msg(5, Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 9, 0)),
                          EINVAL),
}


@pytest.mark.parametrize("data,err", REFUSED.values(), ids=REFUSED.keys())
def test_refused_with_errno_and_session_goes_on(raw: Raw, data: bytes, err: int) -> None:
    hdr, _ = raw.call(data)
    assert_error(hdr, 5, wire.Header.decode(data).command, err)
    still_serving(raw)


def test_all_refusals_in_one_session(raw: Raw) -> None:
    """Pipelined: every refusal in one write, answered in order."""
    raw.send(b"".join(data for data, _ in REFUSED.values()))
    for data, err in REFUSED.values():
        hdr, _, fds = raw.recv()
        assert not fds
        assert_error(hdr, 5, wire.Header.decode(data).command, err)
    still_serving(raw)


def pipes_to_send(n: int) -> tuple[list[int], list[int]]:
    """n pipes: (read ends we keep, write ends to send and then close)."""
    pairs = [os.pipe() for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def all_writers_gone(read_fds: list[int]) -> bool:
    """EOF on a pipe means every copy of its write end is closed -- here,
    the copies the server received (it runs in this process)."""
    gone = True
    for fd in read_fds:
        os.set_blocking(fd, False)
        try:
            gone = gone and os.read(fd, 1) == b""
        except BlockingIOError:
            gone = False
        os.close(fd)
    return gone


@pytest.mark.parametrize("data,nfds", [
    (msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0)), 1),
    (msg(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 4)), 1),
    (msg(5, Command.DEVICE_RESET), 1),
    (msg(5, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 0, 0)), 1),
    (set_irqs(0x21, 1), 1),
    (set_irqs(0x24, 2), 3),  # EVENTFD takes 0 or count fds
    (msg(5, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 4096)), 2),
], ids=["GET_INFO", "REGION_READ", "RESET", "UNMAP", "SET_IRQS-NONE", "SET_IRQS-EVENTFD",
        "DMA_MAP"])
def test_fds_on_wrong_message_are_closed_by_server(raw: Raw, data: bytes, nfds: int) -> None:
    keep, send = pipes_to_send(nfds)
    raw.send(data, send)
    for fd in send:
        os.close(fd)
    hdr, _, _ = raw.recv()
    assert_error(hdr, 5, wire.Header.decode(data).command, EINVAL)
    assert all_writers_gone(keep), "the server kept fds it refused"
    still_serving(raw)


def test_region_info_truncated_then_full(raw: Raw) -> None:
    """argsz 32 for a region with capabilities: a successful reply with the
    needed argsz, no capabilities and no fd; asking again gets both."""
    raw.send(msg(5, Command.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 2, 0, 0, 0)))
    hdr, body, fds = raw.recv()
    assert hdr.flags == REPLY and hdr.msg_size == 48 and fds == []
    need, flags, index, cap_offset = struct.unpack_from("<IIII", body)
    assert need > 32 and index == 2 and cap_offset == 0
    raw.send(msg(6, Command.DEVICE_GET_REGION_INFO,
                 struct.pack("<IIIIQQ", need, 0, 2, 0, 0, 0)))
    hdr, body, fds = raw.recv()
    assert hdr.flags == REPLY and hdr.msg_size == 16 + need and len(fds) == 1
    info = wire.RegionInfo.decode(body)
    assert info.flags & wire.RegionFlags.CAPS and info.cap_offset == 32 and info.caps
    os.close(fds[0])


def test_no_reply_refusal_sends_nothing(raw: Raw) -> None:
    raw.send(msg(7, 14, flags=0x10))
    still_serving(raw)  # the first thing back is this reply, not an error for 7


# -- fatal: the server hangs up, then serves the next client ----------------------------


FATAL = {
    "msg_size below 16": msg(5, Command.DEVICE_RESET, size=8),
    "msg_size oversize": msg(5, Command.REGION_WRITE, size=0x7FFFFFFF),
    "reply never asked for": msg(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                                 flags=REPLY),
}


@pytest.mark.parametrize("data", FATAL.values(), ids=FATAL.keys())
def test_fatal_hangs_up_and_next_client_works(served: Served, raw: Raw, data: bytes) -> None:
    raw.send(data)
    assert raw.closed_by_peer()
    next_client_works(served)


def test_fds_mid_message_hang_up(served: Served, raw: Raw) -> None:
    data = set_irqs(0x24, 1)
    # The GET_INFO reply proves the server has read the first write, so the
    # fd below cannot arrive together with the start of the SET_IRQS.
    hdr, _ = raw.call(msg(4, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
                      + data[:10])
    assert hdr.msg_id == 4 and hdr.flags == REPLY
    keep, send = pipes_to_send(1)
    raw.send(data[10:], send)
    os.close(send[0])
    assert raw.closed_by_peer()
    assert all_writers_gone(keep)
    next_client_works(served)


def test_more_fds_than_server_accepts_hang_up(served: Served, raw: Raw) -> None:
    """9 fds where the server's ancillary buffer holds 8 (its max_msg_fds):
    the kernel truncates (MSG_CTRUNC), the server closes what it got and
    hangs up."""
    keep, send = pipes_to_send(9)
    raw.send(msg(5, Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x24, 2, 0, 9)), send)
    for fd in send:
        os.close(fd)
    assert raw.closed_by_peer()
    assert all_writers_gone(keep)
    next_client_works(served)


def test_short_header_then_eof(served: Served, raw: Raw) -> None:
    raw.send(b"\x05\x00\x04\x00\x20")
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.closed_by_peer()
    next_client_works(served)


def test_command_before_version_then_version(served: Served) -> None:
    r = Raw(served.path)
    hdr, _ = r.call(msg(3, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0)))
    assert_error(hdr, 3, Command.DEVICE_GET_INFO, EINVAL)
    hdr, body = r.call(msg(4, Command.VERSION, VERSION))
    assert hdr.flags == REPLY
    still_serving(r)
    r.close()


@pytest.mark.parametrize("text", [
    b"{oops", b'{"capabilities":{"max_msg_fds":"8"}}', b'{"capabilities":{"max_msg_fds":-1}}',
    b'{"capabilities":{"max_msg_fds":4096}}', b'{"x":"\xff"}',
], ids=["syntax", "string", "negative", "too-large", "not-utf8"])
def test_bad_version_json(served: Served, text: bytes) -> None:
    r = Raw(served.path)
    hdr, _ = r.call(msg(1, Command.VERSION, struct.pack("<HH", 0, 2) + text + b"\0"))
    assert_error(hdr, 1, Command.VERSION, EINVAL)
    r.close()
    next_client_works(served)


def test_version_major_mismatch_closes(served: Served) -> None:
    r = Raw(served.path)
    hdr, _ = r.call(msg(1, Command.VERSION, struct.pack("<HH", 1, 0) + b"{}\0"))
    assert hdr.flags == REPLY | ERROR and hdr.error != 0
    assert r.closed_by_peer()
    r.close()
    next_client_works(served)


def test_version_with_fd_refused(served: Served) -> None:
    rd, wr = os.pipe()
    r = Raw(served.path)
    hdr, _ = r.call(msg(1, Command.VERSION, VERSION), [rd])
    assert_error(hdr, 1, Command.VERSION, EINVAL)
    r.close()
    os.close(rd)
    os.close(wr)
    next_client_works(served)


# -- what the client sends back for the server's DMA --------------------------------------


def start_dma(raw: Raw, cmd: int) -> int:
    """Map message-only DMA, start the device's engine; returns the msg_id
    of the REGION_WRITE whose reply comes after the device's DMA."""
    hdr, _ = raw.call(msg(10, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 1 << 16)))
    assert hdr.flags == REPLY
    hdr, _ = raw.call(msg(11, Command.REGION_WRITE,
                          struct.pack("<QII", 0x08, 0, 12) + struct.pack("<QI", 0x100, 4)))
    assert hdr.flags == REPLY
    raw.send(msg(12, Command.REGION_WRITE, struct.pack("<QII", 0x14, 0, 4)
                  + struct.pack("<I", cmd)))
    return 12


def dma_status(raw: Raw) -> int:
    hdr, body = raw.call(msg(13, Command.REGION_READ, struct.pack("<QII", 0x18, 0, 4)))
    return int(struct.unpack_from("<I", body, 16)[0])


def test_dma_read_error_reply_with_payload(served: Served, raw: Raw) -> None:
    """libvfio-user style: the error reply still carries a payload; the
    server takes the errno and ignores the payload."""
    start_dma(raw, 1)
    hdr, body, _ = raw.recv()
    assert hdr.command == Command.DMA_READ and hdr.flags == 0
    assert body == struct.pack("<QQ", 0x100, 4)
    raw.send(msg(hdr.msg_id, Command.DMA_READ, body + b"\0" * 4, flags=REPLY | ERROR,
                 error=errno.EFAULT))
    hdr, _, _ = raw.recv()
    assert (hdr.msg_id, hdr.flags) == (12, REPLY)
    assert dma_status(raw) == errno.EFAULT


@pytest.mark.parametrize("reply", [
    b"",  # QEMU: header only
    struct.pack("<QI", 0x100, 4),  # the spec's table: u64 address, u32 count
    struct.pack("<QQ", 0x100, 4),  # libvfio-user: the 16-byte echo
], ids=["qemu", "spec", "libvfio-user"])
def test_dma_write_reply_variants(served: Served, raw: Raw, reply: bytes) -> None:
    served.device.regs[BUF_OFF:BUF_OFF + 4] = b"wxyz"
    start_dma(raw, 2)
    hdr, body, _ = raw.recv()
    assert hdr.command == Command.DMA_WRITE
    assert body == struct.pack("<QQ", 0x100, 4) + b"wxyz"
    raw.send(msg(hdr.msg_id, Command.DMA_WRITE, reply, flags=REPLY))
    hdr, _, _ = raw.recv()
    assert (hdr.msg_id, hdr.flags) == (12, REPLY)
    assert dma_status(raw) == 0


NO_REPLY = 0x10


def test_accesses_arriving_together_keep_order_and_framing(served: Served, raw: Raw) -> None:
    """A client posting writes sends several accesses at once, possibly the
    start of the next. Here the first one's handler waits for DMA on this
    socket (no twin socket): the rest of the read arrives with the DMA
    reply, and everything is still taken in order, whole."""
    hdr, _ = raw.call(msg(10, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 1 << 16)))
    assert hdr.flags == REPLY
    raw.call(msg(11, Command.REGION_WRITE,
                 struct.pack("<QII", 0x08, 0, 12) + struct.pack("<QI", 0x100, 4)))
    read = msg(14, Command.REGION_READ, struct.pack("<QII", 4, 0, 4))
    raw.send(msg(12, Command.REGION_WRITE, struct.pack("<QII", 0x14, 0, 4)
                 + struct.pack("<I", 1), flags=NO_REPLY)
             + msg(13, Command.REGION_WRITE, struct.pack("<QII", 4, 0, 4) + b"late",
                   flags=NO_REPLY)
             + read[:10])
    hdr, body, _ = raw.recv()
    assert hdr.command == Command.DMA_READ and body == struct.pack("<QQ", 0x100, 4)
    raw.send(read[10:] + msg(hdr.msg_id, Command.DMA_READ, body + b"abcd", flags=REPLY))
    hdr, body, _ = raw.recv()
    assert (hdr.msg_id, hdr.flags) == (14, REPLY) and body[16:] == b"late"
    assert served.device.regs[BUF_OFF:BUF_OFF + 4] == b"abcd"
    assert dma_status(raw) == 0


def test_many_posted_writes_in_one_send(served: Served) -> None:
    with Client.connect(served.path) as c:
        burst = b"".join(c.conn.posted_write(4, 0, struct.pack("<I", i)) for i in range(200))
        c.transport.sock.sendall(burst)
        assert c.region_read(0, 4, 4) == struct.pack("<I", 199)
        assert c.region_read(0, 0, 4) == struct.pack("<I", ID_VALUE)


def test_bad_dma_reply_hangs_up(served: Served, raw: Raw) -> None:
    start_dma(raw, 1)
    hdr, _, _ = raw.recv()
    raw.send(msg(hdr.msg_id, Command.DMA_READ, b"\0" * 5, flags=REPLY))  # short payload
    assert raw.closed_by_peer()
    next_client_works(served)


# -- the client runtime against a hostile server -------------------------------------------


def fake_server(tmp_path: Path, script: Callable[[socket.socket], None]) -> tuple[str, Thread]:
    path = str(tmp_path / "fake.sock")
    lst = listen(path)

    def run() -> None:
        conn, _ = lst.accept()
        with conn:
            script(conn)
        lst.close()

    t = Thread(target=run, daemon=True)
    t.start()
    return path, t


def answer_version(conn: socket.socket, caps: bytes = b'{"capabilities":{}}') -> None:
    head = conn.recv(16)
    msg_id, _, size = struct.unpack_from("<HHI", head)
    conn.recv(size - 16)
    conn.sendall(msg(msg_id, Command.VERSION, struct.pack("<HH", 0, 2) + caps + b"\0",
                     flags=REPLY))


@pytest.mark.parametrize("reply", [
    msg(1, Command.VERSION, b"\xff" * 8, flags=REPLY),  # not JSON
    msg(1, Command.VERSION, struct.pack("<HH", 3, 0) + b"{}\0", flags=REPLY),  # major
    msg(1, Command.DEVICE_GET_INFO, flags=REPLY),  # a reply to something else
    msg(1, Command.VERSION, size=4),  # broken framing
], ids=["json", "major", "wrong-reply", "framing"])
def test_client_refuses_bad_version_reply(tmp_path: Path, reply: bytes) -> None:
    def script(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(reply)
        conn.recv(4096)  # until the client hangs up

    path, t = fake_server(tmp_path, script)
    with pytest.raises(PeerProtocolError):
        Client.connect(path, timeout=10)
    t.join(10)


@pytest.mark.parametrize("answer", [
    msg(77, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 3, 9, 5), flags=REPLY),  # id
    msg(2, Command.DEVICE_GET_INFO, b"\0" * 4, flags=REPLY),  # short payload
    msg(2, Command.DEVICE_GET_INFO, size=0xFFFFFFF),  # oversize
    b"",  # the server hangs up
], ids=["unknown-id", "short", "oversize", "eof"])
def test_client_runtime_raises_only_protocol_errors(tmp_path: Path, answer: bytes) -> None:
    def script(conn: socket.socket) -> None:
        answer_version(conn)
        conn.recv(4096)  # DEVICE_GET_INFO
        if answer:
            conn.sendall(answer)

    path, t = fake_server(tmp_path, script)
    c = Client.connect(path, timeout=10, twin_socket=False)
    c.transport.sock.settimeout(10)
    with pytest.raises((PeerProtocolError, ConnectionClosed)):
        c.device_info()
    c.close()
    t.join(10)


def test_client_answers_bad_dma_command_with_error(tmp_path: Path) -> None:
    """A DMA_WRITE whose data does not match its count gets an EINVAL
    error reply; the client's call still completes."""
    got: list[wire.Header] = []

    def script(conn: socket.socket) -> None:
        answer_version(conn)
        conn.recv(4096)  # the client's REGION_READ (id 2)
        conn.sendall(msg(9, Command.DMA_WRITE, struct.pack("<QQ", 0, 4) + b"ab"))
        got.append(wire.Header.decode(conn.recv(16)))
        conn.sendall(msg(2, Command.REGION_READ, struct.pack("<QII", 0, 0, 4) + b"abcd",
                         flags=REPLY))
        conn.recv(4096)

    path, t = fake_server(tmp_path, script)
    with Client.connect(path, timeout=10, twin_socket=False) as c:
        c.transport.sock.settimeout(10)
        assert c.region_read(0, 0, 4) == b"abcd"
    t.join(10)
    assert got and got[0].msg_id == 9 and got[0].flags == REPLY | ERROR
    assert got[0].error == EINVAL


@pytest.mark.parametrize("kind", ["pipe", "datagram"])
def test_client_refuses_a_twin_fd_that_is_no_stream_socket(tmp_path: Path, kind: str) -> None:
    keep: list[int] = []

    def script(conn: socket.socket) -> None:
        head = conn.recv(4096)
        if kind == "pipe":
            r, w = os.pipe()
            passed, keep[:] = r, [w]
        else:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            passed, keep[:] = a.detach(), [b.detach()]
        caps = b'{"capabilities":{"twin_socket":{"supported":true,"fd_index":0}}}\0'
        reply = msg(struct.unpack_from("<H", head)[0], Command.VERSION,
                    struct.pack("<HH", 0, 2) + caps, flags=REPLY)
        conn.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [passed]).tobytes())])
        os.close(passed)
        conn.recv(4096)

    path, t = fake_server(tmp_path, script)
    with pytest.raises(PeerProtocolError):
        Client.connect(path, timeout=10)
    t.join(10)
    if kind == "pipe":  # EOF: the client closed the read end it received
        os.set_blocking(keep[0], False)
        with pytest.raises(BrokenPipeError):
            os.write(keep[0], b"x")
    for fd in keep:
        os.close(fd)


def test_client_serves_dma_only_inside_its_maps(tmp_path: Path) -> None:
    """DMA_READ/DMA_WRITE must lie in a mapped region with the access that
    was granted; the client answers anything else with EFAULT."""
    answers: list[tuple[wire.Header, bytes]] = []
    asks = [
        msg(20, Command.DMA_READ, struct.pack("<QQ", 0x1000, 4)),  # mapped, readable
        msg(21, Command.DMA_READ, struct.pack("<QQ", 0x3000, 4)),  # never mapped
        msg(22, Command.DMA_READ, struct.pack("<QQ", 0x1ffe, 4)),  # runs past the map
        msg(23, Command.DMA_WRITE, struct.pack("<QQ", 0x1000, 2) + b"hi"),  # read-only map
        msg(24, Command.DMA_WRITE, struct.pack("<QQ", 0x2000, 2) + b"ok"),  # writable map
    ]

    def script(conn: socket.socket) -> None:
        answer_version(conn)
        for mid in (2, 3):  # the two DMA_MAPs
            conn.recv(4096)
            conn.sendall(msg(mid, Command.DMA_MAP, flags=REPLY))
        conn.recv(4096)  # the client's DEVICE_RESET (id 4)
        for ask in asks:
            conn.sendall(ask)
            head = conn.recv(16)
            hdr = wire.Header.decode(head)
            answers.append((hdr, conn.recv(hdr.msg_size - 16) if hdr.msg_size > 16 else b""))
        conn.sendall(msg(4, Command.DEVICE_RESET, flags=REPLY))
        conn.recv(4096)

    path, t = fake_server(tmp_path, script)
    with MemfdRam(0x4000) as ram:
        ram.write(0x1000, b"data")
        with Client.connect(path, timeout=10, twin_socket=False, guest=ram) as c:
            c.transport.sock.settimeout(10)
            c.dma_map(0x1000, 0x1000, writable=False)
            c.dma_map(0x2000, 0x1000)
            c.reset()
        assert ram.read(0x1000, 2) == b"da" and ram.read(0x2000, 2) == b"ok"
    t.join(10)
    assert [(h.msg_id, h.flags, h.error) for h, _ in answers] == [
        (20, REPLY, 0), (21, REPLY | ERROR, errno.EFAULT), (22, REPLY | ERROR, errno.EFAULT),
        (23, REPLY | ERROR, errno.EFAULT), (24, REPLY, 0)]
    assert answers[0][1] == struct.pack("<QQ", 0x1000, 4) + b"data"


# -- random messages never take the server down -------------------------------------------

WORD = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 20, 24, 32, 0x21, 0x22, 0x24, 0x28, 0x30,
                        0x10001, 0x20002, 0x40002, 0x20006, 0x10008, 0xFFFFFFFF]) \
    | st.integers(0, 0x10000)


@st.composite
def plausible_message(draw: st.DrawFn) -> bytes:
    """Commands with payloads made of plausible u32 words, so that many pass
    the framing checks and reach the per-command rules and the device."""
    cmd = draw(st.integers(1, 19))
    words = draw(st.lists(WORD, max_size=12))
    payload = struct.pack(f"<{len(words)}I", *words) + draw(st.binary(max_size=3))
    flags = draw(st.sampled_from([0, 0, 0, 0x10, 0x1, 0x20]))
    return msg(draw(st.integers(0, 0xFFFF)), cmd, payload, flags=flags)


def test_random_messages_never_kill_the_server(tmp_path: Path) -> None:
    device = TestDevice()
    server = Server(device)
    path = str(tmp_path / "fuzz.sock")
    lst = listen(path)
    thread = Thread(target=server.serve, args=(lst,), daemon=True)
    thread.start()
    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record)

    handler = Collect(logging.ERROR)
    logging.getLogger("xdevproto").addHandler(handler)
    crashed: list[BaseException | None] = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: crashed.append(args.exc_value)

    @settings(max_examples=int(os.environ.get("XDEV_HYPOTHESIS_EXAMPLES", "40")),
              deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages=st.lists(plausible_message(), min_size=1, max_size=8),
           negotiate=st.booleans())
    def session(messages: list[bytes], negotiate: bool) -> None:
        r = Raw(path)
        try:
            if negotiate:
                hdr, _ = r.call(msg(1, Command.VERSION, VERSION))
                if hdr.error == errno.EBUSY:  # the last session is still closing
                    time.sleep(0.05)
                    return
            r.send(b"".join(messages))
            r.sock.shutdown(socket.SHUT_WR)
            while True:  # the server answers what it can, then sees EOF and hangs up
                _, _, fds = r.recv()
                for fd in fds:
                    os.close(fd)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            pass
        finally:
            r.close()

    try:
        session()
        assert not crashed, crashed
        assert not errors, [e.getMessage() for e in errors]
        assert thread.is_alive()
        deadline = time.monotonic() + 5
        while True:
            try:
                c = Client.connect(path, timeout=10)
                break
            except RemoteError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        with c:
            assert c.region_read(0, 0, 4) == struct.pack("<I", ID_VALUE)
    finally:
        threading.excepthook = old_hook
        logging.getLogger("xdevproto").removeHandler(handler)
        server.stop()
        thread.join(5)
        lst.close()
