"""Server checks: DMA map/unmap, interrupts, reset, REGION_WRITE_MULTI."""

from __future__ import annotations

import errno
import os
import select
import struct

from .. import wire
from ..errors import PeerProtocolError
from ..wire import Command, RegionFlags, SetIrqsFlags
from .context import DEFAULT_CAPS, Ctx, Session, memfd, owned_fds
from .model import CheckFailed, Level, NotApplicable
from .registry import (
    EVENTFD_TRIGGER,
    IOVA,
    NONE_TRIGGER,
    PAGE,
    SERVER,
    access,
    dev_info,
    dma_map,
    dma_unmap,
    set_irqs,
)

MUST, SHOULD = Level.MUST, Level.SHOULD


def _decode(cls: type[wire.Payload], payload: bytes, what: str) -> wire.Payload:
    try:
        return cls.decode(payload)
    except PeerProtocolError as exc:
        raise CheckFailed(f"{what} does not parse: {exc}") from None

# -- DMA ---------------------------------------------------------------------------------------


def _map(s: Session, iova: int, size: int, with_fd: bool = True) -> None:
    if with_fd:
        fd = memfd(size)
        with owned_fds(fd):
            s.ok(Command.DMA_MAP, dma_map(iova, size), fds=[fd], what="DMA_MAP with an fd")
    else:
        s.ok(Command.DMA_MAP, dma_map(iova, size), what="DMA_MAP without an fd")


@SERVER("dma.map-unmap", "DMA_MAP with an fd succeeds; DMA_UNMAP echoes the request",
        "VFIO_USER_DMA_UNMAP", MUST, "dma")
def dma_map_unmap(ctx: Ctx) -> None:
    s = ctx.open()
    _map(s, IOVA, PAGE * 4)
    body = dma_unmap(IOVA, PAGE * 4)
    msg = s.ok(Command.DMA_UNMAP, body)
    if msg.payload != body:
        raise CheckFailed(f"DMA_UNMAP reply payload {msg.payload.hex() or '(empty)'}, "
                          f"the spec says it echoes {body.hex()}")


@SERVER("dma.map-no-fd", "DMA_MAP without an fd (message-based DMA) succeeds",
        "VFIO_USER_DMA_MAP", MUST, "dma")
def dma_no_fd(ctx: Ctx) -> None:
    s = ctx.open()
    _map(s, IOVA, PAGE * 2, with_fd=False)
    s.ok(Command.DMA_UNMAP, dma_unmap(IOVA, PAGE * 2))


@SERVER("dma.remap-identical", "mapping the same range again fails with EEXIST",
        "VFIO_USER_DMA_MAP", MUST, "dma")
def dma_remap(ctx: Ctx) -> None:
    s = ctx.open()
    fd = memfd(PAGE * 4)
    with owned_fds(fd):
        s.ok(Command.DMA_MAP, dma_map(IOVA, PAGE * 4), fds=[fd], what="DMA_MAP with an fd")
        # The same file, offset, range and protection: identical in every way.
        s.refused(Command.DMA_MAP, dma_map(IOVA, PAGE * 4), fds=[fd],
                  what="an identical second DMA_MAP", errnos=[errno.EEXIST], close_ok=False)


@SERVER("dma.overlap", "a map overlapping an existing one fails with EEXIST",
        "VFIO_USER_DMA_MAP", MUST, "dma")
def dma_overlap(ctx: Ctx) -> None:
    s = ctx.open()
    _map(s, IOVA, PAGE * 4)
    fd = memfd(PAGE * 4)
    with owned_fds(fd):
        s.refused(Command.DMA_MAP, dma_map(IOVA + PAGE * 2, PAGE * 4), fds=[fd],
                  what="DMA_MAP overlapping the second half", errnos=[errno.EEXIST],
                  close_ok=False)


@SERVER("dma.unmap-inexact", "DMA_UNMAP of a range that is not exactly a mapping is refused",
        "VFIO_USER_DMA_UNMAP", MUST, "dma")
def dma_unmap_inexact(ctx: Ctx) -> None:
    s = ctx.open()
    _map(s, IOVA, PAGE * 4)
    s.refused(Command.DMA_UNMAP, dma_unmap(IOVA, PAGE * 2), what="DMA_UNMAP of half a mapping",
              close_ok=False)
    s.refused(Command.DMA_UNMAP, dma_unmap(IOVA + PAGE * 64, PAGE),
              what="DMA_UNMAP of a range never mapped", close_ok=False)


@SERVER("dma.unmap-all", "DMA_UNMAP with FLAG_ALL removes every mapping",
        "VFIO_USER_DMA_UNMAP", MUST, "dma")
def dma_unmap_all(ctx: Ctx) -> None:
    s = ctx.open()
    _map(s, IOVA, PAGE * 2)
    _map(s, IOVA + PAGE * 16, PAGE * 2)
    s.ok(Command.DMA_UNMAP, dma_unmap(0, 0, flags=wire.DmaUnmapFlags.ALL),
         what="DMA_UNMAP FLAG_ALL")
    s.refused(Command.DMA_UNMAP, dma_unmap(IOVA, PAGE * 2),
              what="DMA_UNMAP of a mapping FLAG_ALL should have removed", close_ok=False)


@SERVER("dma.unmap-all-args", "FLAG_ALL with a non-zero address or size is refused",
        "VFIO_USER_DMA_UNMAP", SHOULD, "dma")
def dma_unmap_all_args(ctx: Ctx) -> None:
    s = ctx.open()
    _map(s, IOVA, PAGE * 2)
    s.refused(Command.DMA_UNMAP, dma_unmap(IOVA, PAGE * 2, flags=wire.DmaUnmapFlags.ALL),
              what="FLAG_ALL with an address and size", close_ok=False)


@SERVER("dma.bad-argsz", "DMA_MAP whose argsz is not the request size is refused",
        "VFIO_USER_DMA_MAP", SHOULD, "dma")
def dma_bad_argsz(ctx: Ctx) -> None:
    s = ctx.open()
    s.refused(Command.DMA_MAP, dma_map(IOVA, PAGE, argsz=8), what="DMA_MAP with argsz 8")


@SERVER("dma.bad-flags", "DMA_MAP with undefined flag bits is refused",
        "VFIO_USER_DMA_MAP", SHOULD, "dma")
def dma_bad_flags(ctx: Ctx) -> None:
    s = ctx.open()
    fd = memfd(PAGE)
    with owned_fds(fd):
        s.refused(Command.DMA_MAP, dma_map(IOVA, PAGE, flags=0x80000003), fds=[fd],
                  what="DMA_MAP with flag bit 31")


# -- interrupts ------------------------------------------------------------------------------


@SERVER("irq.eventfd-trigger", "an eventfd is accepted and signalled when the client triggers "
        "the interrupt", "VFIO_USER_DEVICE_SET_IRQS", MUST, "irq")
def irq_trigger(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index()
    s = ctx.open()
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    with owned_fds(efd):
        s.ok(Command.DEVICE_SET_IRQS, set_irqs(EVENTFD_TRIGGER, idx, 0, 1), fds=[efd],
             what=f"SET_IRQS EVENTFD|TRIGGER index {idx}")
        s.ok(Command.DEVICE_SET_IRQS, set_irqs(NONE_TRIGGER, idx, 0, 1),
             what=f"SET_IRQS NONE|TRIGGER index {idx}")
        ready, _, _ = select.select([efd], [], [], ctx.timeout)
        if not ready or os.eventfd_read(efd) < 1:
            raise CheckFailed(f"index {idx} vector 0 triggered, its eventfd was not signalled")
        s.ok(Command.DEVICE_SET_IRQS, set_irqs(EVENTFD_TRIGGER, idx, 0, 1),
             what="de-assigning the eventfd (EVENTFD with no fds)")


@SERVER("irq.disable-all", "count 0 with DATA_NONE|TRIGGER disables the index",
        "VFIO_USER_DEVICE_SET_IRQS", MUST, "irq")
def irq_disable_all(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index()
    s = ctx.open()
    s.ok(Command.DEVICE_SET_IRQS, set_irqs(NONE_TRIGGER, idx, 0, 0),
         what=f"SET_IRQS disable-all on index {idx}")


@SERVER("irq.bool", "DATA_BOOL with TRIGGER is accepted", "VFIO_USER_DEVICE_SET_IRQS",
        SHOULD, "irq")
def irq_bool(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index()
    s = ctx.open()
    s.ok(Command.DEVICE_SET_IRQS,
         set_irqs(SetIrqsFlags.DATA_BOOL | SetIrqsFlags.ACTION_TRIGGER, idx, 0, 1, b"\0"),
         what="SET_IRQS BOOL|TRIGGER with a false bool")


@SERVER("irq.mask", "a MASKABLE index accepts MASK and UNMASK", "VFIO_USER_DEVICE_GET_IRQ_INFO",
        MUST, "irq")
def irq_mask(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index(flags=wire.IrqInfoFlags.MASKABLE)
    s = ctx.open()
    for action in (SetIrqsFlags.ACTION_MASK, SetIrqsFlags.ACTION_UNMASK):
        s.ok(Command.DEVICE_SET_IRQS, set_irqs(SetIrqsFlags.DATA_NONE | action, idx, 0, 1),
             what=f"SET_IRQS NONE|{action.name} on index {idx}")


@SERVER("irq.two-data-flags", "two data types (or two actions) at once are refused",
        "VFIO_USER_DEVICE_SET_IRQS", SHOULD, "irq")
def irq_two_flags(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index()
    s = ctx.open()
    s.refused(Command.DEVICE_SET_IRQS,
              set_irqs(SetIrqsFlags.DATA_NONE | SetIrqsFlags.DATA_BOOL
                       | SetIrqsFlags.ACTION_TRIGGER, idx, 0, 1, b"\1"),
              what="SET_IRQS with DATA_NONE|DATA_BOOL", close_ok=False)
    s.refused(Command.DEVICE_SET_IRQS,
              set_irqs(SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER
                       | SetIrqsFlags.ACTION_MASK, idx, 0, 1),
              what="SET_IRQS with TRIGGER|MASK", close_ok=False)


@SERVER("irq.out-of-range", "vectors beyond the index's count are refused",
        "VFIO_USER_DEVICE_SET_IRQS", SHOULD, "irq")
def irq_range(ctx: Ctx) -> None:
    idx, q = ctx.facts.irq_index()
    s = ctx.open()
    s.refused(Command.DEVICE_SET_IRQS, set_irqs(NONE_TRIGGER, idx, q.count, 1),
              what=f"SET_IRQS vector {q.count} of a {q.count}-vector index", close_ok=False)
    s.refused(Command.DEVICE_SET_IRQS, set_irqs(NONE_TRIGGER, ctx.facts.info.num_irqs + 2, 0, 1),
              what="SET_IRQS on a missing index", close_ok=False)


@SERVER("irq.bad-argsz", "SET_IRQS whose argsz is not the request size is refused",
        "VFIO_USER_DEVICE_SET_IRQS", SHOULD, "irq")
def irq_argsz(ctx: Ctx) -> None:
    idx, _q = ctx.facts.irq_index()
    s = ctx.open()
    s.refused(Command.DEVICE_SET_IRQS,
              set_irqs(SetIrqsFlags.DATA_BOOL | SetIrqsFlags.ACTION_TRIGGER, idx, 0, 1, b"\0",
                       argsz=4096), what="SET_IRQS with argsz 4096 for 21 bytes")


# -- reset and write-multiple --------------------------------------------------------------------


@SERVER("reset.reply", "DEVICE_RESET on a resettable device succeeds with an empty reply",
        "VFIO_USER_DEVICE_RESET", MUST, "reset")
def reset_reply(ctx: Ctx) -> None:
    if not ctx.facts.info.flags & wire.DeviceInfoFlags.RESET:
        raise NotApplicable("the device does not set VFIO_DEVICE_FLAGS_RESET")
    s = ctx.open()
    msg = s.ok(Command.DEVICE_RESET)
    if msg.payload:
        raise CheckFailed(f"DEVICE_RESET reply has {len(msg.payload)} payload bytes")
    s.ok(Command.DEVICE_GET_INFO, dev_info(), what="DEVICE_GET_INFO after reset")


@SERVER("write-multi.negotiated", "REGION_WRITE_MULTI works when write_multiple is agreed",
        "VFIO_USER_REGION_WRITE_MULTI", MUST, "write-multi")
def write_multi(ctx: Ctx) -> None:
    facts = ctx.facts
    s = ctx.open(wire.Capabilities(max_msg_fds=8, write_multiple=True))
    if not s.caps.write_multiple:
        raise NotApplicable("the server does not offer write_multiple")
    for idx, r in sorted(facts.regions.items()):
        if r.flags & RegionFlags.WRITE and r.flags & RegionFlags.READ and r.size >= 8 \
                and idx != wire.PciRegion.CONFIG:
            break
    else:
        raise NotApplicable("no readable and writable BAR")
    cur = s.ok(Command.REGION_READ, access(idx, r.size - 8, 8)).payload[16:]
    entries = (wire.WriteMultiEntry(r.size - 8, idx, 4, cur[:4]),
               wire.WriteMultiEntry(r.size - 4, idx, 4, cur[4:]))
    msg = s.ok(Command.REGION_WRITE_MULTI, wire.RegionWriteMulti(entries).encode())
    if msg.payload != struct.pack("<Q", 2):
        raise CheckFailed(f"REGION_WRITE_MULTI reply {msg.payload.hex()}, expected wr_cnt 2")


@SERVER("write-multi.not-negotiated", "REGION_WRITE_MULTI without write_multiple is refused",
        "VFIO_USER_REGION_WRITE_MULTI", SHOULD, "write-multi")
def write_multi_refused(ctx: Ctx) -> None:
    idx, _r = ctx.facts.readable_region()
    s = ctx.open(DEFAULT_CAPS)
    entry = wire.WriteMultiEntry(0, idx, 0, b"")
    s.refused(Command.REGION_WRITE_MULTI, wire.RegionWriteMulti((entry,)).encode(),
              what="REGION_WRITE_MULTI without write_multiple")
