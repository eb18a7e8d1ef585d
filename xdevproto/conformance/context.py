"""What a server check works with: sessions to the server under test, and
facts about the device learnt once per run (regions, interrupts, features).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .. import wire
from ..errors import PeerProtocolError
from ..wire import Command, Feature, FeatureFlags, HeaderFlags
from .model import CheckFailed, NotApplicable, Transcript
from .rawpeer import Msg, PeerClosed, RawPeer
from .target import ExecTarget, Target

#: What we propose in VERSION unless a check says otherwise: modest, and no
#: twin socket, so server commands (if any) arrive on the main socket.
DEFAULT_CAPS = wire.Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20)


def errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


class Session:
    """One connection to the server under test."""

    def __init__(self, ctx: Ctx, peer: RawPeer) -> None:
        self.ctx = ctx
        self.peer = peer
        self.caps = wire.Capabilities()
        self.version: wire.Version | None = None
        self.version_reply: Msg | None = None
        #: client memory the server may read with DMA_READ (address -> bytes)
        self.memory: dict[int, bytearray] = {}

    def negotiate(self, caps: wire.Capabilities = DEFAULT_CAPS, minor: int = 2) -> Msg:
        body = wire.Version(0, minor, caps).encode()
        reply = self.call(Command.VERSION, body)
        if reply.is_error:
            raise CheckFailed(f"VERSION refused with {errname(reply.error)}")
        try:
            self.version = wire.Version.decode(reply.payload)
        except PeerProtocolError as exc:
            raise CheckFailed(f"VERSION reply does not parse: {exc}") from None
        self.caps = self.version.capabilities
        self.version_reply = reply
        reply.close_fds()
        return reply

    @property
    def max_xfer(self) -> int:
        return self.caps.max_data_xfer_size

    def send(self, command: int, payload: bytes = b"", **kw: object) -> int:
        return self.peer.send(command, payload, **kw)  # type: ignore[arg-type]

    def reply_to(self, msg_id: int, command: int, timeout: float | None = None) -> Msg:
        """Wait for the reply to (msg_id, command), serving server commands."""
        while True:
            msg = self.peer.recv(timeout)
            if not msg.is_reply and msg.command in (Command.DMA_READ, Command.DMA_WRITE):
                self._serve(msg)
                continue
            if not msg.is_reply:
                raise CheckFailed(f"server sent {msg.describe()} where a reply was due")
            if msg.msg_id != msg_id or msg.command != command:
                raise CheckFailed(f"expected the reply to id {msg_id} command {command}, got "
                                  f"{msg.describe()}")
            return msg

    def _serve(self, msg: Msg) -> None:
        msg.close_fds()
        try:
            p = wire.DmaAccess.decode(msg.payload)
        except PeerProtocolError:
            self.peer.send(msg.command, msg_id=msg.msg_id,
                           flags=HeaderFlags.REPLY | HeaderFlags.ERROR, error=errno.EINVAL)
            return
        for base, mem in self.memory.items():
            if base <= p.address and p.address + p.count <= base + len(mem):
                off = p.address - base
                if msg.command == Command.DMA_READ:
                    data = bytes(mem[off:off + p.count])
                    self.peer.send(msg.command, wire.DmaAccess(p.address, p.count, data).encode(),
                                   msg_id=msg.msg_id, flags=HeaderFlags.REPLY)
                else:
                    mem[off:off + p.count] = p.data[:p.count]
                    self.peer.send(msg.command, wire.DmaAccess(p.address, p.count).encode(),
                                   msg_id=msg.msg_id, flags=HeaderFlags.REPLY)
                return
        self.peer.send(msg.command, msg_id=msg.msg_id, flags=HeaderFlags.REPLY | HeaderFlags.ERROR,
                       error=errno.EFAULT)

    def call(self, command: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = 0) -> Msg:
        mid = self.peer.send(command, payload, fds=fds, flags=flags)
        return self.reply_to(mid, command)

    def ok(self, command: int, payload: bytes = b"", fds: Sequence[int] = (),
           what: str = "") -> Msg:
        msg = self.call(command, payload, fds)
        if msg.is_error:
            msg.close_fds()
            name = wire.COMMAND_BY_VALUE.get(command, command)
            raise CheckFailed(f"{what or getattr(name, 'name', name)} failed with "
                              f"{errname(msg.error)}")
        return msg

    def refused(self, command: int, payload: bytes = b"", fds: Sequence[int] = (),
                what: str = "", errnos: Iterable[int] | None = None,
                close_ok: bool = True, flags: int = 0) -> Msg | None:
        """Expect an error reply (or, if ``close_ok``, a closed connection).

        Returns the error reply, or None if the server hung up."""
        try:
            msg = self.call(command, payload, fds, flags)
        except PeerClosed:
            if close_ok:
                return None
            raise CheckFailed(f"{what}: server closed the connection instead of an "
                              "error reply") from None
        msg.close_fds()
        if not msg.is_error:
            raise CheckFailed(f"{what}: the server accepted it (success reply)")
        allowed = set(errnos or ())
        if allowed and msg.error not in allowed:
            want = "/".join(errname(e) for e in sorted(allowed))
            raise CheckFailed(f"{what}: error {errname(msg.error)}, the spec requires {want}")
        return msg

    def close(self) -> None:
        self.peer.close()


@dataclass
class Facts:
    """The device as the server describes it."""

    info: wire.DeviceInfo
    caps: wire.Capabilities
    regions: dict[int, wire.RegionInfo] = field(default_factory=dict)
    irqs: dict[int, wire.IrqInfo] = field(default_factory=dict)
    migration: int | None = None  # MIGRATION flags, None if not offered
    logging: bool = False

    def readable_region(self) -> tuple[int, wire.RegionInfo]:
        """Config space first: any PCI device must take 1-, 2- and 4-byte
        reads there, while BAR registers may refuse access sizes."""
        for idx, r in sorted(self.regions.items(), key=lambda kv: (kv[0] != 7, kv[0])):
            if r.flags & wire.RegionFlags.READ and r.size >= 8:
                return idx, r
        raise NotApplicable("the device has no readable region of 8 bytes or more")

    def irq_index(self, min_count: int = 1, flags: int = 0) -> tuple[int, wire.IrqInfo]:
        for idx, q in sorted(self.irqs.items()):
            if q.count >= min_count and q.flags & flags == flags \
                    and q.flags & wire.IrqInfoFlags.EVENTFD:
                return idx, q
        raise NotApplicable(f"no interrupt index with {min_count}+ eventfd vectors"
                            + (f" and flags {flags:#x}" if flags else ""))


class Ctx:
    """Runs checks' sessions against one target."""

    def __init__(self, target: Target, timeout: float = 2.0) -> None:
        self.target = target
        self.timeout = timeout
        self.transcript = Transcript()
        self.hung_up = False
        self.sessions: list[Session] = []
        self._facts: Facts | None = None
        self._facts_error: str | None = None

    # -- per check -----------------------------------------------------------
    def begin(self) -> None:
        self.transcript = Transcript()
        #: the server closed one of this check's connections
        self.hung_up = False

    def end(self) -> None:
        for s in self.sessions:
            self.hung_up |= s.peer.eof
            s.close()
        self.sessions = []

    def note(self, text: str) -> None:
        self.transcript.note(text)

    # -- sessions ------------------------------------------------------------
    def connect(self) -> Session:
        deadline = time.monotonic() + max(3.0, self.timeout)
        while True:
            self.target.ensure_up()
            try:
                peer = RawPeer.connect(self.target.path, self.transcript, self.timeout)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise CheckFailed(f"cannot connect to the server: {exc}") from None
                time.sleep(0.02)
        s = Session(self, peer)
        self.sessions.append(s)
        return s

    def first(self, command: int, body: bytes) -> tuple[Session, Msg | None]:
        """A new connection whose first message is (command, body); returns
        the reply, or None if the server hung up. EBUSY (the server still
        busy with the previous check's client) is retried."""
        deadline = time.monotonic() + max(3.0, self.timeout)
        hangups = 0
        while True:
            s = self.connect()
            try:
                msg = s.call(command, body)
            except PeerClosed:
                # Once may be the previous client's server still going away
                # (or re-arming its listener); twice is this server's answer.
                hangups += 1
                if hangups >= 2:
                    return s, None
                self.note("server hung up before answering: trying once more")
                s.close()
                if isinstance(self.target, ExecTarget):
                    self.target.wait_exit(0.1)
                else:
                    time.sleep(0.1)
                continue
            if not (msg.is_error and msg.error == errno.EBUSY) or time.monotonic() > deadline:
                return s, msg
            msg.close_fds()
            s.close()
            self.note("server busy (EBUSY): retrying")
            time.sleep(0.05)

    def open(self, caps: wire.Capabilities = DEFAULT_CAPS) -> Session:
        """A negotiated session. A server still busy with the previous
        check's client (EBUSY, or a hang-up while it exits) is retried."""
        deadline = time.monotonic() + max(3.0, self.timeout)
        while True:
            s = self.connect()
            try:
                s.negotiate(caps)
                return s
            except PeerClosed:
                s.close()
                if time.monotonic() > deadline:
                    raise
                if isinstance(self.target, ExecTarget):
                    self.target.wait_exit(0.5)
            except CheckFailed as exc:
                s.close()
                if "EBUSY" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def alive(self, what: str) -> None:
        """The server still answers a new client (a crash fails the check).

        With a fresh server per check only a crash can be seen: such servers
        may serve one client and then stop accepting."""
        for s in self.sessions:
            self.hung_up |= s.peer.eof
        crash = self.target.settle(self.hung_up)
        if crash:
            raise CheckFailed(f"after {what}: {crash}")
        if self.target.fresh:
            return
        self.note(f"checking the server still serves a new client after {what}")
        try:
            s = self.open()
            s.ok(Command.DEVICE_GET_INFO, wire.DeviceInfo(16, 0, 0, 0).encode())
        except CheckFailed as exc:
            raise CheckFailed(f"after {what}, the server no longer works: {exc}") from None
        finally:
            self.end()

    # -- device facts -----------------------------------------------------------
    @property
    def facts(self) -> Facts:
        if self._facts is None:
            if self._facts_error:
                raise CheckFailed(f"device discovery failed earlier: {self._facts_error}")
            self.note("discovering the device (DEVICE_GET_INFO, region, irq and feature info)")
            try:
                self._facts = self._discover()
            except CheckFailed as exc:
                self._facts_error = str(exc)
                raise
        return self._facts

    def _discover(self) -> Facts:
        s = self.open()
        try:
            return self._ask(s)
        finally:
            s.close()
            self.sessions.remove(s)
            if self.target.fresh:
                self.target.restart()

    def _ask(self, s: Session) -> Facts:
        reply = s.ok(Command.DEVICE_GET_INFO, wire.DeviceInfo(16, 0, 0, 0).encode())
        info = wire.DeviceInfo.decode(reply.payload)
        facts = Facts(info, s.caps)
        for idx in range(min(info.num_regions, 64)):
            r = s.call(Command.DEVICE_GET_REGION_INFO,
                       wire.RegionInfo(32, 0, idx, 0, 0, 0).encode())
            r.close_fds()
            if r.is_error:
                continue
            first = wire.RegionInfo.decode(r.payload)
            if first.argsz > 32 and first.argsz < 1 << 16:
                r = s.call(Command.DEVICE_GET_REGION_INFO,
                           wire.RegionInfo(first.argsz, 0, idx, 0, 0, 0).encode())
                r.close_fds()
                if r.is_error:
                    continue
            try:
                facts.regions[idx] = wire.RegionInfo.decode(r.payload)
            except PeerProtocolError:
                facts.regions[idx] = first
        for idx in range(min(info.num_irqs, 16)):
            q = s.call(Command.DEVICE_GET_IRQ_INFO, wire.IrqInfo(16, 0, idx, 0).encode())
            if not q.is_error:
                facts.irqs[idx] = wire.IrqInfo.decode(q.payload)
        mig = s.call(Command.DEVICE_FEATURE, wire.DeviceFeature(
            16, Feature.MIGRATION | FeatureFlags.GET).encode())
        if not mig.is_error and len(mig.payload) >= 16:
            facts.migration = wire.FeatMigration.decode(mig.payload[8:]).flags
        log = s.call(Command.DEVICE_FEATURE, wire.DeviceFeature(
            8, Feature.DMA_LOGGING_START | FeatureFlags.PROBE | FeatureFlags.SET).encode())
        facts.logging = not log.is_error
        return facts

    def migration(self) -> int:
        flags = self.facts.migration
        if flags is None:
            raise NotApplicable("the device does not offer the MIGRATION feature")
        return flags


def memfd(size: int, name: str = "xdev-conformance") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@contextlib.contextmanager
def owned_fds(*fds: int) -> Iterator[tuple[int, ...]]:
    try:
        yield fds
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
