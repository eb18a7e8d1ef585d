"""Server checks: device, region and interrupt information, region access."""

from __future__ import annotations

import struct

from .. import wire
from ..errors import PeerProtocolError
from ..wire import Command, RegionFlags
from .context import Ctx, errname
from .model import CheckFailed, Level, NotApplicable
from .registry import (
    SERVER,
    access,
    dev_info,
    irq_info,
    region_info,
)

MUST, SHOULD = Level.MUST, Level.SHOULD


def _decode(cls: type[wire.Payload], payload: bytes, what: str) -> wire.Payload:
    try:
        return cls.decode(payload)
    except PeerProtocolError as exc:
        raise CheckFailed(f"{what} does not parse: {exc}") from None

# -- device info --------------------------------------------------------------------


@SERVER("info.device", "DEVICE_GET_INFO: argsz, PCI flag, at least the 9 PCI regions",
        "VFIO_USER_DEVICE_GET_INFO", MUST, "info")
def info_device(ctx: Ctx) -> None:
    s = ctx.open()
    msg = s.ok(Command.DEVICE_GET_INFO, dev_info())
    if len(msg.payload) != 16:
        raise CheckFailed(f"reply payload of {len(msg.payload)} bytes, expected 16")
    info = _decode(wire.DeviceInfo, msg.payload, "DEVICE_GET_INFO reply")
    assert isinstance(info, wire.DeviceInfo)
    if info.argsz != 16:
        raise CheckFailed(f"reply argsz {info.argsz}, the full reply is 16 bytes")
    if not info.flags & wire.DeviceInfoFlags.PCI:
        raise CheckFailed("VFIO_DEVICE_FLAGS_PCI is clear; only PCI devices are defined")
    if info.num_regions < wire.PCI_NUM_REGIONS:
        raise CheckFailed(f"num_regions {info.num_regions} below the 9 PCI region indexes")
    if info.flags & ~0x3:
        raise CheckFailed(f"unknown device flags {info.flags:#x}")


@SERVER("info.argsz-small", "an argsz below the reply size gets no more than it allows",
        "Message sizes", SHOULD, "info")
def info_argsz_small(ctx: Ctx) -> None:
    s = ctx.open()
    msg = s.call(Command.DEVICE_GET_INFO, dev_info(argsz=8))
    if msg.is_error:
        return  # refusing a too-small argsz is allowed
    if len(msg.payload) > 8:
        raise CheckFailed(f"argsz 8 allowed 8 bytes, the reply has {len(msg.payload)}")
    if len(msg.payload) >= 4 and struct.unpack_from("<I", msg.payload)[0] < 16:
        raise CheckFailed("the truncated reply does not say it needs argsz 16")


@SERVER("info.irq", "DEVICE_GET_IRQ_INFO: argsz 16, index echoed, known flags",
        "VFIO_USER_DEVICE_GET_IRQ_INFO", MUST, "info")
def info_irq(ctx: Ctx) -> None:
    n = ctx.facts.info.num_irqs
    if n == 0:
        raise NotApplicable("the device has no interrupt types")
    s = ctx.open()
    for idx in range(min(n, 16)):
        msg = s.ok(Command.DEVICE_GET_IRQ_INFO, irq_info(idx), what=f"IRQ info {idx}")
        q = _decode(wire.IrqInfo, msg.payload, "DEVICE_GET_IRQ_INFO reply")
        assert isinstance(q, wire.IrqInfo)
        if q.argsz != 16 or q.index != idx or q.flags & ~0xF:
            raise CheckFailed(f"IRQ info {idx}: argsz {q.argsz} index {q.index} "
                              f"flags {q.flags:#x}")


@SERVER("info.irq-bad-index", "DEVICE_GET_IRQ_INFO of a missing index is refused",
        "VFIO_USER_DEVICE_GET_IRQ_INFO", SHOULD, "info")
def info_irq_bad(ctx: Ctx) -> None:
    n = ctx.facts.info.num_irqs
    s = ctx.open()
    s.refused(Command.DEVICE_GET_IRQ_INFO, irq_info(n + 3), what=f"IRQ info {n + 3}",
              close_ok=False)


# -- region info ----------------------------------------------------------------------


@SERVER("region.info", "DEVICE_GET_REGION_INFO: every region, with mmap fd and a sound "
        "capability chain", "VFIO_USER_DEVICE_GET_REGION_INFO", MUST, "region")
def region_info_all(ctx: Ctx) -> None:
    n = ctx.facts.info.num_regions
    s = ctx.open()
    for idx in range(min(n, 64)):
        msg = s.call(Command.DEVICE_GET_REGION_INFO, region_info(idx, 4096))
        nfds = len(msg.fds)
        msg.close_fds()
        if msg.is_error:
            if idx < wire.PCI_NUM_REGIONS:
                ctx.note(f"region {idx} refused with {errname(msg.error)} (absent region)")
                continue
            raise CheckFailed(f"region {idx} < num_regions refused: {errname(msg.error)}")
        r = _decode(wire.RegionInfo, msg.payload, f"region {idx} info")
        assert isinstance(r, wire.RegionInfo)
        if r.index != idx:
            raise CheckFailed(f"region {idx} reply says index {r.index}")
        if r.argsz != len(msg.payload):
            raise CheckFailed(f"region {idx}: argsz {r.argsz} but a {len(msg.payload)}-byte "
                              "reply (argsz 4096 was enough for all of it)")
        if r.flags & ~0xF:
            raise CheckFailed(f"region {idx}: unknown flags {r.flags:#x}")
        if r.flags & RegionFlags.MMAP and nfds != 1:
            raise CheckFailed(f"region {idx} is MMAP but the reply carries {nfds} fds")
        if not r.flags & RegionFlags.MMAP and nfds:
            raise CheckFailed(f"region {idx} is not MMAP but the reply carries {nfds} fds")
        if bool(r.flags & RegionFlags.CAPS) != bool(r.caps):
            raise CheckFailed(f"region {idx}: CAPS flag {bool(r.flags & RegionFlags.CAPS)} "
                              f"with {len(r.caps)} capabilities")
        for cap in r.caps:
            if isinstance(cap, wire.SparseMmapCap):
                for a in cap.areas:
                    if a.offset + a.size > r.size:
                        raise CheckFailed(f"region {idx}: sparse area {a.offset:#x}+"
                                          f"{a.size:#x} beyond the region")


@SERVER("region.argsz-two-step", "a too-small argsz gets the needed argsz and no more than "
        "was allowed; retrying with it gets everything", "Message sizes", MUST, "region")
def region_two_step(ctx: Ctx) -> None:
    facts = ctx.facts
    big = [i for i, r in facts.regions.items() if r.argsz > 32]
    if not big:
        raise NotApplicable("no region reply is larger than 32 bytes (no capabilities)")
    idx = big[0]
    s = ctx.open()
    msg = s.ok(Command.DEVICE_GET_REGION_INFO, region_info(idx, 32))
    nfds = len(msg.fds)
    msg.close_fds()
    r = _decode(wire.RegionInfo, msg.payload, "region info")
    assert isinstance(r, wire.RegionInfo)
    if len(msg.payload) > 32:
        raise CheckFailed(f"argsz 32 allowed 32 bytes, the reply has {len(msg.payload)}")
    if r.argsz <= 32:
        raise CheckFailed(f"region {idx} needs {facts.regions[idx].argsz} bytes but the "
                          f"truncated reply says argsz {r.argsz}")
    if nfds:
        ctx.note(f"the truncated reply passed {nfds} fds")
    msg = s.ok(Command.DEVICE_GET_REGION_INFO, region_info(idx, r.argsz))
    msg.close_fds()
    if len(msg.payload) != r.argsz:
        raise CheckFailed(f"retry with argsz {r.argsz} got {len(msg.payload)} bytes")


@SERVER("region.info-bad-index", "DEVICE_GET_REGION_INFO beyond num_regions is refused",
        "VFIO_USER_DEVICE_GET_REGION_INFO", SHOULD, "region")
def region_info_bad(ctx: Ctx) -> None:
    n = ctx.facts.info.num_regions
    s = ctx.open()
    s.refused(Command.DEVICE_GET_REGION_INFO, region_info(n), what=f"region info {n}",
              close_ok=False)


@SERVER("region.io-fds", "DEVICE_GET_REGION_IO_FDS: refused, or a consistent reply",
        "VFIO_USER_DEVICE_GET_REGION_IO_FDS", MUST, "region")
def region_io_fds(ctx: Ctx) -> None:
    idx, _ = ctx.facts.readable_region()
    s = ctx.open()
    msg = s.call(Command.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 4096, 0, idx, 0))
    nfds = len(msg.fds)
    msg.close_fds()
    if msg.is_error:
        raise NotApplicable(f"region {idx}: io fds not offered ({errname(msg.error)})")
    p = _decode(wire.RegionIoFds, msg.payload, "REGION_IO_FDS reply")
    assert isinstance(p, wire.RegionIoFds)
    if p.flags or p.index != idx:
        raise CheckFailed(f"reply flags {p.flags:#x} index {p.index}")
    if p.argsz != len(msg.payload):
        raise CheckFailed(f"argsz {p.argsz} but {len(msg.payload)} bytes")
    if p.count and not nfds:
        raise CheckFailed(f"{p.count} sub-regions and no fd")


# -- region access ------------------------------------------------------------------------


@SERVER("access.read", "REGION_READ echoes offset/region/count and returns count bytes",
        "VFIO_USER_REGION_READ", MUST, "access")
def access_read(ctx: Ctx) -> None:
    idx, r = ctx.facts.readable_region()
    s = ctx.open()
    for off, count in ((0, 4), (0, 1), (r.size - 2, 2), (0, 8)):
        msg = s.ok(Command.REGION_READ, access(idx, off, count),
                   what=f"REGION_READ {idx}:{off:#x}+{count}")
        want = wire.REGION_ACCESS.pack(off, idx, count)
        if msg.payload[:16] != want or len(msg.payload) != 16 + count:
            raise CheckFailed(f"REGION_READ {idx}:{off:#x}+{count} reply "
                              f"{msg.payload[:16].hex()} with {len(msg.payload) - 16} bytes")


@SERVER("access.write", "REGION_WRITE echoes offset/region/count without data",
        "VFIO_USER_REGION_WRITE", MUST, "access")
def access_write(ctx: Ctx) -> None:
    facts = ctx.facts
    s = ctx.open()
    for idx, r in sorted(facts.regions.items()):
        if r.flags & RegionFlags.WRITE and r.flags & RegionFlags.READ and r.size >= 4 \
                and idx != wire.PciRegion.CONFIG:
            break
    else:
        raise NotApplicable("no readable and writable BAR")
    # Write back what is there, so the device sees no change of state.
    got = s.call(Command.REGION_READ, access(idx, r.size - 4, 4))
    if got.is_error:
        raise NotApplicable(f"the device refuses a 4-byte read at the end of region {idx} "
                            f"({errname(got.error)}): its register layout is unknown to us")
    cur = got.payload[16:]
    msg = s.ok(Command.REGION_WRITE, access(idx, r.size - 4, 4, cur))
    if msg.payload != wire.REGION_ACCESS.pack(r.size - 4, idx, 4):
        raise CheckFailed(f"REGION_WRITE reply payload {msg.payload.hex()}")


@SERVER("access.out-of-bounds", "an access past the end of a region is refused",
        "Security Considerations", SHOULD, "access")
def access_oob(ctx: Ctx) -> None:
    idx, r = ctx.facts.readable_region()
    s = ctx.open()
    s.refused(Command.REGION_READ, access(idx, r.size - 2, 4),
              what=f"REGION_READ {idx}:{r.size - 2:#x}+4 (region size {r.size:#x})",
              close_ok=False)
    s.refused(Command.REGION_READ, access(idx, (1 << 64) - 2, 4),
              what="REGION_READ at offset 2^64-2 (wraps)", close_ok=False)


@SERVER("access.bad-region", "an access to a missing region is refused",
        "VFIO_USER_REGION_READ", SHOULD, "access")
def access_bad_region(ctx: Ctx) -> None:
    n = ctx.facts.info.num_regions
    s = ctx.open()
    s.refused(Command.REGION_READ, access(n + 1, 0, 4), what=f"REGION_READ of region {n + 1}",
              close_ok=False)


@SERVER("access.max-xfer", "a count above the server's max_data_xfer_size is refused",
        "Read and Write Operations", SHOULD, "access")
def access_max_xfer(ctx: Ctx) -> None:
    idx, _r = ctx.facts.readable_region()
    s = ctx.open()
    s.refused(Command.REGION_READ, access(idx, 0, s.max_xfer + 1),
              what=f"REGION_READ of {s.max_xfer + 1} bytes")


@SERVER("access.mappable", "REGION_READ/WRITE work on an mmap-able region too",
        "Read and Write Operations", MUST, "access")
def access_mappable(ctx: Ctx) -> None:
    facts = ctx.facts
    maps = [(i, r) for i, r in facts.regions.items()
            if r.flags & RegionFlags.MMAP and r.flags & RegionFlags.READ and r.size >= 4]
    if not maps:
        raise NotApplicable("no mmap-able readable region")
    idx, _r = maps[0]
    s = ctx.open()
    msg = s.ok(Command.REGION_READ, access(idx, 0, 4), what=f"REGION_READ of mappable {idx}")
    if len(msg.payload) != 20:
        raise CheckFailed(f"reply of {len(msg.payload)} bytes")
