"""Client checks: each judges the :class:`~.client_mode.Observation` of one
client run against the checking server."""

from __future__ import annotations

import struct

from .. import wire
from ..wire import Command, HeaderFlags, SetIrqsFlags
from .client_mode import (
    BAR2_SIZE,
    DMA_PATTERN,
    FIXED_REPLY,
    MAX_FDS,
    SPARSE,
    XFER,
    DmaProbe,
    Observation,
)
from .model import CheckFailed, Level, NotApplicable, Outcome, Result, Stopwatch
from .rawpeer import Msg
from .registry import CLIENT
from .runner import Report

MUST, SHOULD = Level.MUST, Level.SHOULD


def _commands(obs: Observation) -> list[Msg]:
    if not obs.connected:
        raise CheckFailed(obs.ended or "the client never connected")
    return obs.commands


@CLIENT("client.version-first", "the first message is VERSION", "VFIO_USER_VERSION", MUST,
        "version")
def version_first(obs: Observation) -> None:
    cmds = _commands(obs)
    if not cmds:
        raise CheckFailed("the client connected and sent nothing")
    if cmds[0].command != Command.VERSION or cmds[0].is_reply:
        raise CheckFailed(f"the first message is {cmds[0].describe()}")


@CLIENT("client.version-format", "VERSION proposes major 0 with well-formed, NUL-terminated "
        "JSON", "VFIO_USER_VERSION", MUST, "version")
def version_format(obs: Observation) -> None:
    versions = [m for m in _commands(obs) if m.command == Command.VERSION]
    if not versions:
        raise CheckFailed("the client never sent VERSION")
    if obs.version_error:
        raise CheckFailed(f"VERSION does not parse: {obs.version_error}")
    text = versions[0].payload[4:]
    if text and not text.endswith(b"\0"):
        raise CheckFailed("the VERSION JSON is not NUL-terminated")
    if obs.version is None or obs.version.major != 0:
        raise CheckFailed(f"VERSION proposes major {obs.version and obs.version.major}")
    if len(versions) > 1:
        raise CheckFailed(f"the client sent VERSION {len(versions)} times")


@CLIENT("client.headers", "commands are well-formed: Command type, no Error bit, error 0, "
        "client-to-server commands only", "Header", MUST, "header")
def headers(obs: Observation) -> None:
    for m in _commands(obs):
        if m.is_reply:
            continue
        if m.flags & ~(HeaderFlags.NO_REPLY) or m.error:
            raise CheckFailed(f"{m.describe()} has flags {m.flags:#x} error {m.error}")
        if m.command in (Command.DMA_READ, Command.DMA_WRITE):
            raise CheckFailed(f"the client sent {m.describe()}, a server-to-client command")


@CLIENT("client.max-msg-fds", "no message carries more fds than our max_msg_fds (1)",
        "VFIO_USER_VERSION", MUST, "fds")
def max_fds(obs: Observation) -> None:
    for m in _commands(obs):
        if m.nfds > MAX_FDS:
            raise CheckFailed(f"{m.describe()} carried {m.nfds} fds; we allow {MAX_FDS}")


@CLIENT("client.fds-where-allowed", "fds ride only on DMA_MAP and SET_IRQS with DATA_EVENTFD",
        "VFIO_USER_DMA_MAP, VFIO_USER_DEVICE_SET_IRQS", SHOULD, "fds")
def fds_allowed(obs: Observation) -> None:
    for m in _commands(obs):
        if not m.nfds:
            continue
        if m.command == Command.DMA_MAP:
            continue
        if m.command == Command.DEVICE_SET_IRQS and len(m.payload) >= 8 \
                and struct.unpack_from("<I", m.payload, 4)[0] & SetIrqsFlags.DATA_EVENTFD:
            continue
        raise CheckFailed(f"{m.describe()} carried {m.nfds} fds")


@CLIENT("client.max-xfer", "REGION_READ/WRITE counts stay within our max_data_xfer_size (4096)",
        "Read and Write Operations", MUST, "access")
def max_xfer(obs: Observation) -> None:
    accesses = [m for m in _commands(obs)
                if m.command in (Command.REGION_READ, Command.REGION_WRITE) and not m.is_reply]
    if not accesses:
        raise NotApplicable("the client made no region access")
    for m in accesses:
        if len(m.payload) >= 16 and wire.REGION_ACCESS.unpack_from(m.payload)[2] > XFER:
            raise CheckFailed(f"{m.describe()} has count "
                              f"{wire.REGION_ACCESS.unpack_from(m.payload)[2]} > {XFER}")


@CLIENT("client.access-format", "REGION_READ carries 16 bytes, REGION_WRITE 16 + count",
        "VFIO_USER_REGION_WRITE", MUST, "access")
def access_format(obs: Observation) -> None:
    accesses = [m for m in _commands(obs)
                if m.command in (Command.REGION_READ, Command.REGION_WRITE) and not m.is_reply]
    if not accesses:
        raise NotApplicable("the client made no region access")
    for m in accesses:
        count = wire.REGION_ACCESS.unpack_from(m.payload)[2] if len(m.payload) >= 16 else -1
        want = 16 + (count if m.command == Command.REGION_WRITE else 0)
        if count < 0 or len(m.payload) != want:
            raise CheckFailed(f"{m.describe()}: {len(m.payload)} payload bytes, expected {want}")


@CLIENT("client.no-write-multi", "no REGION_WRITE_MULTI unless write_multiple was agreed",
        "VFIO_USER_REGION_WRITE_MULTI", MUST, "access")
def no_write_multi(obs: Observation) -> None:
    for m in _commands(obs):
        if m.command == Command.REGION_WRITE_MULTI:
            raise CheckFailed("the client sent REGION_WRITE_MULTI; we never offered "
                              "write_multiple")


@CLIENT("client.argsz", "argsz of GET_INFO/IRQ_INFO/REGION_INFO covers the fixed reply",
        "Message sizes", SHOULD, "argsz")
def argsz_min(obs: Observation) -> None:
    asks = [m for m in _commands(obs) if m.command in FIXED_REPLY and not m.is_reply]
    if not asks:
        raise NotApplicable("the client asked for no device, region or IRQ info")
    for m in asks:
        argsz = struct.unpack_from("<I", m.payload)[0] if len(m.payload) >= 4 else 0
        if argsz < FIXED_REPLY[Command(m.command)]:
            raise CheckFailed(f"{m.describe()} with argsz {argsz}")


@CLIENT("client.region-info-two-step", "told a larger argsz is needed, the client asks again "
        "with it", "Message sizes", SHOULD, "argsz")
def two_step(obs: Observation) -> None:
    _commands(obs)
    need = wire.RegionInfo(0, 0, 2, 32, BAR2_SIZE, 0, (SPARSE,)).encoded_size
    asks = [argsz for idx, argsz in obs.region_info_asks if idx == 2]
    if not asks:
        raise NotApplicable("the client never asked for region 2 (mmap-able, with caps)")
    if not any(a >= need for a in asks):
        raise CheckFailed(f"region 2 needs argsz {need}; the client only asked with {asks}")


@CLIENT("client.dma-map-format", "DMA_MAP: argsz 32, known flags, offset 0 without an fd, "
        "at most one fd", "VFIO_USER_DMA_MAP", MUST, "dma")
def dma_map_format(obs: Observation) -> None:
    maps = [m for m in _commands(obs) if m.command == Command.DMA_MAP and not m.is_reply]
    if not maps:
        raise NotApplicable("the client mapped no memory")
    for m in maps:
        if len(m.payload) != 32:
            raise CheckFailed(f"{m.describe()}: payload of {len(m.payload)} bytes, not 32")
        argsz, flags, offset, _addr, size = struct.unpack("<IIQQQ", m.payload)
        if argsz != 32 or flags & ~3 or size == 0:
            raise CheckFailed(f"DMA_MAP argsz {argsz} flags {flags:#x} size {size:#x}")
        if offset and not m.nfds:
            raise CheckFailed(f"DMA_MAP offset {offset:#x} without an fd")


@CLIENT("client.set-irqs-format", "SET_IRQS: argsz is the request size, one data type, one "
        "action, 0 or count eventfds", "VFIO_USER_DEVICE_SET_IRQS", MUST, "irq")
def set_irqs_format(obs: Observation) -> None:
    sets = [m for m in _commands(obs) if m.command == Command.DEVICE_SET_IRQS and not m.is_reply]
    if not sets:
        raise NotApplicable("the client sent no SET_IRQS")
    for m in sets:
        if len(m.payload) < 20:
            raise CheckFailed(f"{m.describe()}: payload of {len(m.payload)} bytes")
        argsz, flags, _index, _start, count = struct.unpack_from("<IIIII", m.payload)
        data, action = flags & wire.SET_IRQS_DATA_MASK, flags & wire.SET_IRQS_ACTION_MASK
        if argsz != len(m.payload):
            raise CheckFailed(f"SET_IRQS argsz {argsz} for a {len(m.payload)}-byte request")
        if data.bit_count() != 1 or action.bit_count() != 1 or flags & ~0x3F:
            raise CheckFailed(f"SET_IRQS flags {flags:#x}")
        if data == SetIrqsFlags.DATA_EVENTFD and m.nfds not in (0, count):
            raise CheckFailed(f"SET_IRQS count {count} with {m.nfds} eventfds")
        if data == SetIrqsFlags.DATA_BOOL and len(m.payload) != 20 + count:
            raise CheckFailed(f"SET_IRQS DATA_BOOL count {count} with "
                              f"{len(m.payload) - 20} bools")


def _probes(obs: Observation) -> list[DmaProbe]:
    _commands(obs)
    if not obs.dma_probes:
        raise NotApplicable("the client sent no command after a DMA_MAP, so no server DMA "
                            "could be interleaved")
    return obs.dma_probes


@CLIENT("client.dma-write", "a DMA_WRITE arriving while the client waits for a reply is "
        "answered", "VFIO_USER_DMA_WRITE", MUST, "server-dma")
def dma_write(obs: Observation) -> None:
    for p in _probes(obs):
        r = p.write_reply
        if r is None:
            raise CheckFailed(p.problem or "no DMA_WRITE reply")
        if r.is_error:
            raise CheckFailed(f"the client refused DMA_WRITE to mapped {p.address:#x}: "
                              f"error {r.error}")
        if len(r.payload) not in (0, 12, 16):
            raise CheckFailed(f"DMA_WRITE reply of {len(r.payload)} bytes")


@CLIENT("client.dma-read", "a DMA_READ arriving while the client waits for a reply returns "
        "the memory (as just written)", "VFIO_USER_DMA_READ", MUST, "server-dma")
def dma_read(obs: Observation) -> None:
    for p in _probes(obs):
        r = p.read_reply
        if r is None:
            raise CheckFailed(p.problem or "no DMA_READ reply")
        if r.is_error:
            raise CheckFailed(f"the client refused DMA_READ of mapped {p.address:#x}: "
                              f"error {r.error}")
        n = len(DMA_PATTERN)
        if len(r.payload) < 16:
            raise CheckFailed(f"DMA_READ reply of {len(r.payload)} bytes")
        addr, count = struct.unpack_from("<QQ", r.payload)
        data = r.payload[16:]
        if addr != p.address or count > n or len(data) != count:
            raise CheckFailed(f"DMA_READ reply address {addr:#x} count {count} with "
                              f"{len(data)} bytes")
        if data != DMA_PATTERN[:count]:
            raise CheckFailed(f"DMA_READ returned {data.hex()}, we had written "
                              f"{DMA_PATTERN[:count].hex()}")
        if p.problem:
            raise CheckFailed(p.problem)


@CLIENT("client.error-reply", "after an error reply the client carries on", "Header", SHOULD,
        "errors")
def error_reply(obs: Observation) -> None:
    cmds = _commands(obs)
    if not obs.errors_sent:
        raise NotApplicable("the client asked for nothing we answer with an error "
                            "(region 8, BAR0 offset 0x20)")
    last = obs.errors_sent[-1]
    later = [m for m in cmds[last + 1:] if not m.is_reply]
    if not later and obs.exit_status not in (0, None):
        raise CheckFailed(f"the client stopped after our error reply (exit status "
                          f"{obs.exit_status})")


@CLIENT("client.completes", "the client finishes its run against a conforming server "
        "(exit status 0)", "Client/server interactions", SHOULD, "session")
def completes(obs: Observation) -> None:
    _commands(obs)
    if obs.exit_status is None:
        raise NotApplicable("the client was still running when the connection ended")
    if obs.exit_status != 0:
        raise CheckFailed(f"the client exited with status {obs.exit_status} "
                          f"({obs.ended}); its own output says why")


def run_client_checks(obs: Observation, target: str, peer: str | None = None) -> Report:
    from .divergences import divergence
    report = Report("client", target, peer)
    for check in CLIENT.checks:
        watch = Stopwatch()
        try:
            check.func(obs)
            outcome, message = Outcome.PASS, ""
        except NotApplicable as exc:
            outcome, message = Outcome.NA, str(exc)
        except CheckFailed as exc:
            outcome, message = Outcome.FAIL, str(exc)
        except Exception as exc:
            outcome, message = Outcome.ERROR, f"{type(exc).__name__}: {exc}"
        result = Result(check, outcome, message, seconds=watch.elapsed())
        if outcome is not Outcome.PASS:
            result.transcript = list(obs.transcript.items)
        why = divergence(peer, check.id, message) if outcome is Outcome.FAIL else ""
        if why:
            result.outcome, result.divergence = Outcome.DIVERGENCE, why
        report.results.append(result)
    return report
