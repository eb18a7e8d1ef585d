"""Server checks: version negotiation and the header (id echo, error
replies, No_reply, pipelining).

Sections refer to the vfio-user specification (QEMU docs/interop/vfio-user.rst).
"""

from __future__ import annotations

import os
import stat
import struct

from .. import wire
from ..errors import PeerProtocolError
from ..wire import Command, HeaderFlags
from .context import Ctx, Session, errname, owned_fds
from .model import CheckFailed, Level, NotApplicable
from .rawpeer import Msg, encode
from .registry import IOVA, SERVER, dev_info, version_body

MUST, SHOULD = Level.MUST, Level.SHOULD


def _first(ctx: Ctx, body: bytes) -> tuple[Session, Msg]:
    s, reply = ctx.first(Command.VERSION, body)
    if reply is None:
        raise CheckFailed("the server closed the connection instead of answering VERSION")
    return s, reply


def _decode_version(ctx: Ctx, payload: bytes) -> wire.Version:
    try:
        return wire.Version.decode(payload)
    except PeerProtocolError as exc:
        raise CheckFailed(f"VERSION reply does not parse: {exc}") from None


def _expect_refusal(reply: Msg | None, what: str) -> None:
    if reply is not None:
        reply.close_fds()
        if not reply.is_error:
            raise CheckFailed(f"{what}: the server accepted it (success reply)")

# -- version -----------------------------------------------------------------


@SERVER("version.reply", "VERSION reply: same major, minor not above ours, well-formed JSON",
        "VFIO_USER_VERSION", MUST, "version")
def version_reply(ctx: Ctx) -> None:
    _s, reply = _first(ctx, version_body())
    reply.close_fds()
    if reply.is_error:
        raise CheckFailed(f"VERSION 0.2 refused with {errname(reply.error)}")
    v = _decode_version(ctx, reply.payload)
    if v.major != 0 or v.minor > 2:
        raise CheckFailed(f"reply version {v.major}.{v.minor} for a proposed 0.2")
    text = reply.payload[4:]
    if text and not text.endswith(b"\0"):
        raise CheckFailed("the reply's JSON is not NUL-terminated")


@SERVER("version.minor-lower", "a lower proposed minor is accepted and not exceeded",
        "VFIO_USER_VERSION", MUST, "version")
def version_minor_lower(ctx: Ctx) -> None:
    _s, reply = _first(ctx, version_body(minor=0))
    reply.close_fds()
    if reply.is_error:
        raise CheckFailed(f"VERSION 0.0 refused with {errname(reply.error)}; every minor below "
                          "the highest supported must be supported")
    v = _decode_version(ctx, reply.payload)
    if v.major != 0 or v.minor != 0:
        raise CheckFailed(f"reply version {v.major}.{v.minor} for a proposed 0.0")


@SERVER("version.major-mismatch", "an unsupported major is refused, never answered as ours",
        "VFIO_USER_VERSION", MUST, "version")
def version_major(ctx: Ctx) -> None:
    _s, reply = ctx.first(Command.VERSION, version_body(major=0x7FFF))
    if reply is None:
        return
    reply.close_fds()
    if reply.is_error:
        return
    v = _decode_version(ctx, reply.payload)
    if v.major != 0x7FFF:
        raise CheckFailed(f"server answered major {v.major} to a proposed major 32767")


@SERVER("version.caps-subset", "the reply enables no capability we did not propose",
        "VFIO_USER_VERSION", MUST, "version")
def version_subset(ctx: Ctx) -> None:
    _s, reply = _first(ctx, version_body(text=b'{"capabilities":{}}\0'))
    nfds = len(reply.fds)
    reply.close_fds()
    if reply.is_error:
        raise CheckFailed(f"VERSION with no capabilities refused: {errname(reply.error)}")
    caps = _decode_version(ctx, reply.payload).capabilities
    if caps.twin_socket is not None and caps.twin_socket.supported:
        raise CheckFailed("the reply enables twin_socket, which we did not propose")
    if caps.write_multiple:
        raise CheckFailed("the reply enables write_multiple, which we did not propose")
    if nfds:
        raise CheckFailed(f"the reply passes {nfds} fds without a twin socket")


@SERVER("version.no-json", "VERSION without the optional JSON is accepted",
        "VFIO_USER_VERSION", SHOULD, "version")
def version_no_json(ctx: Ctx) -> None:
    s, reply = _first(ctx, version_body(text=b""))
    reply.close_fds()
    if reply.is_error:
        raise CheckFailed(f"VERSION without JSON refused with {errname(reply.error)}")
    s.ok(Command.DEVICE_GET_INFO, dev_info())


@SERVER("version.bad-json", "malformed VERSION JSON is refused and the server survives",
        "Security Considerations", SHOULD, "version")
def version_bad_json(ctx: Ctx) -> None:
    s, reply = ctx.first(Command.VERSION, version_body(text=b'{"capabilities": [1, \0'))
    _expect_refusal(reply, "VERSION with broken JSON")
    s.close()
    ctx.alive("malformed VERSION JSON")


@SERVER("version.bad-cap-type", "a capability of the wrong type is refused",
        "VFIO_USER_VERSION", SHOULD, "version")
def version_bad_cap(ctx: Ctx) -> None:
    s, reply = ctx.first(Command.VERSION,
                         version_body(text=b'{"capabilities":{"max_msg_fds":"many"}}\0'))
    _expect_refusal(reply, "VERSION with max_msg_fds as a string")
    s.close()
    ctx.alive("a mistyped capability")


@SERVER("version.first", "commands before VERSION are refused", "Connection Initiation",
        MUST, "version")
def version_first(ctx: Ctx) -> None:
    _s, reply = ctx.first(Command.DEVICE_GET_INFO, dev_info())
    _expect_refusal(reply, "DEVICE_GET_INFO before VERSION")


@SERVER("version.twice", "a second VERSION on a negotiated connection is refused",
        "VFIO_USER_VERSION", SHOULD, "version")
def version_twice(ctx: Ctx) -> None:
    s = ctx.open()
    s.refused(Command.VERSION, version_body(), what="a second VERSION")


@SERVER("version.twin-socket", "twin_socket, when granted, comes with fd_index and its socket",
        "VFIO_USER_VERSION", MUST, "version")
def version_twin(ctx: Ctx) -> None:
    _s, reply = _first(ctx, version_body(
        text=b'{"capabilities":{"max_msg_fds":8,"twin_socket":{"supported":true}}}\0'))
    fds = list(reply.fds)
    with owned_fds(*fds):
        if reply.is_error:
            raise CheckFailed(f"VERSION offering twin_socket refused: {errname(reply.error)}")
        twin = _decode_version(ctx, reply.payload).capabilities.twin_socket
        if twin is None or not twin.supported:
            if fds:
                raise CheckFailed("twin socket declined but the reply carries fds")
            raise NotApplicable("the server declined twin-socket mode (optional)")
        if twin.fd_index is None or not 0 <= twin.fd_index < len(fds):
            raise CheckFailed(f"twin_socket granted with fd_index {twin.fd_index} and "
                              f"{len(fds)} fds")
        if not stat.S_ISSOCK(os.fstat(fds[twin.fd_index]).st_mode):
            raise CheckFailed("the twin_socket fd is not a socket")


@SERVER("version.unknown-cap", "an unknown capability is ignored", "VFIO_USER_VERSION",
        SHOULD, "version")
def version_unknown(ctx: Ctx) -> None:
    _s, reply = _first(ctx, version_body(
        text=b'{"capabilities":{"max_msg_fds":8,"x-conformance-unknown":{"a":1}}}\0'))
    reply.close_fds()
    if reply.is_error:
        raise CheckFailed(f"VERSION with an unknown capability refused: {errname(reply.error)}")


# -- header --------------------------------------------------------------------


@SERVER("header.id-echo", "replies echo the message id and command, type Reply",
        "Header", MUST, "header")
def header_echo(ctx: Ctx) -> None:
    s = ctx.open()
    for mid in (0, 0xFFFF, 0x1234, 0x1234):
        s.peer.send(Command.DEVICE_GET_INFO, dev_info(), msg_id=mid)
        msg = s.peer.recv()
        if (msg.msg_id, msg.command) != (mid, Command.DEVICE_GET_INFO):
            raise CheckFailed(f"sent id {mid:#x} DEVICE_GET_INFO, got {msg.describe()}")
        if msg.flags & HeaderFlags.TYPE_MASK != wire.MSG_TYPE_REPLY:
            raise CheckFailed(f"reply type bits are {msg.flags & 0xF}, not 1 (Reply)")
        if msg.is_error or msg.error or msg.flags & HeaderFlags.NO_REPLY:
            raise CheckFailed(f"success reply with flags {msg.flags:#x} error {msg.error}")
        if msg.msg_size != 16 + len(msg.payload):
            raise CheckFailed("msg_size does not cover the message")


@SERVER("header.error-reply", "an error reply carries the Error bit, an errno and only the header",
        "Header", MUST, "header")
def header_error(ctx: Ctx) -> None:
    n = ctx.facts.info.num_regions
    s = ctx.open()
    msg = s.refused(Command.REGION_READ, wire.REGION_ACCESS.pack(0, n + 7, 4),
                     what=f"REGION_READ of region {n + 7}", close_ok=False)
    assert msg is not None
    if msg.msg_size != 16 or msg.payload:
        raise CheckFailed(f"the error reply carries {len(msg.payload)} payload bytes; "
                          "it must only include the header")
    if msg.error == 0:
        ctx.note("error field 0 (allowed: 'may be zero even if the Error bit is set')")


@SERVER("header.no-reply", "a command with No_reply gets no reply and is processed in order",
        "Command Concurrency", MUST, "header")
def header_no_reply(ctx: Ctx) -> None:
    s = ctx.open()
    s.peer.send(Command.DEVICE_GET_INFO, dev_info(), msg_id=0x51, flags=HeaderFlags.NO_REPLY)
    s.peer.send(Command.DEVICE_GET_INFO, dev_info(), msg_id=0x52)
    msg = s.peer.recv()
    if msg.msg_id != 0x52:
        raise CheckFailed(f"first reply is {msg.describe()}; the No_reply command got a reply")


@SERVER("header.pipelining", "pipelined commands are all answered, in order",
        "Command Concurrency", MUST, "header")
def header_pipeline(ctx: Ctx) -> None:
    idx, _region = ctx.facts.readable_region()
    s = ctx.open()
    ids = list(range(0x700, 0x708))
    batch = b""
    for i, mid in enumerate(ids):
        if i % 2:
            batch += encode(mid, Command.DEVICE_GET_INFO, dev_info())
        else:
            batch += encode(mid, Command.REGION_READ, wire.REGION_ACCESS.pack(0, idx, 4))
    s.peer.send_raw(batch)
    for i, mid in enumerate(ids):
        msg = s.peer.recv()
        want = Command.DEVICE_GET_INFO if i % 2 else Command.REGION_READ
        if (msg.msg_id, msg.command) != (mid, want):
            raise CheckFailed(f"reply {i} is {msg.describe()}, expected id {mid:#x} {want.name}")


@SERVER("header.unknown-command", "an unknown command gets an error reply", "Commands",
        SHOULD, "header")
def header_unknown(ctx: Ctx) -> None:
    s = ctx.open()
    for cmd in (14, 99, 0xFFFF):
        s.refused(cmd, b"\0" * 8, what=f"command {cmd}", close_ok=False)
    s.ok(Command.DEVICE_GET_INFO, dev_info(), what="DEVICE_GET_INFO after unknown commands")


@SERVER("header.error-bit-command", "a command with the Error bit or a Reply type is not executed",
        "Header", SHOULD, "header")
def header_bad_flags(ctx: Ctx) -> None:
    s = ctx.open()
    s.peer.send(Command.DEVICE_GET_INFO, dev_info(), msg_id=0x61, flags=HeaderFlags.ERROR,
                error=5)
    s.peer.send(Command.DEVICE_GET_INFO, dev_info(), msg_id=0x62)
    msg = s.peer.recv()
    if msg.msg_id == 0x61 and not msg.is_error:
        raise CheckFailed("a command carrying the Error bit was executed")
    s.close()
    ctx.alive("a command with the Error bit")


@SERVER("header.server-command", "a client sending DMA_READ (server-to-client) is refused",
        "Commands", SHOULD, "header")
def header_wrong_direction(ctx: Ctx) -> None:
    s = ctx.open()
    s.refused(Command.DMA_READ, struct.pack("<QQ", IOVA, 8), what="DMA_READ from the client")
