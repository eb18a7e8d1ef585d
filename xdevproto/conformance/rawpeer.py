"""A raw vfio-user endpoint for the suite: bytes and fds, nothing checked.

The suite must be able to send what a well-behaved stack refuses to send
(bad sizes, wrong flags, too many fds), and to see exactly what came back.
So this layer frames messages itself ("Header": msg_size covers the whole
message), uses :mod:`xdevproto.wire` only to build and parse payloads, puts
a timeout on every read, and records every exchange in a transcript.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import wire
from ..wire import HEADER, HEADER_SIZE, HeaderFlags
from .model import CheckFailed, Transcript

MAX_FDS = 64


class PeerClosed(CheckFailed):
    """The peer closed the connection (or reset it)."""


class PeerTimeout(CheckFailed):
    """Nothing arrived within the timeout."""


@dataclass
class Msg:
    """One message as received (or about to be sent)."""

    msg_id: int
    command: int
    msg_size: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: how many fds arrived with it (``fds`` empties once they are closed)
    nfds: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & HeaderFlags.TYPE_MASK == wire.MSG_TYPE_REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & HeaderFlags.ERROR)

    @property
    def raw(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.msg_size, self.flags,
                           self.error) + self.payload

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []

    def describe(self) -> str:
        name = wire.COMMAND_BY_VALUE.get(self.command)
        cmd = name.name if name else str(self.command)
        kind = "reply" if self.is_reply else "command"
        err = f" error={errno.errorcode.get(self.error, self.error)}" if self.is_error else ""
        return f"{kind} {cmd} id={self.msg_id} size={self.msg_size}{err}"


def encode(msg_id: int, command: int, payload: bytes = b"", flags: int = 0,
           error: int = 0, msg_size: int | None = None) -> bytes:
    size = HEADER_SIZE + len(payload) if msg_size is None else msg_size
    return HEADER.pack(msg_id & 0xFFFF, command & 0xFFFF, size & 0xFFFFFFFF, flags, error) + payload


class RawPeer:
    """One end of a vfio-user connection, without protocol logic."""

    def __init__(self, sock: socket.socket, transcript: Transcript, timeout: float) -> None:
        self.sock = sock
        self.transcript = transcript
        self.timeout = timeout
        self.buf = bytearray()
        self.pending_fds: list[int] = []
        self.eof = False
        self.next_id = 0x100

    @classmethod
    def connect(cls, path: str, transcript: Transcript, timeout: float) -> RawPeer:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock, transcript, timeout)

    def close(self) -> None:
        for fd in self.pending_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pending_fds = []
        with contextlib.suppress(OSError):
            self.sock.close()

    def alloc_id(self) -> int:
        self.next_id = (self.next_id + 1) & 0xFFFF
        return self.next_id

    # -- sending -------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """One sendmsg() carrying the fds, then the rest if the kernel split it."""
        self.transcript.add("sent", data, len(fds))
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], anc)
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerClosed(f"peer closed the connection while we were sending: {exc}") from None
        except TimeoutError:
            raise PeerTimeout(f"peer did not take our message within {self.timeout}s") from None

    def send(self, command: int, payload: bytes = b"", *, fds: Sequence[int] = (),
             flags: int = 0, msg_id: int | None = None, error: int = 0) -> int:
        mid = self.alloc_id() if msg_id is None else msg_id
        self.send_raw(encode(mid, command, payload, flags, error), fds)
        return mid

    # -- receiving -----------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerTimeout(f"no complete message within {self.timeout}s")
        ready, _, _ = select.select([self.sock], [], [], left)
        if not ready:
            raise PeerTimeout(f"no complete message within {self.timeout}s")
        try:
            data, anc, _, _ = self.sock.recvmsg(
                1 << 20, socket.CMSG_SPACE(MAX_FDS * 4))
        except (ConnectionResetError, TimeoutError):
            data, anc, _flags = b"", [], 0
        fds: list[int] = []
        for level, kind, body in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", body[:len(body) - len(body) % 4]))
        if not data:
            self.eof = True
            for fd in fds:
                os.close(fd)
            return
        self.transcript.add("received", data, len(fds))
        self.buf += data
        self.pending_fds.extend(fds)

    def recv(self, timeout: float | None = None) -> Msg:
        """The next whole message; PeerClosed at EOF, PeerTimeout when late.

        fds are handed to the first message completed after they arrived
        (peers send a message's fds with its header, "Header").
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= HEADER_SIZE:
                msg_id, command, size, flags, err = HEADER.unpack_from(self.buf)
                if size < HEADER_SIZE or size > wire.MAX_MESSAGE_SIZE + 4096:
                    raise CheckFailed(f"peer sent a message with msg_size {size}")
                if len(self.buf) >= size:
                    payload = bytes(self.buf[HEADER_SIZE:size])
                    del self.buf[:size]
                    fds, self.pending_fds = self.pending_fds, []
                    return Msg(msg_id, command, size, flags, err, payload, fds, len(fds))
            if self.eof:
                raise PeerClosed("peer closed the connection")
            self._fill(deadline)

    def closed_within(self, timeout: float) -> bool:
        """True if the peer closes the connection (reading and dropping
        anything it still sends) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            try:
                self._fill(deadline)
            except PeerTimeout:
                return False
            self.buf.clear()
        return True
