"""Server checks: DEVICE_FEATURE, the migration v2 state machine, migration
data transfer and DMA dirty logging. Devices that do not offer the
MIGRATION feature get "not applicable"."""

from __future__ import annotations

import struct

from .. import wire
from ..wire import Command, Feature, FeatureFlags, MigState
from .context import Ctx, Session, memfd, owned_fds
from .model import CheckFailed, Level, NotApplicable
from .registry import IOVA, PAGE, SERVER, dma_map, feature, mig_state

MUST, SHOULD = Level.MUST, Level.SHOULD
GET, SET, PROBE = FeatureFlags.GET, FeatureFlags.SET, FeatureFlags.PROBE
STATE = Feature.MIG_DEVICE_STATE


def get_state(s: Session) -> int:
    msg = s.ok(Command.DEVICE_FEATURE, feature(STATE | GET, room=8), what="GET MIG_DEVICE_STATE")
    if len(msg.payload) < 16:
        raise CheckFailed(f"GET MIG_DEVICE_STATE reply of {len(msg.payload)} bytes")
    return int(struct.unpack_from("<I", msg.payload, 8)[0])


def set_state(s: Session, state: MigState) -> None:
    msg = s.ok(Command.DEVICE_FEATURE, feature(STATE | SET, mig_state(state)),
               what=f"SET MIG_DEVICE_STATE {state.name}")
    del msg
    now = get_state(s)
    if now != state:
        raise CheckFailed(f"after SET {state.name} the device reports state {now}")


def read_all(s: Session, limit: int = 64 << 20) -> bytes:
    out = bytearray()
    size = min(s.max_xfer, 65536)
    while len(out) < limit:
        msg = s.ok(Command.MIG_DATA_READ, struct.pack("<II", 8 + size, size),
                   what="MIG_DATA_READ")
        if len(msg.payload) < 8:
            raise CheckFailed(f"MIG_DATA_READ reply of {len(msg.payload)} bytes")
        _argsz, got = struct.unpack_from("<II", msg.payload)
        if got > size or len(msg.payload) < 8 + got:
            raise CheckFailed(f"MIG_DATA_READ of {size} returned size {got} with "
                              f"{len(msg.payload) - 8} data bytes")
        out += msg.payload[8:8 + got]
        if got < size:
            return bytes(out)
    raise CheckFailed(f"migration data did not end within {limit} bytes")


def _running(ctx: Ctx) -> Session:
    ctx.migration()
    s = ctx.open()
    if get_state(s) != MigState.RUNNING:
        ctx.note("device not RUNNING at the start: resetting it")
        s.ok(Command.DEVICE_RESET)
        set_state(s, MigState.RUNNING)
    return s


@SERVER("mig.probe", "PROBE of MIGRATION echoes the request", "VFIO_USER_DEVICE_FEATURE",
        MUST, "migration")
def mig_probe(ctx: Ctx) -> None:
    ctx.migration()
    s = ctx.open()
    body = feature(Feature.MIGRATION | PROBE | GET)
    msg = s.ok(Command.DEVICE_FEATURE, body, what="PROBE|GET MIGRATION")
    if msg.payload != body:
        raise CheckFailed(f"PROBE reply {msg.payload.hex()}, expected the request {body.hex()}")


@SERVER("mig.flags", "GET MIGRATION returns 8 bytes of flags including STOP_COPY",
        "VFIO_DEVICE_FEATURE_MIGRATION", MUST, "migration")
def mig_flags(ctx: Ctx) -> None:
    ctx.migration()
    s = ctx.open()
    msg = s.ok(Command.DEVICE_FEATURE, feature(Feature.MIGRATION | GET, room=8))
    argsz = struct.unpack_from("<I", msg.payload)[0]
    if len(msg.payload) != 16 or argsz != 16:
        raise CheckFailed(f"reply of {len(msg.payload)} bytes with argsz {argsz}, expected 16")
    flags = struct.unpack_from("<Q", msg.payload, 8)[0]
    if not flags & wire.MigrationFlags.STOP_COPY:
        raise CheckFailed(f"flags {flags:#x} lack VFIO_MIGRATION_STOP_COPY")


@SERVER("feature.argsz-small", "GET with no room for the data gets no more than argsz allows",
        "Message sizes", SHOULD, "migration")
def feature_argsz_small(ctx: Ctx) -> None:
    ctx.migration()
    s = ctx.open()
    msg = s.call(Command.DEVICE_FEATURE, feature(Feature.MIGRATION | GET))
    if msg.is_error:
        return  # refusing a too-small argsz is allowed
    if len(msg.payload) > 8:
        raise CheckFailed(f"argsz 8 allowed 8 bytes, the reply has {len(msg.payload)}")


@SERVER("mig.stop-run", "RUNNING -> STOP -> RUNNING", "Direct State Transitions", MUST,
        "migration")
def mig_stop_run(ctx: Ctx) -> None:
    s = _running(ctx)
    set_state(s, MigState.STOP)
    set_state(s, MigState.RUNNING)


@SERVER("mig.save", "STOP -> STOP_COPY, the state reads out as a stream, back to RUNNING",
        "VFIO_USER_MIG_DATA_READ", MUST, "migration")
def mig_save(ctx: Ctx) -> None:
    s = _running(ctx)
    set_state(s, MigState.STOP)
    set_state(s, MigState.STOP_COPY)
    data = read_all(s)
    ctx.note(f"{len(data)} bytes of migration data")
    set_state(s, MigState.STOP)
    set_state(s, MigState.RUNNING)


@SERVER("mig.resume", "saved state loads through RESUMING", "VFIO_USER_MIG_DATA_WRITE", MUST,
        "migration")
def mig_resume(ctx: Ctx) -> None:
    s = _running(ctx)
    set_state(s, MigState.STOP)
    set_state(s, MigState.STOP_COPY)
    data = read_all(s)
    set_state(s, MigState.STOP)
    set_state(s, MigState.RESUMING)
    step = min(s.max_xfer, 65536)
    for pos in range(0, len(data), step):
        chunk = data[pos:pos + step]
        s.ok(Command.MIG_DATA_WRITE, struct.pack("<II", 8 + len(chunk), len(chunk)) + chunk,
             what="MIG_DATA_WRITE")
    set_state(s, MigState.STOP)
    set_state(s, MigState.RUNNING)


@SERVER("mig.combined-arcs", "RUNNING -> STOP_COPY and STOP_COPY -> RUNNING take the path "
        "through STOP", "Complex State Transitions", MUST, "migration")
def mig_combined(ctx: Ctx) -> None:
    s = _running(ctx)
    set_state(s, MigState.STOP_COPY)
    read_all(s)
    set_state(s, MigState.RUNNING)


@SERVER("mig.precopy", "RUNNING -> PRE_COPY -> STOP_COPY -> STOP -> RUNNING where offered",
        "Direct State Transitions", MUST, "migration")
def mig_precopy(ctx: Ctx) -> None:
    if not ctx.migration() & wire.MigrationFlags.PRE_COPY:
        raise NotApplicable("the device does not offer PRE_COPY")
    s = _running(ctx)
    set_state(s, MigState.PRE_COPY)
    read_all(s)
    set_state(s, MigState.STOP_COPY)
    read_all(s)
    set_state(s, MigState.STOP)
    set_state(s, MigState.RUNNING)


@SERVER("mig.no-stopcopy-to-precopy", "STOP_COPY -> PRE_COPY is refused",
        "Direct State Transitions", SHOULD, "migration")
def mig_forbidden(ctx: Ctx) -> None:
    s = _running(ctx)
    set_state(s, MigState.STOP_COPY)
    s.refused(Command.DEVICE_FEATURE, feature(STATE | SET, mig_state(MigState.PRE_COPY)),
              what="SET PRE_COPY from STOP_COPY", close_ok=False)
    set_state(s, MigState.RUNNING)


@SERVER("mig.no-error-state", "ERROR cannot be requested", "Direct State Transitions", MUST,
        "migration")
def mig_error_state(ctx: Ctx) -> None:
    s = _running(ctx)
    s.refused(Command.DEVICE_FEATURE, feature(STATE | SET, mig_state(MigState.ERROR)),
              what="SET ERROR", close_ok=False)
    if get_state(s) == MigState.ERROR:
        raise CheckFailed("the device entered ERROR when asked to")


@SERVER("mig.bad-state", "an undefined state number is refused",
        "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", SHOULD, "migration")
def mig_bad_state(ctx: Ctx) -> None:
    s = _running(ctx)
    s.refused(Command.DEVICE_FEATURE, feature(STATE | SET, mig_state(99)),
              what="SET state 99", close_ok=False)


@SERVER("mig.data-outside-saving", "MIG_DATA_READ outside PRE_COPY/STOP_COPY and MIG_DATA_WRITE "
        "outside RESUMING are refused", "VFIO_USER_MIG_DATA_READ", SHOULD, "migration")
def mig_data_outside(ctx: Ctx) -> None:
    s = _running(ctx)
    s.refused(Command.MIG_DATA_READ, struct.pack("<II", 8 + 64, 64),
              what="MIG_DATA_READ while RUNNING", close_ok=False)
    s.refused(Command.MIG_DATA_WRITE, struct.pack("<II", 8 + 4, 4) + b"junk",
              what="MIG_DATA_WRITE while RUNNING", close_ok=False)


@SERVER("feature.unknown", "an unknown feature index is refused", "VFIO_USER_DEVICE_FEATURE",
        SHOULD, "migration")
def feature_unknown(ctx: Ctx) -> None:
    s = ctx.open()
    s.refused(Command.DEVICE_FEATURE, feature(0x3FF | GET, room=64),
              what="GET of feature 1023", close_ok=False)


@SERVER("feature.get-and-set", "GET and SET together without PROBE are refused",
        "VFIO_USER_DEVICE_FEATURE", SHOULD, "migration")
def feature_get_set(ctx: Ctx) -> None:
    ctx.migration()
    s = ctx.open()
    s.refused(Command.DEVICE_FEATURE,
              feature(STATE | GET | SET, mig_state(MigState.RUNNING), room=8),
              what="GET|SET of MIG_DEVICE_STATE", close_ok=False)


# -- dirty logging ---------------------------------------------------------------------------


def _logging(ctx: Ctx) -> Session:
    if not ctx.facts.logging:
        raise NotApplicable("the device does not offer DMA_LOGGING_START")
    s = ctx.open()
    fd = memfd(PAGE * 16)
    with owned_fds(fd):
        s.ok(Command.DMA_MAP, dma_map(IOVA, PAGE * 16), fds=[fd])
    return s


def _report(iova: int, length: int, page: int) -> bytes:
    return struct.pack("<QQQ", iova, length, page)


@SERVER("dirty.start-report-stop", "DMA logging start echoes, report has the bitmap size and "
        "no bits outside the range, stop succeeds", "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT",
        MUST, "dirty")
def dirty_cycle(ctx: Ctx) -> None:
    s = _logging(ctx)
    start = struct.pack("<QII", PAGE, 0, 0)
    msg = s.ok(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | SET, start),
               what="DMA_LOGGING_START")
    if msg.payload[8:] != start:
        page = struct.unpack_from("<Q", msg.payload, 8)[0] if len(msg.payload) >= 16 else None
        if page is None or page == PAGE:
            raise CheckFailed(f"DMA_LOGGING_START reply data {msg.payload[8:].hex()}, "
                              f"expected the request's {start.hex()}")
    try:
        pages = 16
        req = _report(IOVA, pages * PAGE, PAGE)
        msg = s.ok(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_REPORT | GET, req, room=8),
                   what="DMA_LOGGING_REPORT")
        data = msg.payload[8:]
        if data[:24] != req or len(data) != 24 + 8:
            raise CheckFailed(f"report data {data.hex()}: expected the request and one u64 "
                              "of bitmap")
        bitmap = struct.unpack_from("<Q", data, 24)[0]
        if bitmap >> pages:
            raise CheckFailed(f"bitmap {bitmap:#x} has bits beyond the {pages} pages asked for")
    finally:
        s.call(Command.DEVICE_FEATURE,
               feature(Feature.DMA_LOGGING_STOP | SET, struct.pack("<QII", PAGE, 0, 0)))


@SERVER("dirty.report-without-start", "DMA_LOGGING_REPORT before START is refused",
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT", SHOULD, "dirty")
def dirty_without_start(ctx: Ctx) -> None:
    s = _logging(ctx)
    s.refused(Command.DEVICE_FEATURE,
              feature(Feature.DMA_LOGGING_REPORT | GET, _report(IOVA, 16 * PAGE, PAGE), room=8),
              what="DMA_LOGGING_REPORT without START", close_ok=False)


@SERVER("dirty.bad-page-size", "a report page size that is not a power of two is refused",
        "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT", SHOULD, "dirty")
def dirty_bad_page(ctx: Ctx) -> None:
    s = _logging(ctx)
    s.ok(Command.DEVICE_FEATURE, feature(Feature.DMA_LOGGING_START | SET,
                                         struct.pack("<QII", PAGE, 0, 0)))
    try:
        s.refused(Command.DEVICE_FEATURE,
                  feature(Feature.DMA_LOGGING_REPORT | GET, _report(IOVA, 16 * 3000, 3000),
                          room=8), what="report with page size 3000", close_ok=False)
    finally:
        s.call(Command.DEVICE_FEATURE,
               feature(Feature.DMA_LOGGING_STOP | SET, struct.pack("<QII", PAGE, 0, 0)))


