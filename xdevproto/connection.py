"""The vfio-user connection state machine, without I/O.

Theory of operation
-------------------
A :class:`Connection` sits between a byte stream and its user, as h11 does
for HTTP. Bytes and SCM_RIGHTS file descriptors go in with
:meth:`Connection.receive_data`; typed events come out of
:meth:`Connection.next_event`; the ``send_*`` methods turn outgoing
messages into ``(bytes, fds)`` for the transport. There is no socket here,
so every protocol rule is tested with plain bytes.

States (one table, :data:`TRANSITIONS`)::

    client: NEW --send VERSION--> NEGOTIATING --VERSION reply--> READY
    server: NEW --VERSION request, accepted--> READY
    any:    --fatal error or close()--> CLOSED

Only VERSION may pass before READY; anything else is refused with EINVAL
(and the server stays in NEW, waiting for a VERSION).

File descriptors: a peer sends a message's fds in the same ``sendmsg()`` as
its header, and the kernel stops a ``recvmsg()`` right after the data that
carried fds. So fds received with a chunk belong to the *last* message that
starts in that chunk. fds that arrive with a message that may not carry
them, or in excess of what a message may carry, are closed and the message
is refused: nothing the peer passes can leak.

Errors: a violation that leaves framing intact becomes one
:class:`InvalidMessage` event (the runtime answers it with an errno reply);
one that breaks framing or negotiation raises a fatal
:class:`~xdevproto.errors.PeerProtocolError` and closes the connection.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import wire
from .errors import ConnectionClosed, LocalProtocolError, PeerProtocolError
from .wire import (
    HEADER,
    HEADER_SIZE,
    Capabilities,
    Command,
    DeviceFeature,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    FeatureFlags,
    HeaderFlags,
    MigData,
    Payload,
    RegionAccess,
    SetIrqs,
    Version,
)

#: Protocol version we speak (vfio-user 0.2, as libvfio-user and QEMU do).
VERSION_MAJOR = 0
VERSION_MINOR = 2


# Plain ints for the per-message paths: IntFlag arithmetic costs a micro-
# second per operation, and every register access pays it.
_TYPE_MASK = int(HeaderFlags.TYPE_MASK)
_REPLY = int(HeaderFlags.REPLY)
_NO_REPLY = int(HeaderFlags.NO_REPLY)
_ERROR = int(HeaderFlags.ERROR)
_KNOWN_FLAGS = wire.HEADER_FLAGS_KNOWN
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_unpack_region_access = wire.REGION_ACCESS.unpack_from
_RA_SIZE = wire.REGION_ACCESS.size
_unpack_hra = wire.HEADER_REGION_ACCESS.unpack_from
_pack_hra = wire.HEADER_REGION_ACCESS.pack
_COMMANDS = wire.COMMAND_BY_VALUE
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


_CLIENT, _SERVER = Role.CLIENT, Role.SERVER


class State(enum.Enum):
    NEW = "new"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"


_READY = State.READY


#: (role, state, what happened) -> next state
TRANSITIONS: dict[tuple[Role, State, str], State] = {
    (Role.CLIENT, State.NEW, "send VERSION"): State.NEGOTIATING,
    (Role.CLIENT, State.NEGOTIATING, "VERSION reply"): State.READY,
    (Role.SERVER, State.NEW, "VERSION accepted"): State.READY,
}


# -- events ---------------------------------------------------------------
# Plain slotted dataclasses: frozen ones cost four times as much to create
# (measured 0.74 us vs 0.19 us), and one is made for every register access.
# Treat them as immutable.


@dataclass(slots=True)
class Request:
    """A command from the peer, validated."""

    msg_id: int
    command: Command
    payload: Payload
    fds: list[int]
    no_reply: bool = False


@dataclass(slots=True)
class Reply:
    """The peer's answer to one of our commands.

    ``error`` is 0 on success; on an error reply it is the errno (EINVAL
    when the peer set the error bit but left the field 0, as the spec
    allows) and ``payload`` is None: a payload sent along with an error
    (libvfio-user does) is ignored.
    """

    msg_id: int
    command: Command
    payload: Payload | None
    fds: list[int]
    error: int = 0


@dataclass(slots=True)
class InvalidMessage:
    """A command we refuse; framing is intact. Answer it with
    :meth:`Connection.send_error` unless ``no_reply`` is set."""

    msg_id: int
    command: int
    error: PeerProtocolError
    no_reply: bool = False


class NeedData(enum.Enum):
    NEED_DATA = "need data"


NEED_DATA = NeedData.NEED_DATA
#: (msg_id, command, offset, region, count, data, no_reply) of a register access
FastAccess = tuple[int, int, int, int, int, bytes, bool]
Event = Request | Reply | InvalidMessage | NeedData


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The outcome of VERSION, from our side's point of view."""

    major: int
    minor: int
    #: what the peer can receive
    peer_max_msg_fds: int
    peer_max_data_xfer_size: int
    max_dma_maps: int
    pgsizes: int
    twin_socket: bool
    write_multiple: bool
    migration_pgsize: int | None
    extensions: dict[str, object] = field(default_factory=dict)


# -- which commands may carry how many fds -----------------------------------


def _request_fd_limit(cmd: Command, payload: Payload) -> int:
    if cmd is Command.DMA_MAP:
        return 1
    if (cmd is Command.DEVICE_SET_IRQS and isinstance(payload, SetIrqs)
            and payload.flags & wire.SetIrqsFlags.DATA_EVENTFD):
        return payload.count
    return 0


def _reply_fd_limit(cmd: Command) -> int:
    if cmd in (Command.VERSION, Command.DEVICE_GET_REGION_INFO):
        return 1
    if cmd is Command.DEVICE_GET_REGION_IO_FDS:
        return wire.MAX_IO_FD_ENTRIES
    return 0


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Connection:
    """One vfio-user connection, either side."""

    def __init__(
        self,
        role: Role,
        capabilities: Capabilities | None = None,
        *,
        max_message_size: int | None = None,
    ) -> None:
        self.role = role
        #: what we advertise (and therefore accept)
        self._our_caps = capabilities or Capabilities(max_msg_fds=8)
        self.state = State.NEW
        self.negotiated: Negotiated | None = None
        self.max_xfer = self._our_caps.max_data_xfer_size
        self._max_message = max_message_size or (self._our_caps.max_data_xfer_size + 64)
        self._buf = bytearray()
        self._pos = 0  # start of the first message not yet returned
        self._base = 0  # stream offset of _buf[0]
        self._fds_at: dict[int, list[int]] = {}  # stream offset of a message -> its fds
        self._next_id = 0
        self._pending: dict[int, Command] = {}  # our msg_id -> command awaiting a reply
        self._proposed: Version | None = None

    # -- state ---------------------------------------------------------------
    def _transition(self, what: str) -> None:
        nxt = TRANSITIONS.get((self.role, self.state, what))
        if nxt is None:
            raise LocalProtocolError(f"{what} is not allowed in state {self.state.value}")
        self.state = nxt

    def close(self) -> None:
        """Forget everything; fds still queued are closed."""
        self.state = State.CLOSED
        for fds in self._fds_at.values():
            close_fds(fds)
        self._fds_at.clear()
        self._buf = bytearray()  # a payload view may still be exported
        self._pos = 0
        self._pending.clear()

    def _fatal(self, message: str, err: int = errno.EINVAL) -> PeerProtocolError:
        self.close()
        return PeerProtocolError(message, err, fatal=True)

    @property
    def our_caps(self) -> Capabilities:
        """What we advertise, and therefore accept."""
        return self._our_caps

    @our_caps.setter
    def our_caps(self, caps: Capabilities) -> None:
        self._our_caps = caps
        self.max_xfer = caps.max_data_xfer_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as events."""
        return len(self._buf) - self._pos

    @property
    def pending(self) -> int:
        """How many of our commands still await a reply."""
        return len(self._pending)

    # -- receiving -----------------------------------------------------------
    def receive_data(self, data: bytes | memoryview, fds: Sequence[int] = ()) -> None:
        """Feed bytes (and the fds that came with them) from the transport.

        An empty ``data`` means EOF.
        """
        if self.state is State.CLOSED:
            close_fds(fds)
            raise ConnectionClosed("connection is closed")
        if not data:
            close_fds(fds)
            self.close()
            return
        old_end = self._base + len(self._buf)
        if not self._buf:
            self._buf = bytearray(data)
        else:
            self._buf += data
        if fds:
            owner = self._last_start_from(old_end)
            if owner is None:
                close_fds(fds)
                raise self._fatal("file descriptors arrived in the middle of a message")
            self._fds_at.setdefault(owner, []).extend(fds)

    def _last_start_from(self, stream_offset: int) -> int | None:
        """Stream offset of the last message that starts at or after
        ``stream_offset`` in the buffered data."""
        pos, end, owner = self._pos, len(self._buf), None
        while pos < end:
            if self._base + pos >= stream_offset:
                owner = self._base + pos
            if pos + HEADER_SIZE > end:
                break
            size = HEADER.unpack_from(self._buf, pos)[2]
            if size < HEADER_SIZE:
                break  # next_event reports the framing error
            pos += size
        return owner

    def next_event(self) -> Event:
        """The next complete message as an event, or NEED_DATA."""
        if self.state is State.CLOSED:
            raise ConnectionClosed("connection is closed")
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return NEED_DATA
        msg_id, command, size, flags, error = _unpack_header(buf, pos)
        if size < HEADER_SIZE or size > self._max_message:
            raise self._fatal(f"message size {size} out of bounds")
        if avail < size:
            return NEED_DATA
        end = pos + size
        payload = bytes(buf[pos + HEADER_SIZE:end])
        fds = self._fds_at.pop(self._base + pos, []) if self._fds_at else []
        if end == len(buf):
            self._base += end
            buf.clear()
            self._pos = 0
        elif end > 65536:
            self._base += end
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        if flags & _TYPE_MASK == _REPLY:
            return self._interpret_reply(msg_id, command, flags, error, payload, fds)
        return self._interpret(msg_id, command, flags, payload, fds)

    # -- the register-access shortcut -------------------------------------------
    # A guest MMIO access is one REGION_READ/WRITE round trip, so the common
    # case -- one whole message per receive, nothing buffered, no fds -- skips
    # the general buffering. Anything else returns None and the caller feeds
    # the chunk through receive_data(); tests prove both paths agree.

    def fast_request(self, chunk: bytes | memoryview, *,
                     prefix: bool = False) -> FastAccess | None:
        """Server: ``chunk`` as (msg_id, command, offset, region, count, data,
        no_reply) if it is exactly one valid REGION_READ/REGION_WRITE (with
        ``prefix``: if it starts with one, which is consumed; its length is
        32 plus that of ``data``); else None and nothing is consumed."""
        n = len(chunk)
        if n < 32 or self._buf or self.state is not _READY or self.role is not _SERVER:
            return None
        msg_id, command, size, flags, error, offset, region, count = _unpack_hra(chunk, 0)
        if (size > n if prefix else size != n) or flags & ~_NO_REPLY or error \
                or count > self.max_xfer:
            return None
        if command == _REGION_READ and size == 32 and not flags:
            body = b""
        elif command == _REGION_WRITE and size == 32 + count:  # NO_REPLY: a posted write
            body = bytes(chunk[32:size])
        else:
            return None
        self._base += size
        return msg_id, command, offset, region, count, body, bool(flags)

    def region_reply(self, msg_id: int, command: int, offset: int, region: int, count: int,
                     data: bytes = b"") -> bytes:
        """Server: the reply to a REGION_READ (with ``data``) or REGION_WRITE."""
        return _pack_hra(msg_id, command, 32 + len(data), _REPLY, 0, offset, region,
                         count) + data

    def region_request(self, command: int, offset: int, region: int, count: int,
                       data: bytes = b"") -> tuple[int, bytes, bytes]:
        """Client: (msg_id, a REGION_READ/REGION_WRITE command in one pack,
        the header its successful reply starts with). The command is not yet
        pending: :meth:`region_reply_data` takes the reply it expects
        directly, and anything else is fed to :meth:`receive_data` after
        :meth:`expect_reply`."""
        if self.state is not _READY or self.role is not _CLIENT:
            raise LocalProtocolError("region access before negotiation or from a server")
        msg_id = self._alloc_id()
        return (msg_id,
                _pack_hra(msg_id, command, 32 + len(data), 0, 0, offset, region, count) + data,
                _pack_hra(msg_id, command, 32 + count if command == _REGION_READ else 32,
                          _REPLY, 0, offset, region, count))

    def posted_write(self, offset: int, region: int, data: bytes) -> bytes:
        """Client: a REGION_WRITE with NO_REPLY, as a CPU posts an MMIO write.
        The server processes commands in order, so any later command's reply
        comes after the write took effect; a failure is the server's to log."""
        if self.state is not _READY or self.role is not _CLIENT:
            raise LocalProtocolError("region access before negotiation or from a server")
        return _pack_hra(self._alloc_id(), _REGION_WRITE, 32 + len(data), _NO_REPLY, 0,
                         offset, region, len(data)) + data

    def expect_reply(self, msg_id: int, command: int) -> None:
        """Client: ``msg_id`` (from :meth:`region_request`) awaits its reply
        through the general path."""
        self._pending[msg_id] = _COMMANDS[command]

    def region_reply_data(self, buf: bytearray, n: int, expect: bytes, size: int) -> bytes | None:
        """Client: the data of the message in ``buf[:n]`` if it is exactly the
        successful reply of ``size`` bytes whose header is ``expect`` (from
        :meth:`region_request`: same id, command, access, no error); None,
        with nothing consumed, for anything else (another message, an error
        reply, a reply that does not match, a partial read)."""
        if n != size or self._buf or not buf.startswith(expect):
            return None
        self._base += n
        return bytes(buf[32:n]) if n > 32 else b""

    def _interpret(self, msg_id: int, command: int, flags: int, payload: bytes,
                   fds: list[int]) -> Event:
        no_reply = bool(flags & _NO_REPLY)
        try:
            if flags & ~_KNOWN_FLAGS or flags & _TYPE_MASK:
                raise PeerProtocolError(f"bad header flags {flags:#x}")
            if flags & _ERROR:
                raise PeerProtocolError("error bit set on a command")
            cmd = wire.COMMAND_BY_VALUE.get(command)
            if cmd is None:
                raise PeerProtocolError(f"unknown command {command}", errno.ENOSYS)
            return self._validate_request(msg_id, cmd, payload, fds, no_reply)
        except PeerProtocolError as exc:
            close_fds(fds)
            if exc.fatal:
                self.close()
                raise
            return InvalidMessage(msg_id, command, exc, no_reply)

    def _validate_request(self, msg_id: int, cmd: Command, data: bytes, fds: list[int],
                          no_reply: bool) -> Request:
        server = self.role is Role.SERVER
        if server == (cmd in wire.SERVER_TO_CLIENT):
            raise PeerProtocolError(f"{cmd.name} may not be sent to a {self.role.value}")
        if self.state is not State.READY:
            if cmd is not Command.VERSION or not server:
                raise PeerProtocolError(f"{cmd.name} before VERSION negotiation")
        elif cmd is Command.VERSION:
            raise PeerProtocolError("VERSION after negotiation")
        # Hot path first: register accesses and message DMA.
        if cmd is Command.REGION_READ or cmd is Command.REGION_WRITE:
            if len(data) < _RA_SIZE:
                raise PeerProtocolError(f"{cmd.name}: short payload")
            offset, region, count = _unpack_region_access(data)
            if count > self.our_caps.max_data_xfer_size:
                self._check_count(cmd, count)
            want = _RA_SIZE + count if cmd is Command.REGION_WRITE else _RA_SIZE
            if len(data) != want:
                raise PeerProtocolError(f"{cmd.name}: payload of {len(data)} bytes, need {want}")
            if fds:
                raise PeerProtocolError(f"{cmd.name} carries file descriptors")
            body = data[_RA_SIZE:] if cmd is Command.REGION_WRITE else b""
            return Request(msg_id, cmd, RegionAccess(offset, region, count, body), fds,
                           no_reply)
        elif cmd is Command.DMA_READ or cmd is Command.DMA_WRITE:
            dma = DmaAccess.decode(data)
            self._check_count(cmd, dma.count)
            want = wire.DMA_ACCESS.size + (dma.count if cmd is Command.DMA_WRITE else 0)
            if len(data) != want:
                raise PeerProtocolError(f"{cmd.name}: payload of {len(data)} bytes, need {want}")
            payload: Payload = dma
        else:
            payload = wire.decode_payload(cmd, False, data)
            self._check_request(cmd, payload, len(data), len(fds))
        if len(fds) > _request_fd_limit(cmd, payload):
            raise PeerProtocolError(f"{cmd.name} carries {len(fds)} fds, too many")
        if len(fds) > self.our_caps.max_msg_fds:
            raise PeerProtocolError(f"{len(fds)} fds exceed our max_msg_fds")
        return Request(msg_id, cmd, payload, fds, no_reply)

    def _check_count(self, cmd: Command, count: int) -> None:
        if count > self.our_caps.max_data_xfer_size:
            raise PeerProtocolError(f"{cmd.name}: count {count} exceeds max_data_xfer_size")

    def _check_request(self, cmd: Command, p: Payload, size: int, nfds: int) -> None:
        """argsz and field rules of each command ("Message sizes" and the
        per-command sections of the spec)."""
        if cmd is Command.DMA_MAP:
            assert isinstance(p, DmaMap)
            if p.argsz != DmaMap.SIZE or size != DmaMap.SIZE:
                raise PeerProtocolError("DMA_MAP: argsz must be the request size (32)")
            if p.flags & ~int(wire.DmaMapFlags.READ | wire.DmaMapFlags.WRITE):
                raise PeerProtocolError(f"DMA_MAP: unknown flags {p.flags:#x}")
            if p.size == 0 or p.address + p.size > 1 << 64 or p.offset + p.size > 1 << 64:
                raise PeerProtocolError("DMA_MAP: empty or wrapping range")
            if nfds == 0 and p.offset:
                raise PeerProtocolError("DMA_MAP: offset without a file descriptor")
        elif cmd is Command.DMA_UNMAP:
            assert isinstance(p, DmaUnmap)
            if p.argsz < DmaUnmap.SIZE or size != DmaUnmap.SIZE:
                raise PeerProtocolError("DMA_UNMAP: bad argsz or size")
            if p.flags & wire.DmaUnmapFlags.GET_DIRTY_BITMAP:
                raise PeerProtocolError("DMA_UNMAP: dirty bitmaps are migration v1",
                                        errno.ENOTSUP)
            if p.flags & ~int(wire.DmaUnmapFlags.ALL):
                raise PeerProtocolError(f"DMA_UNMAP: unknown flags {p.flags:#x}")
            if p.flags & wire.DmaUnmapFlags.ALL and (p.address or p.size):
                raise PeerProtocolError("DMA_UNMAP: FLAG_ALL with an address or size")
        elif cmd in (Command.DEVICE_GET_INFO, Command.DEVICE_GET_IRQ_INFO,
                     Command.DEVICE_GET_REGION_IO_FDS, Command.DEVICE_GET_REGION_INFO):
            fixed = wire.REQUEST_TYPES[cmd].SIZE  # type: ignore[attr-defined]
            if size != fixed:
                raise PeerProtocolError(f"{cmd.name}: request of {size} bytes, need {fixed}")
            if p.argsz < fixed:  # type: ignore[attr-defined]
                raise PeerProtocolError(f"{cmd.name}: argsz below {fixed}")
            if cmd is Command.DEVICE_GET_REGION_IO_FDS and (p.flags or p.count):  # type: ignore[attr-defined]
                raise PeerProtocolError("DEVICE_GET_REGION_IO_FDS: flags and count must be 0")
        elif cmd is Command.DEVICE_SET_IRQS:
            assert isinstance(p, SetIrqs)
            self._check_set_irqs(p, size, nfds)
        elif cmd is Command.DEVICE_RESET:
            if size:
                raise PeerProtocolError("DEVICE_RESET has no payload")
        elif cmd is Command.REGION_WRITE_MULTI:
            neg = self.negotiated
            if neg is None or not neg.write_multiple:
                raise PeerProtocolError("REGION_WRITE_MULTI without write_multiple")
        elif cmd is Command.DEVICE_FEATURE:
            assert isinstance(p, DeviceFeature)
            self._check_feature(p, size)
        elif cmd is Command.MIG_DATA_READ or cmd is Command.MIG_DATA_WRITE:
            assert isinstance(p, MigData)
            self._check_count(cmd, p.size)
            want = MigData.SIZE + (p.size if cmd is Command.MIG_DATA_WRITE else 0)
            if size != want or p.argsz < MigData.SIZE + p.size:
                raise PeerProtocolError(f"{cmd.name}: bad size or argsz")

    @staticmethod
    def _check_set_irqs(p: SetIrqs, size: int, nfds: int) -> None:
        data_type = p.flags & wire.SET_IRQS_DATA_MASK
        action = p.flags & wire.SET_IRQS_ACTION_MASK
        if p.flags & ~(wire.SET_IRQS_DATA_MASK | wire.SET_IRQS_ACTION_MASK):
            raise PeerProtocolError(f"SET_IRQS: unknown flags {p.flags:#x}")
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise PeerProtocolError("SET_IRQS: need exactly one data type and one action")
        if p.argsz != size:
            raise PeerProtocolError("SET_IRQS: argsz must be the request size")
        if p.start + p.count > 1 << 32:
            raise PeerProtocolError("SET_IRQS: start + count wraps")
        if data_type == wire.SetIrqsFlags.DATA_BOOL:
            if len(p.data) != p.count:
                raise PeerProtocolError("SET_IRQS: DATA_BOOL needs count bytes")
        elif p.data:
            raise PeerProtocolError("SET_IRQS: data with DATA_NONE/DATA_EVENTFD")
        if data_type == wire.SetIrqsFlags.DATA_EVENTFD and nfds not in (0, p.count):
            raise PeerProtocolError("SET_IRQS: fd count must be 0 or count", errno.EINVAL)
        if data_type != wire.SetIrqsFlags.DATA_EVENTFD and nfds:
            raise PeerProtocolError("SET_IRQS: fds without DATA_EVENTFD")
        if p.count == 0 and not (data_type == wire.SetIrqsFlags.DATA_NONE
                                 and action == wire.SetIrqsFlags.ACTION_TRIGGER):
            raise PeerProtocolError("SET_IRQS: count 0 only with DATA_NONE|ACTION_TRIGGER")

    @staticmethod
    def _check_feature(p: DeviceFeature, size: int) -> None:
        ops = p.flags & (FeatureFlags.GET | FeatureFlags.SET | FeatureFlags.PROBE)
        if p.flags & ~int(FeatureFlags.INDEX_MASK | FeatureFlags.GET | FeatureFlags.SET
                          | FeatureFlags.PROBE):
            raise PeerProtocolError(f"DEVICE_FEATURE: unknown flags {p.flags:#x}")
        if not ops:
            raise PeerProtocolError("DEVICE_FEATURE: none of GET, SET, PROBE")
        if ops & FeatureFlags.GET and ops & FeatureFlags.SET and not ops & FeatureFlags.PROBE:
            raise PeerProtocolError("DEVICE_FEATURE: GET and SET together without PROBE")
        if p.argsz < size:
            raise PeerProtocolError("DEVICE_FEATURE: argsz below the request size")

    def _interpret_reply(self, msg_id: int, command: int, flags: int, error: int,
                         data: bytes, fds: list[int]) -> Reply:
        expected = self._pending.pop(msg_id, None)
        if expected is None or expected != command:
            close_fds(fds)
            raise self._fatal(f"reply to command {command} id {msg_id} we did not send")
        if flags & _ERROR:
            close_fds(fds)
            if expected is Command.VERSION:
                self.state = State.CLOSED  # the caller reports the errno and hangs up
            return Reply(msg_id, expected, None, [], error or errno.EINVAL)
        try:
            if fds and len(fds) > _reply_fd_limit(expected):
                raise PeerProtocolError(f"{expected.name} reply carries too many fds")
            payload = wire.decode_payload(expected, True, data)
            if expected is Command.VERSION:
                assert isinstance(payload, Version)
                self._accept_version_reply(payload, len(fds))
        except PeerProtocolError as exc:
            close_fds(fds)
            raise self._fatal(f"bad {expected.name} reply: {exc}", exc.errno) from None
        return Reply(msg_id, expected, payload, fds)

    # -- sending -------------------------------------------------------------
    def _alloc_id(self) -> int:
        nxt = (self._next_id + 1) & 0xFFFF
        if nxt in self._pending:
            for _ in range(0x10000):
                nxt = (nxt + 1) & 0xFFFF
                if nxt not in self._pending:
                    break
            else:
                raise LocalProtocolError("all 65536 message ids are awaiting replies")
        self._next_id = nxt
        return nxt

    def send_request(self, command: Command, payload: Payload | bytes,
                     fds: Sequence[int] = (), *, no_reply: bool = False) -> tuple[int, bytes]:
        """Encode a command; returns (msg_id, bytes). The fds go with it."""
        if self.state is State.CLOSED:
            raise ConnectionClosed("connection is closed")
        if command is Command.VERSION:
            raise LocalProtocolError("use start_version()")
        if self.state is not State.READY:
            raise LocalProtocolError(f"{command.name} before VERSION negotiation")
        if (self.role is Role.SERVER) != (command in wire.SERVER_TO_CLIENT):
            raise LocalProtocolError(f"a {self.role.value} may not send {command.name}")
        neg = self.negotiated
        assert neg is not None
        if len(fds) > neg.peer_max_msg_fds:
            raise LocalProtocolError(f"{len(fds)} fds exceed the peer's max_msg_fds")
        body = payload if isinstance(payload, bytes) else payload.encode()
        msg_id = self._alloc_id()
        if not no_reply:
            self._pending[msg_id] = command
        return msg_id, _pack_header(msg_id, command, HEADER_SIZE + len(body),
                                    _NO_REPLY if no_reply else 0, 0) + body

    def start_version(self, capabilities: Capabilities | None = None,
                      minor: int = VERSION_MINOR) -> bytes:
        """Client: the VERSION command that opens the connection."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends VERSION")
        self._transition("send VERSION")
        self._proposed = Version(VERSION_MAJOR, minor, capabilities or self.our_caps)
        self.our_caps = self._proposed.capabilities
        msg_id = self._alloc_id()
        self._pending[msg_id] = Command.VERSION
        body = self._proposed.encode()
        return HEADER.pack(msg_id, Command.VERSION, HEADER_SIZE + len(body), 0, 0) + body

    def _accept_version_reply(self, reply: Version, nfds: int) -> None:
        proposed = self._proposed
        assert proposed is not None
        if reply.major != proposed.major:
            raise PeerProtocolError(f"server answered major {reply.major}")
        if reply.minor > proposed.minor:
            raise PeerProtocolError(f"server answered minor {reply.minor} above ours")
        caps = reply.capabilities
        ours = proposed.capabilities
        twin = bool(caps.twin_socket and caps.twin_socket.supported)
        if twin and not (ours.twin_socket and ours.twin_socket.supported):
            raise PeerProtocolError("server chose twin_socket we did not offer")
        if twin and (caps.twin_socket is None or caps.twin_socket.fd_index != 0 or nfds != 1):
            raise PeerProtocolError("twin_socket reply without its fd")
        if not twin and nfds:
            raise PeerProtocolError("VERSION reply carries an fd without twin_socket")
        if caps.write_multiple and not ours.write_multiple:
            raise PeerProtocolError("server chose write_multiple we did not offer")
        self.negotiated = _negotiated(reply, caps, ours, twin)
        self._transition("VERSION reply")

    def accept_version(self, request: Request, *, twin_socket: bool = False) -> Version:
        """Server: check a VERSION request and return the reply payload.

        ``twin_socket`` says whether we will pass a socket (as fd 0 of the
        reply) if the client offered one. Raises a fatal PeerProtocolError
        for a major version we do not speak; the caller sends the error
        reply and closes.
        """
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a server accepts VERSION")
        ver = request.payload
        assert isinstance(ver, Version)
        if ver.major != VERSION_MAJOR:
            raise PeerProtocolError(f"unsupported major version {ver.major}", errno.ENOTSUP,
                                    fatal=True)
        theirs = ver.capabilities
        twin = twin_socket and bool(theirs.twin_socket and theirs.twin_socket.supported)
        ours = self.our_caps
        reply_caps = Capabilities(
            max_msg_fds=ours.max_msg_fds,
            max_data_xfer_size=ours.max_data_xfer_size,
            max_dma_maps=min(ours.max_dma_maps, theirs.max_dma_maps),
            pgsizes=ours.pgsizes & theirs.pgsizes or ours.pgsizes,
            twin_socket=wire.TwinSocket(True, 0) if twin else None,
            write_multiple=ours.write_multiple and theirs.write_multiple,
            migration=ours.migration if theirs.migration is not None else None,
            extensions={k: v for k, v in ours.extensions.items() if k in theirs.extensions},
        )
        reply = Version(VERSION_MAJOR, min(ver.minor, VERSION_MINOR), reply_caps)
        self.negotiated = _negotiated(reply, theirs, reply_caps, twin)
        self._transition("VERSION accepted")
        return reply

    def send_reply(self, request: Request, payload: Payload | bytes = b"",
                   fds: Sequence[int] = ()) -> bytes:
        """Encode the reply to a peer's command."""
        if self.state is State.CLOSED:
            raise ConnectionClosed("connection is closed")
        if fds:
            limit = _reply_fd_limit(request.command)
            neg = self.negotiated
            peer_fds = neg.peer_max_msg_fds if neg else wire.DEFAULT_MAX_MSG_FDS
            if len(fds) > min(limit, peer_fds):
                raise LocalProtocolError(f"{request.command.name} reply with {len(fds)} fds")
        body = payload if isinstance(payload, bytes) else payload.encode()
        return _pack_header(request.msg_id, request.command, HEADER_SIZE + len(body),
                            _REPLY, 0) + body

    def twin(self) -> Connection:
        """A connection for the twin socket: same role and negotiated
        parameters, its own message ids and buffer."""
        if self.negotiated is None or not self.negotiated.twin_socket:
            raise LocalProtocolError("no twin socket was negotiated")
        other = Connection(self.role, self.our_caps, max_message_size=self._max_message)
        other.negotiated = self.negotiated
        other.state = State.READY
        return other

    @staticmethod
    def send_error(msg_id: int, command: int, err: int) -> bytes:
        """Encode an error reply (header only, as the spec says)."""
        if not 0 < err < 4096:
            err = errno.EINVAL
        return HEADER.pack(msg_id, command & 0xFFFF, HEADER_SIZE,
                           HeaderFlags.REPLY | HeaderFlags.ERROR, err)


def _negotiated(reply: Version, peer: Capabilities, ours: Capabilities,
                twin: bool) -> Negotiated:
    mig = reply.capabilities.migration
    return Negotiated(
        major=reply.major,
        minor=reply.minor,
        peer_max_msg_fds=peer.max_msg_fds,
        peer_max_data_xfer_size=peer.max_data_xfer_size,
        max_dma_maps=reply.capabilities.max_dma_maps,
        pgsizes=reply.capabilities.pgsizes,
        twin_socket=twin,
        write_multiple=bool(reply.capabilities.write_multiple and ours.write_multiple),
        migration_pgsize=mig.get("pgsize") if mig else None,
        extensions=dict(reply.capabilities.extensions),
    )
