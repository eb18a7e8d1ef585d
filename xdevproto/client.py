"""The vfio-user client: drives a device server.

Calls are synchronous and made from one thread at a time (a lock enforces
it). Server commands (DMA_READ/DMA_WRITE) are answered from the client's
guest memory: when a twin socket was negotiated (we offer one) by a thread
that serves it; otherwise inline while a call waits for its reply, and, if
:meth:`Client.start_dma_service` was called, by a thread between calls.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import wire
from .connection import NEED_DATA, Connection, InvalidMessage, Reply, Request, Role, close_fds
from .errors import (
    ConnectionClosed,
    PeerProtocolError,
    RemoteError,
    VfioUserError,
)
from .guestmem import GuestMemory
from .transport import Transport, connect
from .wire import Command, Feature, FeatureFlags, SetIrqsFlags

log = logging.getLogger(__name__)

_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """A region as the server described it; ``fd`` (ours to close) when
    it can be mmap'ed."""

    index: int
    flags: int
    size: int
    offset: int
    caps: tuple[wire.RegionCap, ...]
    fd: int | None

    @property
    def sparse_areas(self) -> tuple[wire.SparseArea, ...]:
        for cap in self.caps:
            if isinstance(cap, wire.SparseMmapCap):
                return cap.areas
        return ()


class Client:
    """One connection to a vfio-user server."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        guest: GuestMemory | None = None,
        capabilities: wire.Capabilities | None = None,
        twin_socket: bool = True,
        guest_memory_offer: dict[str, Any] | None = None,
        ioreq_offer: dict[str, Any] | None = None,
    ) -> None:
        """``guest_memory_offer``: xdev extension, e.g. ``{"kind":
        "xen-foreign", "domid": 5}``: the server may map guest memory itself
        instead of sending DMA_READ/DMA_WRITE (see :attr:`direct_memory`).
        ``ioreq_offer``: xdev extension, e.g. ``{"kind": "xen", "domid":
        5}``: the server may serve the guest's BAR accesses itself (see
        :attr:`direct_ioreq`)."""
        self.transport = Transport(sock, max_recv_fds=wire.MAX_IO_FD_ENTRIES)
        # The register-access path's own handles on the socket and buffer.
        self._sendall, self._recv_into = sock.sendall, sock.recv_into
        self._rbuf, self._rview = self.transport.rbuf, self.transport.rview
        fds_ok = self.transport.passes_fds
        xdev: dict[str, Any] = {}
        if guest_memory_offer:
            xdev["guest_memory"] = guest_memory_offer
        if ioreq_offer:
            xdev["ioreq"] = ioreq_offer
        exts = {wire.XDEV_EXTENSION: xdev} if xdev else {}
        caps = capabilities or wire.Capabilities(
            max_msg_fds=8 if fds_ok else 0,
            twin_socket=wire.TwinSocket(True) if twin_socket and fds_ok else None,
            extensions=exts,
        )
        self.conn = Connection(Role.CLIENT, caps)
        self.guest = guest
        #: iova -> (size, readable, writable): what the server's DMA_READ/
        #: DMA_WRITE may reach ("DMA_READ": the range must be mapped)
        self._dma_maps: dict[int, tuple[int, bool, bool]] = {}
        self._lock = threading.Lock()
        self._twin: tuple[Transport, Connection] | None = None
        self._service: threading.Thread | None = None
        self._stop_r, self._stop_w = socket.socketpair()
        self.closed = False

    @classmethod
    def connect(cls, addr: str, *, timeout: float | None = 10.0,
                **kw: object) -> Client:
        """Connect to ``unix:PATH``/``PATH``/``tcp:HOST:PORT`` and negotiate."""
        client = cls(connect(addr, timeout), **kw)  # type: ignore[arg-type]
        try:
            client.negotiate()
        except BaseException:
            client.close()
            raise
        return client

    # -- plumbing -------------------------------------------------------------
    def negotiate(self) -> None:
        with self._lock:
            self.transport.send(self.conn.start_version())
            reply = self._await(None)
        if reply.error:
            raise RemoteError(Command.VERSION, reply.error)
        if self._accepted_memory() is not None and not self.direct_memory:
            close_fds(reply.fds)
            raise PeerProtocolError("server maps guest memory itself but does not "
                                    "drop its mappings on invalidation", fatal=True)
        if reply.fds:
            try:
                tsock = socket.socket(fileno=reply.fds[0])
            except OSError:  # the server passed something that is not a socket
                close_fds(reply.fds)
                raise PeerProtocolError("twin socket fd is not a socket", fatal=True) from None
            if tsock.family != socket.AF_UNIX or tsock.type != socket.SOCK_STREAM:
                tsock.close()
                raise PeerProtocolError("twin socket is not an AF_UNIX stream", fatal=True)
            self._twin = (Transport(tsock, max_recv_fds=0), self.conn.twin())
            # Server commands now come only on the twin socket: a thread
            # blocked on it costs the main socket's round trips nothing.
            self.start_dma_service()

    def _accepted(self, key: str) -> Any:
        neg = self.conn.negotiated
        ext = neg.extensions.get(wire.XDEV_EXTENSION) if neg else None
        return ext.get(key) if isinstance(ext, dict) else None

    def _accepted_memory(self) -> Any:
        return self._accepted("guest_memory")

    @property
    def direct_ioreq(self) -> str | None:
        """The kind of ioreq server (``"xen"``) the server accepted to serve
        itself (:meth:`ioreq_serve`), or None."""
        accepted = self._accepted("ioreq")
        kind = accepted.get("kind") if isinstance(accepted, dict) else None
        return kind if isinstance(kind, str) else None

    def ioreq_serve(self, serve: wire.IoreqServe) -> None:
        """Have the server serve (or go on serving, with these ranges) an ioreq
        server itself; returns once it does."""
        self.call(Command.XDEV_IOREQ_SERVE, serve)

    def ioreq_release(self) -> None:
        """Have the server stop serving its ioreq server; returns once it has."""
        self.call(Command.XDEV_IOREQ_RELEASE, b"")

    @property
    def direct_memory(self) -> bool:
        """The server accepted our guest-memory offer (and with it
        :meth:`invalidate_guest_memory`)."""
        accepted = self._accepted_memory()
        return isinstance(accepted, dict) and accepted.get("invalidate") is True

    def invalidate_guest_memory(self) -> None:
        """Make a server that maps guest memory itself drop every mapping;
        returns once it has (see wire.XDEV_EXTENSION)."""
        self.call(Command.XDEV_GUEST_MEMORY_INVALIDATE, b"")

    @property
    def server_max_xfer(self) -> int:
        neg = self.conn.negotiated
        return neg.peer_max_data_xfer_size if neg else wire.DEFAULT_MAX_DATA_XFER_SIZE

    def call(self, command: Command, payload: wire.Payload | bytes,
             fds: Sequence[int] = (), *, no_reply: bool = False) -> Reply:
        """Send a command and wait for its reply; error replies raise."""
        with self._lock:
            msg_id, data = self.conn.send_request(command, payload, fds, no_reply=no_reply)
            self.transport.send(data, fds)
            if no_reply:
                return Reply(msg_id, command, None, [])
            reply = self._await(msg_id)
        if reply.error:
            raise RemoteError(command, reply.error)
        return reply

    def _await(self, msg_id: int | None) -> Reply:
        """Read until the reply to ``msg_id`` (None: the VERSION reply)
        arrives, answering server commands on the way."""
        conn, tr = self.conn, self.transport
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                data, fds = tr.recv()
                conn.receive_data(data, fds)
                if not data:
                    raise ConnectionClosed("server closed the connection")
                continue
            if isinstance(ev, Reply):
                if msg_id is None or ev.msg_id == msg_id:
                    return ev
                close_fds(ev.fds)  # a NO_REPLY command's id cannot come back
                continue
            self._serve(ev, conn, tr)

    def _serve(self, ev: Request | InvalidMessage, conn: Connection, tr: Transport) -> None:
        """Answer a DMA_READ/DMA_WRITE from the server."""
        if isinstance(ev, InvalidMessage):
            log.warning("server sent a bad command %d: %s", ev.command, ev.error)
            if not ev.no_reply:
                tr.send(Connection.send_error(ev.msg_id, ev.command, ev.error.errno))
            return
        p = ev.payload
        assert isinstance(p, wire.DmaAccess)
        try:
            if self.guest is None:
                raise VfioUserError("no guest memory to serve DMA from", errno.EFAULT)
            self._check_dma(p.address, p.count, ev.command is Command.DMA_WRITE)
            if ev.command is Command.DMA_READ:
                data = self.guest.read(p.address, p.count)
                out = conn.send_reply(ev, wire.DmaAccess(p.address, p.count, data))
            else:
                self.guest.write(p.address, p.data)
                out = conn.send_reply(ev, wire.DmaAccess(p.address, p.count))
        except VfioUserError as exc:
            out = Connection.send_error(ev.msg_id, ev.command, exc.errno)
        if not ev.no_reply:
            tr.send(out)

    # -- background DMA service ---------------------------------------------------
    def start_dma_service(self) -> None:
        """Answer server DMA commands that arrive while no call is made."""
        if self._service is None:
            self._service = threading.Thread(target=self._service_loop, daemon=True,
                                             name="vfio-user-dma")
            self._service.start()

    def _service_loop(self) -> None:
        twin = self._twin
        watch = twin[0] if twin else self.transport
        try:
            while not self.closed:
                ready, _, _ = select.select([watch.fileno(), self._stop_r.fileno()], [], [])
                if self._stop_r.fileno() in ready or self.closed:
                    return
                if twin is not None:
                    self._serve_twin_once(*twin)
                else:
                    self._serve_main_once()
        except (VfioUserError, OSError) as exc:
            if not self.closed:
                log.warning("DMA service stopped: %s", exc)

    def _serve_twin_once(self, tr: Transport, conn: Connection) -> None:
        data, fds = tr.recv()
        conn.receive_data(data, fds)
        if not data:
            raise ConnectionClosed("twin socket closed")
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, Reply):
                raise PeerProtocolError("reply on the twin socket", fatal=True)
            self._serve(ev, conn, tr)

    def _serve_main_once(self) -> None:
        with self._lock:
            # A caller may have consumed what woke us while we waited.
            ready, _, _ = select.select([self.transport.fileno()], [], [], 0)
            if not ready:
                return
            data, fds = self.transport.recv()
            self.conn.receive_data(data, fds)
            if not data:
                raise ConnectionClosed("server closed the connection")
            while (ev := self.conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Reply):
                    raise PeerProtocolError("unexpected reply", fatal=True)
                self._serve(ev, self.conn, self.transport)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_w.send(b"x")
        if self._service is not None and self._service is not threading.current_thread():
            self._service.join(2)
        self.conn.close()
        self.transport.close()
        if self._twin is not None:
            self._twin[0].close()
        self._stop_r.close()
        self._stop_w.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- device information --------------------------------------------------------
    def device_info(self) -> wire.DeviceInfo:
        p = self.call(Command.DEVICE_GET_INFO, wire.DeviceInfo(wire.DeviceInfo.SIZE, 0, 0, 0))
        assert isinstance(p.payload, wire.DeviceInfo)
        return p.payload

    def region_info(self, index: int) -> RegionInfo:
        """Two-step argsz: ask with the bare struct, then with what the
        server said it needs (the fd comes with the complete answer)."""
        argsz = wire.RegionInfo.SIZE
        for _ in range(2):
            reply = self.call(Command.DEVICE_GET_REGION_INFO,
                              wire.RegionInfo(argsz, 0, index, 0, 0, 0))
            p = reply.payload
            assert isinstance(p, wire.RegionInfo)
            if p.argsz <= argsz:
                fd = reply.fds[0] if reply.fds else None
                close_fds(reply.fds[1:])
                return RegionInfo(index, p.flags, p.size, p.offset, p.caps, fd)
            close_fds(reply.fds)
            if p.argsz > 1 << 20:
                break
            argsz = p.argsz
        raise PeerProtocolError(f"region {index}: server keeps asking for more argsz")

    def region_io_fds(self, index: int) -> tuple[wire.RegionIoFds, list[int]]:
        argsz = wire.RegionIoFds.SIZE
        for _ in range(2):
            reply = self.call(Command.DEVICE_GET_REGION_IO_FDS,
                              wire.RegionIoFds(argsz, 0, index, 0))
            p = reply.payload
            assert isinstance(p, wire.RegionIoFds)
            if p.argsz <= argsz:
                return p, reply.fds
            close_fds(reply.fds)
            argsz = min(p.argsz, 1 << 20)
        raise PeerProtocolError(f"region {index}: io fds argsz does not converge")

    def irq_info(self, index: int) -> wire.IrqInfo:
        p = self.call(Command.DEVICE_GET_IRQ_INFO, wire.IrqInfo(wire.IrqInfo.SIZE, 0, index, 0))
        assert isinstance(p.payload, wire.IrqInfo)
        return p.payload

    # -- region access --------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if count <= 8:
            return self._access(_REGION_READ, index, offset, count)
        step = self.server_max_xfer
        if count <= step:
            return self._access(_REGION_READ, index, offset, count)
        return b"".join(self._access(_REGION_READ, index, offset + pos, min(step, count - pos))
                        for pos in range(0, count, step))

    def region_write(self, index: int, offset: int, data: bytes, *,
                     posted: bool = False) -> None:
        """Write a region. ``posted``: send with NO_REPLY and return at once,
        as a CPU's MMIO write is posted; a later call's reply still comes
        after the write took effect, since the server keeps order, but a
        failed posted write is only the server's to log."""
        write = self._post if posted else self._access
        if len(data) <= 8:
            write(_REGION_WRITE, index, offset, len(data), bytes(data))
            return
        step = self.server_max_xfer
        for pos in range(0, max(len(data), 1), step):
            chunk = bytes(data[pos:pos + step])
            write(_REGION_WRITE, index, offset + pos, len(chunk), chunk)

    def _post(self, command: int, index: int, offset: int, count: int, data: bytes) -> bytes:
        if self._twin is None and self._service is None and self.guest is not None:
            # Without a twin socket the server's DMA commands come on this
            # socket; after a posted write nobody would read them until the
            # next call, so a thread must.
            self.start_dma_service()
        with self._lock:
            try:
                self._sendall(self.conn.posted_write(offset, index, data))
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"server went away: {exc}") from None
        return b""

    def _access(self, command: int, index: int, offset: int, count: int,
                data: bytes = b"") -> bytes:
        """One REGION_READ/WRITE round trip; the hot path of every guest
        register access (see Connection.region_reply_data), so it uses the
        socket directly: one send, one receive into the transport's buffer."""
        conn = self.conn
        want = count if command == _REGION_READ else 0
        with self._lock:
            msg_id, out, expect = conn.region_request(command, offset, index, count, data)
            try:
                self._sendall(out)
                # Only DMA commands and this reply can arrive now; neither
                # has fds, so plain recv (the kernel drops any fds) will do.
                n = self._recv_into(self._rbuf)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionClosed(f"server went away: {exc}") from None
            body = conn.region_reply_data(self._rbuf, n, expect, 32 + want)
            if body is not None:
                return body
            conn.expect_reply(msg_id, command)
            conn.receive_data(self._rview[:n])
            if not n:
                raise ConnectionClosed("server closed the connection")
            reply = self._await(msg_id)
        if reply.error:
            raise RemoteError(reply.command, reply.error)
        p = reply.payload
        assert isinstance(p, wire.RegionAccess)
        if p.offset != offset or p.region != index or p.count != count or len(p.data) != want:
            raise PeerProtocolError("region access reply does not match the request")
        return p.data

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]]) -> int:
        """Batch small writes (index, offset, data of at most 8 bytes)."""
        entries = tuple(wire.WriteMultiEntry(off, idx, len(d), d) for idx, off, d in writes)
        reply = self.call(Command.REGION_WRITE_MULTI, wire.RegionWriteMulti(entries))
        assert isinstance(reply.payload, wire.WriteMultiReply)
        return reply.payload.wr_cnt

    # -- DMA ------------------------------------------------------------------------
    def dma_map(self, iova: int, size: int, *, fd: int | None = None, offset: int = 0,
                readable: bool = True, writable: bool = True) -> None:
        """Map guest memory; the fd (if any) is sent, not closed."""
        flags = (wire.DmaMapFlags.READ if readable else 0) | (
            wire.DmaMapFlags.WRITE if writable else 0)
        fds = [fd] if fd is not None and self.transport.passes_fds else []
        if fd is not None and not fds:
            offset = 0
        self.call(Command.DMA_MAP, wire.DmaMap(wire.DmaMap.SIZE, flags, offset, iova, size), fds)
        self._dma_maps[iova] = (size, readable, writable)

    def dma_unmap(self, iova: int, size: int) -> None:
        self.call(Command.DMA_UNMAP, wire.DmaUnmap(wire.DmaUnmap.SIZE, 0, iova, size))
        self._dma_maps.pop(iova, None)

    def dma_unmap_all(self) -> None:
        self.call(Command.DMA_UNMAP,
                  wire.DmaUnmap(wire.DmaUnmap.SIZE, wire.DmaUnmapFlags.ALL, 0, 0))
        self._dma_maps.clear()

    def _check_dma(self, address: int, count: int, write: bool) -> None:
        """The server may reach only what we mapped, with the access we
        granted; anything else is EFAULT, as for an IOMMU fault."""
        for iova, (size, readable, writable) in tuple(self._dma_maps.items()):
            if iova <= address and address + count <= iova + size:
                if writable if write else readable:
                    return
                break
        raise VfioUserError(f"server DMA to unmapped {address:#x}+{count}", errno.EFAULT)

    # -- interrupts ------------------------------------------------------------------
    def set_irqs(self, index: int, action: SetIrqsFlags, start: int = 0, *,
                 fds: Sequence[int] | None = None, bools: Sequence[bool] | None = None,
                 count: int | None = None) -> None:
        """One SET_IRQS: eventfds (``fds``), booleans, or neither (DATA_NONE).

        More eventfds than the server's max_msg_fds go in several messages,
        each for its own range of vectors ("VFIO_USER_VERSION": max_msg_fds).
        """
        if fds is not None:
            neg = self.conn.negotiated
            step = neg.peer_max_msg_fds if neg else wire.DEFAULT_MAX_MSG_FDS
            if count is None and 0 < step < len(fds):
                for pos in range(0, len(fds), step):
                    self.set_irqs(index, action, start + pos, fds=fds[pos:pos + step])
                return
            n = len(fds) if count is None else count
            sp = wire.SetIrqs(wire.SetIrqs.SIZE, SetIrqsFlags.DATA_EVENTFD | action, index,
                              start, n)
            self.call(Command.DEVICE_SET_IRQS, sp, list(fds))
        elif bools is not None:
            data = bytes(1 if b else 0 for b in bools)
            sp = wire.SetIrqs(wire.SetIrqs.SIZE + len(data), SetIrqsFlags.DATA_BOOL | action,
                              index, start, len(data), data)
            self.call(Command.DEVICE_SET_IRQS, sp)
        else:
            sp = wire.SetIrqs(wire.SetIrqs.SIZE, SetIrqsFlags.DATA_NONE | action, index,
                              start, count or 0)
            self.call(Command.DEVICE_SET_IRQS, sp)

    def reset(self) -> None:
        self.call(Command.DEVICE_RESET, b"")

    # -- features and migration ----------------------------------------------------
    def feature(self, feature: Feature, op: FeatureFlags, data: bytes = b"",
                reply_room: int = 0) -> bytes:
        argsz = wire.DeviceFeature.SIZE + len(data) + reply_room
        reply = self.call(Command.DEVICE_FEATURE,
                          wire.DeviceFeature(argsz, int(feature) | op, data))
        assert isinstance(reply.payload, wire.DeviceFeature)
        return reply.payload.data

    def migration_flags(self) -> wire.MigrationFlags:
        data = self.feature(Feature.MIGRATION, FeatureFlags.GET, reply_room=8)
        return wire.MigrationFlags(wire.FeatMigration.decode(data).flags)

    def mig_state(self) -> wire.MigState:
        data = self.feature(Feature.MIG_DEVICE_STATE, FeatureFlags.GET, reply_room=8)
        return wire.MigState(wire.FeatMigState.decode(data).device_state)

    def set_mig_state(self, state: wire.MigState) -> wire.MigState:
        data = self.feature(Feature.MIG_DEVICE_STATE, FeatureFlags.SET,
                            wire.FeatMigState(int(state), -1).encode())
        return wire.MigState(wire.FeatMigState.decode(data).device_state)

    def mig_data_read(self, size: int = 65536) -> bytes:
        size = min(size, self.server_max_xfer)
        reply = self.call(Command.MIG_DATA_READ, wire.MigData(wire.MigData.SIZE + size, size))
        p = reply.payload
        assert isinstance(p, wire.MigData)
        if p.size > size or len(p.data) != p.size:
            raise PeerProtocolError("MIG_DATA_READ reply larger than asked or short")
        return p.data

    def mig_data_write(self, data: bytes) -> None:
        step = self.server_max_xfer
        for pos in range(0, len(data), step):
            chunk = data[pos:pos + step]
            self.call(Command.MIG_DATA_WRITE,
                      wire.MigData(wire.MigData.SIZE + len(chunk), len(chunk), chunk))

    def save_device(self) -> bytes:
        """Drive the device to STOP_COPY and read its whole state."""
        self.set_mig_state(wire.MigState.STOP_COPY)
        out = bytearray()
        while chunk := self.mig_data_read():
            out += chunk
        self.set_mig_state(wire.MigState.STOP)
        return bytes(out)

    def load_device(self, state: bytes, *, run: bool = True) -> None:
        """Drive the device through RESUMING and load a saved state."""
        self.set_mig_state(wire.MigState.RESUMING)
        self.mig_data_write(state)
        self.set_mig_state(wire.MigState.RUNNING if run else wire.MigState.STOP)

    def dma_logging_start(self, page_size: int = 4096,
                          ranges: Sequence[tuple[int, int]] = ()) -> None:
        self.feature(Feature.DMA_LOGGING_START, FeatureFlags.SET,
                     wire.FeatDmaLogging(page_size, tuple(ranges)).encode())

    def dma_logging_stop(self) -> None:
        self.feature(Feature.DMA_LOGGING_STOP, FeatureFlags.SET,
                     wire.FeatDmaLogging(4096).encode())

    def dma_logging_report(self, iova: int, length: int, page_size: int = 4096) -> bytes:
        pages = -(-length // page_size)
        room = -(-pages // 64) * 8
        data = self.feature(Feature.DMA_LOGGING_REPORT, FeatureFlags.GET,
                            wire.FeatDmaLoggingReport(iova, length, page_size).encode(),
                            reply_room=room)
        return wire.FeatDmaLoggingReport.decode(data).bitmap

