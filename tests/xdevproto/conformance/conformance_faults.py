"""Deliberately broken servers: xdev's runtime with one fault injected.

Each :class:`Fault` breaks one rule; :data:`FAULT_FOR` names, for every
server check, a fault that the check must catch. The runtime is subclassed
(a session class that consults the fault before the normal path), never
edited.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from xdevproto import server as srv
from xdevproto import wire
from xdevproto.connection import Connection, InvalidMessage, Request
from xdevproto.errors import ConnectionClosed, DeviceError, VfioUserError
from xdevproto.server import DmaTable, Server, Session
from xdevproto.testdev import ARCS, TestDevice
from xdevproto.wire import Command, Feature, FeatureFlags, HeaderFlags, MigState

Out = tuple[wire.Payload | bytes, list[int]]
Handler = Callable[[Session, Request], Out]
Mangle = Callable[[bytes, list[int]], Iterable[tuple[bytes, list[int]]]]


@dataclass
class Fault:
    handlers: dict[Command, Handler] = field(default_factory=dict)
    mangle: Mangle | None = None
    accept_invalid: bool = False  # answer refused commands with success
    #: answer a refused command with this payload instead
    on_invalid: Callable[[InvalidMessage], bytes] | None = None
    ignore_no_reply: bool = False
    die_on_disconnect: bool = False  # stop serving after the first client
    leak_state: bool = False  # keep DMA maps and IRQ fds across clients
    access: Callable[..., bytes] | None = None  # replaces Session.access_region
    device: Callable[[], TestDevice] = TestDevice
    caps: wire.Capabilities = field(
        default_factory=lambda: wire.Capabilities(max_msg_fds=8, write_multiple=True))


class FaultySession(Session):
    def __init__(self, server: FaultyServer, sock: socket.socket) -> None:
        super().__init__(server, sock)
        self.fault = server.fault
        if self.fault.leak_state:
            self.dma = server.shared_dma
        if self.fault.mangle is not None:
            # Replies leave through the transport, register-access replies
            # through the session's own sendall: both are mangled.
            send, mangle = self.transport.send, self.fault.mangle

            def mangled(data: bytes, fds: Sequence[int] = ()) -> None:
                for d, f in mangle(bytes(data), list(fds)):
                    send(d, f)
            self.transport.send = mangled  # type: ignore[method-assign]
            self._sendall = mangled

    def _dispatch(self, ev: object) -> None:
        f = self.fault
        if isinstance(ev, InvalidMessage) and (f.accept_invalid or f.on_invalid):
            body = f.on_invalid(ev) if f.on_invalid else b""
            if not ev.no_reply:
                self._send(wire.encode_message(ev.msg_id, ev.command, HeaderFlags.REPLY, body))
            return
        if isinstance(ev, Request):
            if f.ignore_no_reply:
                ev.no_reply = False
            handler = f.handlers.get(ev.command)
            if handler is not None:
                try:
                    payload, fds = handler(self, ev)
                    # Encoded here, not by Connection.send_reply: a broken
                    # server does not check its own replies.
                    body = payload if isinstance(payload, bytes) else payload.encode()
                    out = wire.encode_message(ev.msg_id, ev.command, HeaderFlags.REPLY, body)
                except VfioUserError as exc:
                    out, fds = Connection.send_error(ev.msg_id, ev.command, exc.errno), []
                if not ev.no_reply:
                    self._send(out, fds)
                return
        super()._dispatch(ev)  # type: ignore[arg-type]

    def access_region(self, command: int, offset: int, region: int, count: int,
                      data: bytes) -> bytes:
        if self.fault.access is not None:
            return self.fault.access(self, command, offset, region, count, data)
        return super().access_region(command, offset, region, count, data)

    def _teardown(self) -> None:
        if self.fault.leak_state:
            self.attached = False
        if self.fault.die_on_disconnect:
            self.server.dead = True  # type: ignore[attr-defined]
        super()._teardown()


class FaultyServer(Server):
    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.device(), capabilities=fault.caps)
        self.fault = fault
        self.shared_dma = DmaTable(self.capabilities.max_dma_maps)
        self.dead = False

    def serve_connection(self, sock: socket.socket) -> None:
        if self.dead:
            # Broken for good after its first client: every later VERSION fails.
            srv_refuse(sock, errno.EIO)
            return
        session = FaultySession(self, sock)
        self.session = session
        try:
            session.run()
        finally:
            self.session = None


def srv_refuse(sock: socket.socket, err: int) -> None:
    try:
        sock.settimeout(2.0)
        head = sock.recv(wire.HEADER_SIZE, socket.MSG_PEEK)
        if len(head) == wire.HEADER_SIZE:
            msg_id, command = wire.HEADER.unpack(head)[:2]
            sock.sendall(Connection.send_error(msg_id, command, err))
    except OSError:
        pass
    finally:
        sock.close()


# -- helpers to build faults ----------------------------------------------------------


def wrap(command: Command, after: Callable[[Session, Request, Out], Out]) -> dict[Command, Handler]:
    """A handler that runs the real one, then changes its answer."""
    real = srv.HANDLERS[command]

    def handler(s: Session, req: Request) -> Out:
        return after(s, req, real(s, req))
    return {command: handler}


def before(command: Command, change: Callable[[Session, Request], Request | Out]
           ) -> dict[Command, Handler]:
    """A handler that changes the request (or answers it) before the real one."""
    real = srv.HANDLERS[command]

    def handler(s: Session, req: Request) -> Out:
        got = change(s, req)
        if isinstance(got, Request):
            return real(s, got)
        return got
    return {command: handler}


def replace_payload(req: Request, **kw: object) -> Request:
    return dataclasses.replace(req, payload=dataclasses.replace(req.payload, **kw))  # type: ignore[type-var]


def reply_mangle(command: int, change: Callable[[bytes], bytes]) -> Mangle:
    def mangle(data: bytes, fds: list[int]) -> Iterable[tuple[bytes, list[int]]]:
        hdr = wire.Header.decode(data)
        if hdr.command == command and hdr.is_reply:
            data = change(data)
        return [(data, fds)]
    return mangle


def set_size(data: bytes) -> bytes:
    return data[:4] + struct.pack("<I", len(data)) + data[8:]


def _hold_one_region_read() -> Mangle:
    held: list[tuple[bytes, list[int]]] = []

    def mangle(data: bytes, fds: list[int]) -> Iterable[tuple[bytes, list[int]]]:
        if wire.Header.decode(data).command == Command.REGION_READ and not held:
            held.append((data, fds))
            return []
        out = [(data, fds), *held]
        held.clear()
        return out
    return mangle


def _error_replies_with_payload(data: bytes, fds: list[int]) -> Iterable[tuple[bytes, list[int]]]:
    if wire.Header.decode(data).is_error:
        data = set_size(data + b"\0" * 4)
    return [(data, fds)]


def _version_minor(minor: int | None = None, major: int | None = None,
                   **caps: object) -> dict[Command, Handler]:
    def after(s: Session, req: Request, out: Out) -> Out:
        payload, fds = out
        assert isinstance(payload, wire.Version)
        payload = dataclasses.replace(
            payload, minor=payload.minor if minor is None else minor,
            major=payload.major if major is None else major,
            capabilities=dataclasses.replace(payload.capabilities, **caps))  # type: ignore[arg-type]
        return payload, fds
    return wrap(Command.VERSION, after)


def _version_any_major() -> dict[Command, Handler]:
    return before(Command.VERSION, lambda s, r: replace_payload(r, major=0))


def _version_needs(check: Callable[[wire.Capabilities], bool]) -> dict[Command, Handler]:
    def change(s: Session, req: Request) -> Request:
        assert isinstance(req.payload, wire.Version)
        if not check(req.payload.capabilities):
            raise ConnectionClosed("refusing this client's capabilities")
        return req
    return before(Command.VERSION, change)


def _no_fds(s: Session, req: Request, out: Out) -> Out:
    from xdevproto.connection import close_fds
    close_fds([])
    return out[0], []


def _full_region_info(s: Session, req: Request) -> Request:
    return replace_payload(req, argsz=4096)


def _region_info_any_index(s: Session, req: Request) -> Request | Out:
    assert isinstance(req.payload, wire.RegionInfo)
    if req.payload.index >= s.device.num_regions:
        return wire.RegionInfo(32, 0, req.payload.index, 0, 0, 0), []
    return req


def _region_info_fd_always(s: Session, req: Request) -> Out:
    """Region info with the fd whatever the client can receive."""
    assert isinstance(req.payload, wire.RegionInfo)
    idx = req.payload.index
    desc = s.region_desc(idx)
    info = wire.RegionInfo(0, desc.flags | (wire.RegionFlags.CAPS if desc.caps else 0), idx,
                           0, desc.size, desc.fd_offset, desc.caps)
    info = dataclasses.replace(info, argsz=info.encoded_size)
    return info, [desc.fd] if desc.fd is not None else []


def _io_fds_without_fd(s: Session, req: Request) -> Out:
    assert isinstance(req.payload, wire.RegionIoFds)
    entry = wire.IoFdEntry(0, 4, 0, 0, 0, 0)
    return wire.RegionIoFds(16 + 40, 0, req.payload.index, 1, (entry,)), []


def _irq_info(change: Callable[[wire.IrqInfo], wire.IrqInfo]) -> dict[Command, Handler]:
    def handler(s: Session, req: Request) -> Out:
        assert isinstance(req.payload, wire.IrqInfo)
        idx = req.payload.index
        desc = s.device.irq(idx) if idx < s.device.num_irqs else None
        info = wire.IrqInfo(16, desc.flags if desc else 0, idx, desc.count if desc else 0)
        return change(info), []
    return {Command.DEVICE_GET_IRQ_INFO: handler}


def _access_short(s: Session, command: int, offset: int, region: int, count: int,
                  data: bytes) -> bytes:
    out = Session.access_region(s, command, offset, region, count, data)
    return out[:-1] if command == Command.REGION_READ and out else out


def _access_write_echoes_data(s: Session, command: int, offset: int, region: int, count: int,
                              data: bytes) -> bytes:
    out = Session.access_region(s, command, offset, region, count, data)
    return data if command == Command.REGION_WRITE else out


def _access_unchecked(s: Session, command: int, offset: int, region: int, count: int,
                      data: bytes) -> bytes:
    return bytes(count) if command == Command.REGION_READ else b""


def _access_no_mmap_regions(s: Session, command: int, offset: int, region: int, count: int,
                            data: bytes) -> bytes:
    if s.region_desc(region).flags & wire.RegionFlags.MMAP:
        raise DeviceError("mmap-able: use mmap", errno.EINVAL)
    return Session.access_region(s, command, offset, region, count, data)


def _dma_map_lvu_style(s: Session, req: Request) -> Request | Out:
    """libvfio-user's rules: identical re-map succeeds, overlap is EINVAL."""
    p = req.payload
    assert isinstance(p, wire.DmaMap)
    for r in s.dma.regions:
        if (r.iova, r.size) == (p.address, p.size):
            return b"", []
        if p.address < r.iova + r.size and r.iova < p.address + p.size:
            raise DeviceError("overlap", errno.EINVAL)
    return req


def _dma_map_needs_fd(s: Session, req: Request) -> Request:
    if not req.fds:
        raise DeviceError("we only do fd-backed DMA", errno.EINVAL)
    return req


def _dma_unmap_lax(s: Session, req: Request) -> Out:
    p = req.payload
    assert isinstance(p, wire.DmaUnmap)
    if not p.flags & wire.DmaUnmapFlags.ALL:
        for r in list(s.dma.regions):
            if p.address < r.iova + r.size and r.iova < p.address + p.size:
                s.dma.regions.remove(r)
                s._unmap(r)
    return wire.DmaUnmap(24, p.flags, p.address, p.size), []


def _set_irqs_noop(s: Session, req: Request) -> Out:
    return b"", []


def _set_irqs_refuse(flag: int, count0: bool = False) -> dict[Command, Handler]:
    def change(s: Session, req: Request) -> Request:
        p = req.payload
        assert isinstance(p, wire.SetIrqs)
        if p.flags & flag and (not count0 or p.count == 0):
            raise DeviceError("not supported here", errno.EINVAL)
        return req
    return before(Command.DEVICE_SET_IRQS, change)


def _feature(change: Callable[[Session, Request, wire.DeviceFeature], Out | None]
             ) -> dict[Command, Handler]:
    real = srv.HANDLERS[Command.DEVICE_FEATURE]

    def handler(s: Session, req: Request) -> Out:
        assert isinstance(req.payload, wire.DeviceFeature)
        got = change(s, req, req.payload)
        return got if got is not None else real(s, req)
    return {Command.DEVICE_FEATURE: handler}


def _probe_adds_data(s: Session, req: Request, p: wire.DeviceFeature) -> Out | None:
    if p.flags & FeatureFlags.PROBE:
        return wire.DeviceFeature(p.argsz + 8, p.flags, p.data + bytes(8)), []
    return None


def _state_99_ok(s: Session, req: Request, p: wire.DeviceFeature) -> Out | None:
    if p.feature == Feature.MIG_DEVICE_STATE and p.flags & FeatureFlags.SET \
            and p.data[:4] == struct.pack("<I", 99):
        return wire.DeviceFeature(p.argsz, p.flags, p.data), []
    return None


def _unknown_feature_ok(s: Session, req: Request, p: wire.DeviceFeature) -> Out | None:
    if p.feature not in set(Feature):
        return wire.DeviceFeature(p.argsz, p.flags, p.data), []
    return None


def _get_ignores_argsz(s: Session, req: Request, p: wire.DeviceFeature) -> Out | None:
    if p.feature == Feature.MIGRATION and p.flags & FeatureFlags.GET:
        flags = wire.FeatMigration(int(s.device.migration_flags)).encode()
        return wire.DeviceFeature(16, p.flags, flags), []
    return None


def _report_any_page(s: Session, req: Request, p: wire.DeviceFeature) -> Out | None:
    if p.feature == Feature.DMA_LOGGING_REPORT and len(p.data) >= 24:
        page = struct.unpack_from("<Q", p.data, 16)[0]
        if page & (page - 1):
            return wire.DeviceFeature(p.argsz, p.flags, p.data[:24] + bytes(8)), []
    return None


def _mig_read_claims_more(s: Session, req: Request, out: Out) -> Out:
    payload, fds = out
    assert isinstance(payload, wire.MigData)
    return wire.MigData(payload.argsz, payload.size + 1, payload.data), fds


def _mig_read_any_state(s: Session, req: Request) -> Out:
    assert isinstance(req.payload, wire.MigData)
    return wire.MigData(8, 0, b""), []


# -- broken devices ---------------------------------------------------------------------------


class NoStopCopyDevice(TestDevice):
    migration_flags = wire.MigrationFlags.PRE_COPY


class StuckDevice(TestDevice):
    def set_mig_state(self, state: MigState) -> None:
        if state != MigState.STOP:
            super().set_mig_state(state)


class RefusesLoadDevice(TestDevice):
    def _load(self, blob: bytes) -> None:
        raise DeviceError("never loads", errno.EINVAL)


class DirectArcsOnly(TestDevice):
    def set_mig_state(self, state: MigState) -> None:
        if state != self.state and (self.state, state) not in ARCS:
            raise DeviceError("no such arc", errno.EINVAL)
        super().set_mig_state(state)


class NoPreCopyDevice(TestDevice):
    def set_mig_state(self, state: MigState) -> None:
        if state == MigState.PRE_COPY:
            raise DeviceError("no pre-copy after all", errno.EINVAL)
        super().set_mig_state(state)


class AnyArcDevice(TestDevice):
    def set_mig_state(self, state: MigState) -> None:
        if (self.state, state) == (MigState.STOP_COPY, MigState.PRE_COPY):
            self.state = state
            return
        super().set_mig_state(state)


class EntersErrorDevice(TestDevice):
    def set_mig_state(self, state: MigState) -> None:
        if state == MigState.ERROR:
            self.state = state
            return
        super().set_mig_state(state)


class NoisyBitmapDevice(TestDevice):
    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        return b"\xff" * len(super().dma_logging_report(iova, length, page_size))


class ReportsWithoutStartDevice(TestDevice):
    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        if self.dirty is None:
            self.dirty = {}
        return super().dma_logging_report(iova, length, page_size)


# -- the catalogue ------------------------------------------------------------------------------

FAULTS: dict[str, Fault] = {
    "accepts-invalid": Fault(accept_invalid=True),
    "dies-after-a-client": Fault(die_on_disconnect=True),
    "leaks-client-state": Fault(leak_state=True),
    "version-minor-too-high": Fault(handlers=_version_minor(minor=9)),
    "version-always-minor-2": Fault(handlers=_version_minor(minor=2)),
    "version-any-major": Fault(handlers=_version_any_major()),
    "version-grants-write-multiple": Fault(handlers=_version_minor(write_multiple=True)),
    "version-needs-json": Fault(handlers=_version_needs(lambda c: bool(c.present))),
    "version-refuses-unknown": Fault(handlers=_version_needs(lambda c: not c.extensions)),
    "version-bad-twin": Fault(handlers=_version_minor(twin_socket=wire.TwinSocket(True, 5))),
    "id-not-echoed": Fault(mangle=reply_mangle(
        Command.DEVICE_GET_INFO, lambda d: struct.pack("<H", (d[0] + 1) & 0xFF) + d[1:])),
    "error-reply-payload": Fault(mangle=_error_replies_with_payload),
    "ignores-no-reply": Fault(ignore_no_reply=True),
    "reorders-replies": Fault(mangle=_hold_one_region_read()),
    "not-pci": Fault(handlers=wrap(Command.DEVICE_GET_INFO, lambda s, r, o: (
        dataclasses.replace(o[0], flags=1), []))),  # type: ignore[type-var]
    "irq-info-wrong-index": Fault(handlers=_irq_info(
        lambda q: dataclasses.replace(q, index=q.index + 1))),
    "irq-info-any-index": Fault(handlers=_irq_info(lambda q: q)),
    "region-info-no-fd": Fault(handlers=wrap(Command.DEVICE_GET_REGION_INFO, _no_fds)),
    "region-info-ignores-argsz": Fault(handlers=before(Command.DEVICE_GET_REGION_INFO,
                                                       _full_region_info)),
    "region-info-any-index": Fault(handlers=before(Command.DEVICE_GET_REGION_INFO,
                                                   _region_info_any_index)),
    "io-fds-without-fd": Fault(handlers={Command.DEVICE_GET_REGION_IO_FDS: _io_fds_without_fd}),
    "short-reads": Fault(access=_access_short),
    "write-reply-with-data": Fault(access=_access_write_echoes_data),
    "unchecked-access": Fault(access=_access_unchecked),
    "no-messages-for-mmap": Fault(access=_access_no_mmap_regions),
    "unmap-reply-empty": Fault(handlers=wrap(Command.DMA_UNMAP, lambda s, r, o: (b"", []))),
    "dma-needs-fd": Fault(handlers=before(Command.DMA_MAP, _dma_map_needs_fd)),
    "dma-lvu-rules": Fault(handlers=before(Command.DMA_MAP, _dma_map_lvu_style)),
    "unmap-lax": Fault(handlers={Command.DMA_UNMAP: _dma_unmap_lax}),
    "set-irqs-noop": Fault(handlers={Command.DEVICE_SET_IRQS: _set_irqs_noop}),
    "no-disable-all": Fault(handlers=_set_irqs_refuse(wire.SetIrqsFlags.DATA_NONE, True)),
    "no-bool": Fault(handlers=_set_irqs_refuse(wire.SetIrqsFlags.DATA_BOOL)),
    "no-mask": Fault(handlers=_set_irqs_refuse(wire.SetIrqsFlags.ACTION_MASK)),
    "reset-with-payload": Fault(handlers=wrap(Command.DEVICE_RESET,
                                              lambda s, r, o: (b"\0" * 4, []))),
    "write-multi-miscounts": Fault(handlers=wrap(Command.REGION_WRITE_MULTI, lambda s, r, o: (
        wire.WriteMultiReply(1), []))),
    "probe-adds-data": Fault(handlers=_feature(_probe_adds_data)),
    "no-stop-copy": Fault(device=NoStopCopyDevice),
    "stuck-running": Fault(device=StuckDevice),
    "refuses-load": Fault(device=RefusesLoadDevice),
    "direct-arcs-only": Fault(device=DirectArcsOnly),
    "no-pre-copy": Fault(device=NoPreCopyDevice),
    "any-arc": Fault(device=AnyArcDevice),
    "enters-error": Fault(device=EntersErrorDevice),
    "state-99-ok": Fault(handlers=_feature(_state_99_ok)),
    "mig-read-claims-more": Fault(handlers=wrap(Command.MIG_DATA_READ, _mig_read_claims_more)),
    "mig-read-any-state": Fault(handlers={Command.MIG_DATA_READ: _mig_read_any_state}),
    "unknown-feature-ok": Fault(handlers=_feature(_unknown_feature_ok)),
    "noisy-bitmap": Fault(device=NoisyBitmapDevice),
    "reports-without-start": Fault(device=ReportsWithoutStartDevice),
    "report-any-page": Fault(handlers=_feature(_report_any_page)),
    "ignores-client-max-fds": Fault(handlers={Command.DEVICE_GET_REGION_INFO:
                                              _region_info_fd_always}),
    "info-ignores-argsz": Fault(on_invalid=lambda ev: wire.DeviceInfo(16, 3, 9, 5).encode()),
    "feature-ignores-argsz": Fault(handlers=_feature(_get_ignores_argsz)),
    # handled by the test with a monkeypatched refuse_busy
    "second-client-kills-first": Fault(),
}

#: for every server check, a fault it must detect
FAULT_FOR: dict[str, str] = {
    "version.reply": "version-minor-too-high",
    "version.minor-lower": "version-always-minor-2",
    "version.major-mismatch": "version-any-major",
    "version.caps-subset": "version-grants-write-multiple",
    "version.no-json": "version-needs-json",
    "version.bad-json": "accepts-invalid",
    "version.bad-cap-type": "accepts-invalid",
    "version.first": "accepts-invalid",
    "version.twice": "accepts-invalid",
    "version.twin-socket": "version-bad-twin",
    "version.unknown-cap": "version-refuses-unknown",
    "header.id-echo": "id-not-echoed",
    "header.error-reply": "error-reply-payload",
    "header.no-reply": "ignores-no-reply",
    "header.pipelining": "reorders-replies",
    "header.unknown-command": "accepts-invalid",
    "header.error-bit-command": "accepts-invalid",
    "header.server-command": "accepts-invalid",
    "info.device": "not-pci",
    "info.irq": "irq-info-wrong-index",
    "info.irq-bad-index": "irq-info-any-index",
    "region.info": "region-info-no-fd",
    "region.argsz-two-step": "region-info-ignores-argsz",
    "region.info-bad-index": "region-info-any-index",
    "region.io-fds": "io-fds-without-fd",
    "access.read": "short-reads",
    "access.write": "write-reply-with-data",
    "access.out-of-bounds": "unchecked-access",
    "access.bad-region": "unchecked-access",
    "access.max-xfer": "accepts-invalid",
    "access.mappable": "no-messages-for-mmap",
    "dma.map-unmap": "unmap-reply-empty",
    "dma.map-no-fd": "dma-needs-fd",
    "dma.remap-identical": "dma-lvu-rules",
    "dma.overlap": "dma-lvu-rules",
    "dma.unmap-inexact": "unmap-lax",
    "dma.unmap-all": "unmap-lax",
    "dma.unmap-all-args": "accepts-invalid",
    "dma.bad-argsz": "accepts-invalid",
    "dma.bad-flags": "accepts-invalid",
    "irq.eventfd-trigger": "set-irqs-noop",
    "irq.disable-all": "no-disable-all",
    "irq.bool": "no-bool",
    "irq.mask": "no-mask",
    "irq.two-data-flags": "accepts-invalid",
    "irq.out-of-range": "set-irqs-noop",
    "irq.bad-argsz": "accepts-invalid",
    "reset.reply": "reset-with-payload",
    "write-multi.negotiated": "write-multi-miscounts",
    "write-multi.not-negotiated": "accepts-invalid",
    "mig.probe": "probe-adds-data",
    "mig.flags": "no-stop-copy",
    "mig.stop-run": "stuck-running",
    "mig.save": "mig-read-claims-more",
    "mig.resume": "refuses-load",
    "mig.combined-arcs": "direct-arcs-only",
    "mig.precopy": "no-pre-copy",
    "mig.no-stopcopy-to-precopy": "any-arc",
    "mig.no-error-state": "enters-error",
    "mig.bad-state": "state-99-ok",
    "mig.data-outside-saving": "mig-read-any-state",
    "feature.unknown": "unknown-feature-ok",
    "feature.get-and-set": "accepts-invalid",
    "dirty.start-report-stop": "noisy-bitmap",
    "dirty.report-without-start": "reports-without-start",
    "dirty.bad-page-size": "report-any-page",
    "malformed.short-size": "dies-after-a-client",
    "malformed.oversized": "dies-after-a-client",
    "malformed.truncated": "accepts-invalid",
    "malformed.partial-then-close": "dies-after-a-client",
    "malformed.write-length": "accepts-invalid",
    "fds.unexpected": "dies-after-a-client",
    "fds.too-many": "dies-after-a-client",
    "fds.irq-count": "accepts-invalid",
    "fds.respects-client-max": "ignores-client-max-fds",
    "info.argsz-small": "info-ignores-argsz",
    "feature.argsz-small": "feature-ignores-argsz",
    "disconnect.reconnect": "leaks-client-state",
    "disconnect.irq-fds-closed": "leaks-client-state",
    "disconnect.second-client": "second-client-kills-first",
}


def kill_first_client(server: Server) -> Callable[[socket.socket, float], None]:
    """A refuse_busy that hangs up on the current client instead."""
    def refuse(sock: socket.socket, timeout: float = 2.0) -> None:
        session = server.session
        if session is not None:
            try:
                session.transport.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        sock.close()
    return refuse


