"""Server checks: malformed and oversized input, fd limits, disconnect and
reconnect. The server must refuse or drop what it cannot accept, and survive.

Sections refer to the vfio-user specification (QEMU docs/interop/vfio-user.rst).
"""

from __future__ import annotations

import os
import select
import struct

from .. import wire
from ..wire import Command
from .context import Ctx, errname, memfd, owned_fds
from .model import CheckFailed, Level, NotApplicable
from .rawpeer import PeerClosed, PeerTimeout, encode
from .registry import (
    EVENTFD_TRIGGER,
    IOVA,
    PAGE,
    SERVER,
    dev_info,
    dma_map,
    dma_unmap,
    set_irqs,
    version_body,
)
from .registry import region_info as region_info_body

MUST, SHOULD = Level.MUST, Level.SHOULD


# -- malformed and oversized -------------------------------------------------------


@SERVER("malformed.short-size", "msg_size below the header size: connection refused or closed, "
        "server survives", "Header", MUST, "malformed")
def malformed_short(ctx: Ctx) -> None:
    s = ctx.open()
    s.peer.send_raw(encode(0x71, Command.DEVICE_GET_INFO, dev_info(), msg_size=8))
    try:
        msg = s.peer.recv(ctx.timeout)
        if not msg.is_error:
            raise CheckFailed(f"msg_size 8 got {msg.describe()}")
    except (PeerClosed, PeerTimeout):
        pass
    s.close()
    ctx.alive("a message with msg_size 8")


@SERVER("malformed.oversized", "an enormous msg_size is refused without waiting for it",
        "Security Considerations", SHOULD, "malformed")
def malformed_huge(ctx: Ctx) -> None:
    s = ctx.open()
    s.peer.send_raw(encode(0x72, Command.REGION_WRITE, b"\0" * 16, msg_size=0x7FFFFFF0))
    try:
        msg = s.peer.recv(ctx.timeout)
        if not msg.is_error:
            raise CheckFailed(f"a 2 GiB message got {msg.describe()}")
    except PeerClosed:
        pass
    except PeerTimeout:
        raise CheckFailed("the server neither refused a 2 GiB msg_size nor closed the "
                          "connection (it waits for the bytes)") from None
    s.close()
    ctx.alive("a 2 GiB msg_size")


@SERVER("malformed.truncated", "a payload shorter than its command's structure is refused",
        "Message sizes", SHOULD, "malformed")
def malformed_truncated(ctx: Ctx) -> None:
    s = ctx.open()
    s.refused(Command.DEVICE_GET_REGION_INFO, b"\x20\0\0\0\0\0\0\0",
              what="an 8-byte DEVICE_GET_REGION_INFO")
    s.close()
    ctx.alive("a truncated payload")


@SERVER("malformed.partial-then-close", "a client vanishing mid-message does not hurt the server",
        "Socket Disconnection Behavior", SHOULD, "malformed")
def malformed_partial(ctx: Ctx) -> None:
    s = ctx.open()
    s.peer.send_raw(encode(0x73, Command.DEVICE_GET_INFO, dev_info())[:10])
    s.close()
    ctx.alive("a half-sent header")


@SERVER("malformed.write-length", "REGION_WRITE whose data length differs from count is refused",
        "VFIO_USER_REGION_WRITE", SHOULD, "malformed")
def malformed_write_len(ctx: Ctx) -> None:
    idx, _region = ctx.facts.readable_region()
    s = ctx.open()
    s.refused(Command.REGION_WRITE, wire.REGION_ACCESS.pack(0, idx, 8) + b"\0" * 4,
              what="REGION_WRITE count 8 with 4 data bytes")


# -- fd limits ------------------------------------------------------------------------


@SERVER("fds.unexpected", "fds on a command that takes none are refused or dropped, not leaked "
        "into a crash", "Header", SHOULD, "fds")
def fds_unexpected(ctx: Ctx) -> None:
    s = ctx.open()
    fd = memfd(PAGE)
    with owned_fds(fd):
        try:
            msg = s.call(Command.DEVICE_GET_INFO, dev_info(), fds=[fd])
            msg.close_fds()
        except PeerClosed:
            pass
    s.close()
    ctx.alive("DEVICE_GET_INFO carrying an fd")


@SERVER("fds.too-many", "more fds than a command may carry are refused, the server survives",
        "VFIO_USER_DMA_MAP", SHOULD, "fds")
def fds_too_many(ctx: Ctx) -> None:
    s = ctx.open()
    n = max(2, min(s.caps.max_msg_fds + 1, 60))
    fds = [memfd(PAGE) for _ in range(n)]
    with owned_fds(*fds):
        try:
            msg = s.call(Command.DMA_MAP, dma_map(IOVA, PAGE), fds=fds)
            if not msg.is_error:
                ctx.note(f"DMA_MAP with {n} fds accepted (extra fds ignored)")
                s.call(Command.DMA_UNMAP, dma_unmap(IOVA, PAGE))
        except PeerClosed:
            pass
    s.close()
    ctx.alive(f"DMA_MAP with {n} fds")


@SERVER("fds.respects-client-max", "a client that can receive no fds (max_msg_fds 0) gets "
        "none, and no region that would need one is MMAP", "VFIO_USER_VERSION", MUST, "fds")
def fds_client_max(ctx: Ctx) -> None:
    facts = ctx.facts
    mappable = [i for i, r in facts.regions.items() if r.flags & wire.RegionFlags.MMAP]
    if not mappable:
        raise NotApplicable("no mmap-able region: the server has no fd to send")
    s = ctx.open(wire.Capabilities(max_msg_fds=0))
    if s.version_reply is not None and s.version_reply.nfds:
        raise CheckFailed(f"the VERSION reply carried {s.version_reply.nfds} fds")
    for idx in mappable:
        msg = s.call(Command.DEVICE_GET_REGION_INFO, region_info_body(idx, 4096))
        nfds = msg.nfds
        msg.close_fds()
        if nfds:
            raise CheckFailed(f"region {idx} info carried {nfds} fds to a client whose "
                              "max_msg_fds is 0")
        if msg.is_error:
            raise CheckFailed(f"region {idx} info refused ({errname(msg.error)}) to a client "
                              "that cannot receive fds; it can still use REGION_READ/WRITE")
        if len(msg.payload) >= 8 and struct.unpack_from("<I", msg.payload, 4)[0] \
                & wire.RegionFlags.MMAP:
            raise CheckFailed(f"region {idx} is reported MMAP, which promises an fd the client "
                              "cannot receive")


@SERVER("fds.irq-count", "SET_IRQS with fewer eventfds than count is refused",
        "VFIO_USER_DEVICE_SET_IRQS", SHOULD, "fds")
def fds_irq_count(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index(min_count=2)
    s = ctx.open()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    with owned_fds(efd):
        s.refused(Command.DEVICE_SET_IRQS, set_irqs(EVENTFD_TRIGGER, idx, 0, 2), fds=[efd],
                  what="SET_IRQS count 2 with one eventfd")


# -- disconnect ----------------------------------------------------------------------------


@SERVER("disconnect.reconnect", "after a client disconnects, a new client is served and finds "
        "no DMA mapping left over", "Client Disconnection", SHOULD, "disconnect")
def disconnect_reconnect(ctx: Ctx) -> None:
    if ctx.target.fresh:
        raise NotApplicable("a fresh server runs for each check (--fresh-server)")
    s = ctx.open()
    fd = memfd(PAGE * 4)
    with owned_fds(fd):
        s.ok(Command.DMA_MAP, dma_map(IOVA, PAGE * 4), fds=[fd])
    s.close()
    ctx.end()
    starts = ctx.target.starts
    if ctx.target.observes_process:
        ctx.target.wait_exit(0.5)
    s = ctx.open()
    if ctx.target.starts != starts:
        raise NotApplicable("the server exits when its client disconnects (the spec "
                            "allows it: 'the server can automatically exit')")
    fd = memfd(PAGE * 4)
    with owned_fds(fd):
        msg = s.call(Command.DMA_MAP, dma_map(IOVA, PAGE * 4), fds=[fd])
    if msg.is_error:
        raise CheckFailed(f"mapping the old client's range again failed with "
                          f"{errname(msg.error)}: its mapping was not cleaned up")


@SERVER("disconnect.irq-fds-closed", "a departed client's interrupt fds are closed",
        "Client Disconnection", SHOULD, "disconnect")
def disconnect_irq_fds(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index()
    s = ctx.open()
    # A pipe's write end stands in for the eventfd: once every copy of it
    # is closed, the read end reports EOF, so we can see the server close it.
    r, w = os.pipe()
    try:
        msg = s.call(Command.DEVICE_SET_IRQS, set_irqs(EVENTFD_TRIGGER, idx, 0, 1), fds=[w])
        os.close(w)
        if msg.is_error:
            raise NotApplicable(f"the server refused a pipe as an eventfd "
                                f"({errname(msg.error)})")
        s.close()
        ready, _, _ = select.select([r], [], [], ctx.timeout)
        if not ready:
            raise CheckFailed("the interrupt fd was still open on the server "
                              f"{ctx.timeout}s after the client left")
        while os.read(r, 4096):
            ready, _, _ = select.select([r], [], [], ctx.timeout)
            if not ready:
                raise CheckFailed("the interrupt fd stayed open after the client left")
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


@SERVER("disconnect.second-client", "a second client does not disturb the first",
        "Socket", SHOULD, "disconnect")
def disconnect_second(ctx: Ctx) -> None:
    first = ctx.open()
    try:
        second = ctx.connect()
        second.peer.timeout = min(ctx.timeout, 1.0)
        try:
            msg = second.call(Command.VERSION, version_body())
            msg.close_fds()
            ctx.note(f"second client got {msg.describe()}")
        except (PeerClosed, PeerTimeout):
            pass
        second.close()
    except CheckFailed:
        ctx.note("second client could not connect")
    first.ok(Command.DEVICE_GET_INFO, dev_info(), what="first client's DEVICE_GET_INFO")
