"""The vfio-user server runtime: serves one :class:`~xdevproto.device.Device`.

One client at a time per device (vfio-user spec, "Transport": one device per
connection). A second client that connects while one is attached gets an
EBUSY error reply to its VERSION and is disconnected. When a client goes away
the runtime drops its DMA regions and interrupt fds, keeps the device's
state, and accepts the next client ("Disconnect").

Threads: a session's loop thread reads the socket and calls the device in
message order. Device worker threads may do message DMA through the session
(:class:`~xdevproto.device.DeviceContext`); their replies are routed back by
the loop thread, or travel on the twin socket when one was negotiated.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import wire
from .connection import (
    NEED_DATA,
    Connection,
    Event,
    FastAccess,
    InvalidMessage,
    Reply,
    Request,
    Role,
    close_fds,
)
from .device import Device, DeviceContext, DmaRegion, RegionDesc
from .errors import ConnectionClosed, DeviceError, PeerProtocolError, VfioUserError
from .features import handle_feature
from .guestmem import IoreqAttachment, MappedGuestMemory
from .transport import Transport, peer_credentials
from .wire import Command, SetIrqsFlags

log = logging.getLogger(__name__)

Handler = Callable[["Session", Request], "tuple[wire.Payload | bytes, list[int]]"]


@dataclass
class _Waiter:
    done: threading.Event
    reply: Reply | None = None
    error: VfioUserError | None = None


class DmaTable:
    """The client's DMA regions, kept sorted; refuses overlaps."""

    def __init__(self, max_maps: int) -> None:
        self.max_maps = max_maps
        self.regions: list[DmaRegion] = []

    def find_overlap(self, iova: int, size: int) -> DmaRegion | None:
        for r in self.regions:
            if iova < r.iova + r.size and r.iova < iova + size:
                return r
        return None

    def add(self, region: DmaRegion) -> None:
        if len(self.regions) >= self.max_maps:
            raise DeviceError("too many DMA regions", errno.ENOSPC)
        if self.find_overlap(region.iova, region.size):
            raise DeviceError("DMA region overlaps an existing one", errno.EEXIST)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.iova)

    def remove(self, iova: int, size: int) -> DmaRegion:
        for i, r in enumerate(self.regions):
            if r.iova == iova and r.size == size:
                return self.regions.pop(i)
        raise DeviceError(f"no DMA region at {iova:#x}+{size:#x}", errno.ENOENT)

    def clear(self) -> list[DmaRegion]:
        out, self.regions = self.regions, []
        return out


class Session(DeviceContext):
    """One client connection to a device."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.device = server.device
        self.conn = Connection(Role.SERVER, server.capabilities)
        self.transport = Transport(sock, max_recv_fds=server.capabilities.max_msg_fds)
        self._sendall = sock.sendall
        self.lock = threading.Lock()  # the connection's state and the main socket's sends
        self.loop_thread = threading.get_ident()
        self.waiters: dict[int, _Waiter] = {}
        self.deferred: deque[Event | FastAccess] = deque()
        self.dma = DmaTable(server.capabilities.max_dma_maps)
        self.regions: dict[int, RegionDesc] = {}
        self._limits: dict[int, tuple[int, bool, bool]] = {}  # index -> size, R, W
        self.closed = False
        self.attached = False
        self._twin: tuple[Transport, Connection] | None = None
        self._twin_lock = threading.Lock()
        self.direct_memory: MappedGuestMemory | None = None
        self.ioreq: IoreqAttachment | None = None  # the xdev ioreq extension
        self.invalidations = 0  # XDEV_GUEST_MEMORY_INVALIDATE carried out

    # -- DeviceContext -----------------------------------------------------------
    @property
    def max_data_xfer_size(self) -> int:
        neg = self.conn.negotiated
        return neg.peer_max_data_xfer_size if neg else wire.DEFAULT_MAX_DATA_XFER_SIZE

    def accept_xdev(self, req: Request) -> None:
        """xdev extensions the client offers in VERSION (wire.XDEV_EXTENSION),
        accepted where this server is configured for them:

        * ``guest_memory``: guest memory this server may map itself
          (``{"kind": K, ...}``), so that DMA to regions mapped without an fd
          skips the DMA_READ/DMA_WRITE messages;
        * ``ioreq``: the guest's BAR accesses straight from the hypervisor
          (``{"kind": K, ...}``), served after XDEV_IOREQ_SERVE."""
        caps = self.conn.our_caps
        exts = {k: v for k, v in caps.extensions.items() if k != wire.XDEV_EXTENSION}
        assert isinstance(req.payload, wire.Version)
        offer = req.payload.capabilities.extensions.get(wire.XDEV_EXTENSION)
        accepted: dict[str, Any] = {}
        memory = offer.get("guest_memory") if isinstance(offer, dict) else None
        kind = memory.get("kind") if isinstance(memory, dict) else None
        factory = self.server.guest_mappers.get(kind) if isinstance(kind, str) else None
        if factory is not None and isinstance(memory, dict):
            try:
                self.direct_memory = factory(memory)
            except Exception as exc:  # the offer is the peer's; refusing it is enough
                log.warning("guest memory %r offered but not usable: %s", kind, exc)
            else:
                accepted["guest_memory"] = {"kind": kind, "invalidate": True}
                log.info("DMA through %s guest memory, without messages", kind)
        ioreq = offer.get("ioreq") if isinstance(offer, dict) else None
        kind = ioreq.get("kind") if isinstance(ioreq, dict) else None
        attacher = self.server.ioreq_attachers.get(kind) if isinstance(kind, str) else None
        if attacher is not None and isinstance(ioreq, dict):
            try:
                self.ioreq = attacher(ioreq, self.device)
            except Exception as exc:
                log.warning("ioreq %r offered but not usable: %s", kind, exc)
            else:
                accepted["ioreq"] = {"kind": kind}
                log.info("BAR accesses through %s ioreqs offered and accepted", kind)
        if accepted:
            exts[wire.XDEV_EXTENSION] = accepted
        self.conn.our_caps = dataclasses.replace(caps, extensions=exts)

    def dma_read(self, iova: int, length: int) -> bytes:
        direct = self.direct_memory  # once: the session's end may drop it
        if direct is not None:
            return direct.read(iova, length)
        out = bytearray()
        step = self.max_data_xfer_size
        while len(out) < length:
            n = min(step, length - len(out))
            addr = iova + len(out)
            reply = self._call(Command.DMA_READ, wire.DmaAccess(addr, n))
            p = reply.payload
            if not isinstance(p, wire.DmaAccess) or p.address != addr or p.count != n \
                    or len(p.data) != n:
                raise PeerProtocolError("DMA_READ reply does not match the request")
            out += p.data
        return bytes(out)

    @property
    def direct(self) -> bool:
        return self.direct_memory is not None

    def file_io(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int,
                to_guest: bool, flags: int = 0) -> int | None:
        io = getattr(self.direct_memory, "file_io", None)
        return None if io is None else int(io(fd, ranges, offset, to_guest, flags))

    def dma_write(self, iova: int, data: bytes | memoryview) -> None:
        direct = self.direct_memory
        if direct is not None:
            direct.write(iova, bytes(data))
            return
        step = self.max_data_xfer_size
        view = memoryview(data)
        for pos in range(0, len(view), step):
            chunk = bytes(view[pos:pos + step])
            self._call(Command.DMA_WRITE, wire.DmaAccess(iova + pos, len(chunk), chunk))

    def _call(self, command: Command, payload: wire.Payload) -> Reply:
        if self.closed:
            raise ConnectionClosed("client is gone")
        try:
            if self._twin is not None:
                reply = self._call_twin(command, payload)
            else:
                reply = self._call_main(command, payload)
        except PeerProtocolError as exc:
            if exc.fatal:
                # The device may swallow the error (it is a DMA failure to
                # the device); the session must still end: shut the socket
                # so the loop sees EOF instead of waiting on a dead stream.
                try:
                    self.transport.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise
        if reply.error:
            raise DeviceError(f"client refused {command.name}", reply.error)
        return reply

    def _call_twin(self, command: Command, payload: wire.Payload) -> Reply:
        assert self._twin is not None
        tr, conn = self._twin
        with self._twin_lock:
            _, data = conn.send_request(command, payload)
            tr.send(data)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    chunk, fds = tr.recv()
                    conn.receive_data(chunk, fds)
                    if not chunk:
                        raise ConnectionClosed("twin socket closed")
                    continue
                if isinstance(ev, Reply):
                    return ev
                raise PeerProtocolError("client sent a command on the twin socket", fatal=True)

    def _call_main(self, command: Command, payload: wire.Payload) -> Reply:
        waiter = _Waiter(threading.Event())
        with self.lock:
            msg_id, data = self.conn.send_request(command, payload)
            self.waiters[msg_id] = waiter
            self.transport.send(data)
        if threading.get_ident() == self.loop_thread:
            while not waiter.done.is_set():
                ev = self._receive(waiter)
                if ev is None:
                    break
                if ev is not NEED_DATA:
                    self.deferred.append(ev)
        else:
            waiter.done.wait()
        if waiter.reply is None:
            raise waiter.error or ConnectionClosed("client is gone")
        return waiter.reply

    # -- the loop ----------------------------------------------------------------
    def _receive(self, until: _Waiter | None = None) -> Event | FastAccess | None:
        """The next command from the client (replies go to their waiters);
        None at EOF; NEED_DATA once ``until`` has its reply (the loop thread
        waiting for its own DMA reply must not block in recv again)."""
        conn, lock = self.conn, self.lock
        while True:
            if conn.buffered:
                with lock:
                    ev = conn.next_event()
            else:
                ev = NEED_DATA
            if ev is NEED_DATA:
                data, fds = self.transport.recv()
                if data and not fds:
                    with self.lock:
                        fast = self.conn.fast_request(data)
                    if fast is not None:
                        return fast
                with self.lock:
                    self.conn.receive_data(data, fds)
                if not data:
                    return None
                continue
            if isinstance(ev, Reply):
                waiter = self.waiters.pop(ev.msg_id, None)
                if waiter is not None:
                    waiter.reply = ev
                    waiter.done.set()
                else:
                    close_fds(ev.fds)
                if until is not None and until.done.is_set():
                    return NEED_DATA
                continue
            return ev

    def run(self) -> None:
        self.loop_thread = threading.get_ident()
        conn, lock, deferred = self.conn, self.lock, self.deferred
        recv, fast_request = self.transport.recv, conn.fast_request
        serve_access, dispatch = self._serve_access, self._dispatch
        try:
            while True:
                if deferred:
                    dispatch(deferred.popleft())
                    continue
                # conn.buffered without the property call: the connection's
                # buffer is empty exactly when nothing is buffered.
                if not conn._buf:
                    data, fds = recv()
                    # Only this thread consumes input, so the shortcut
                    # needs no lock (workers only send). A client that posts
                    # writes sends several accesses at once: take each.
                    served = False
                    while not fds and (fast := fast_request(data, prefix=True)) is not None:
                        data = data[32 + len(fast[5]):]
                        if data and self._twin is None:
                            # The access may wait for a DMA reply on this
                            # socket: what follows it waits in the buffer.
                            with lock:
                                conn.receive_data(data)
                            data = data[:0]
                        serve_access(*fast)
                        served = True
                        if not data:
                            break
                    if served and not data:
                        continue
                    with lock:
                        conn.receive_data(data, fds)
                    if not data:
                        break
                ev = self._receive()
                if ev is None:
                    break
                dispatch(ev)
        except PeerProtocolError as exc:
            log.warning("dropping client: %s", exc)
        except (ConnectionClosed, BrokenPipeError, ConnectionResetError):
            pass
        except OSError as exc:
            log.warning("client connection failed: %s", exc)
        finally:
            self._teardown()

    def _dispatch(self, ev: Event | FastAccess) -> None:
        if type(ev) is tuple:
            self._serve_access(*ev)
            return
        if isinstance(ev, InvalidMessage):
            log.info("refused command %d (id %d): %s", ev.command, ev.msg_id, ev.error)
            if not ev.no_reply:
                self._send(Connection.send_error(ev.msg_id, ev.command, ev.error.errno))
            if ev.command == Command.VERSION and self.conn.negotiated is None \
                    and ev.error.errno == errno.ENOTSUP:
                raise ConnectionClosed("version refused")
            return
        assert isinstance(ev, Request)
        handler = HANDLERS[ev.command]
        fds: list[int] = []
        try:
            payload, fds = handler(self, ev)
            out = self.conn.send_reply(ev, payload, fds)
        except VfioUserError as exc:
            if isinstance(exc, PeerProtocolError) and exc.fatal:
                if not ev.no_reply:
                    self._send(Connection.send_error(ev.msg_id, ev.command, exc.errno))
                raise
            log.debug("%s failed: %s", ev.command.name, exc)
            out, fds = Connection.send_error(ev.msg_id, ev.command, exc.errno), []
        except Exception:
            log.exception("device failed on %s", ev.command.name)
            out, fds = Connection.send_error(ev.msg_id, ev.command, errno.EIO), []
        if not ev.no_reply:
            self._send(out, fds)

    def access_region(self, command: int, offset: int, region: int, count: int,
                      data: bytes) -> bytes:
        """A checked REGION_READ (returns the data) or REGION_WRITE."""
        size, readable, writable = self._limits.get(region) or self._region_limits(region)
        if offset + count > size:
            raise DeviceError(f"access {offset:#x}+{count} beyond region {region}", errno.EINVAL)
        if command == _REGION_READ:
            if not readable:
                raise DeviceError(f"region {region} is not readable", errno.EINVAL)
            out = self.device.region_read(region, offset, count) if count else b""
            if len(out) != count:
                raise DeviceError("device returned a short read", errno.EIO)
            return out
        if not writable:
            raise DeviceError(f"region {region} is not writable", errno.EINVAL)
        if count:
            self.device.region_write(region, offset, data)
        return b""

    def _serve_access(self, msg_id: int, command: int, offset: int, region: int, count: int,
                      data: bytes, no_reply: bool) -> None:
        """The register-access shortcut (see Connection.fast_request): the
        hot path of every guest register access, so the reply goes straight to
        the socket rather than through Transport.send (a peer gone mid-send
        surfaces as the OSError the loop expects). A posted write (NO_REPLY)
        gets no reply, not even an error one."""
        try:
            out = self.conn.region_reply(msg_id, command, offset, region, count,
                                         self.access_region(command, offset, region, count,
                                                            data))
        except VfioUserError as exc:
            if no_reply:
                log.debug("posted write to region %d at %#x failed: %s", region, offset, exc)
                return
            out = Connection.send_error(msg_id, command, exc.errno)
        except Exception:
            log.exception("device failed on a region access")
            out = Connection.send_error(msg_id, command, errno.EIO)
        if no_reply:
            return
        if self._twin is not None:
            # Workers send only on the twin socket: this thread is the main
            # socket's one sender.
            self._sendall(out)
            return
        with self.lock:
            self._sendall(out)

    def _send(self, data: bytes, fds: Iterable[int] = ()) -> None:
        with self.lock:
            self.transport.send(data, list(fds))

    def _teardown(self) -> None:
        self.closed = True
        self._release_ioreq()
        for waiter in self.waiters.values():
            waiter.error = ConnectionClosed("client is gone")
            waiter.done.set()
        self.waiters.clear()
        if self.attached:
            for region in self.dma.clear():
                self._unmap(region)
            for index in range(self.device.num_irqs):
                try:
                    if self.device.irq(index).count:
                        self.device.set_irqs(index, SetIrqsFlags.ACTION_TRIGGER, 0, 0,
                                             None, None)
                except VfioUserError:
                    pass
                except Exception:
                    log.exception("device failed to drop interrupts")
            try:
                self.device.detach()
            except Exception:
                log.exception("device failed to detach")
        self._drop_direct_memory()
        self.conn.close()
        if self._twin is not None:
            self._twin[0].close()
        self.transport.close()

    def _release_ioreq(self) -> None:
        """Nothing reaches the device from the hypervisor after this."""
        if self.ioreq is not None:
            try:
                self.ioreq.release()
            except Exception:
                log.exception("ioreq server not released")

    def _drop_direct_memory(self) -> None:
        memory, self.direct_memory = self.direct_memory, None
        if memory is not None:
            try:
                memory.close()
            except Exception:
                log.exception("guest memory mappings not released")

    def _unmap(self, region: DmaRegion) -> None:
        try:
            self.device.dma_unmap(region)
        except Exception:
            log.exception("device failed to unmap a DMA region")

    # -- helpers for handlers --------------------------------------------------
    def region_desc(self, index: int) -> RegionDesc:
        desc = self.regions.get(index)
        if desc is None:
            if not 0 <= index < self.device.num_regions:
                raise DeviceError(f"no region {index}", errno.EINVAL)
            desc = self.regions[index] = self.device.region(index)
        return desc

    def _region_limits(self, index: int) -> tuple[int, bool, bool]:
        desc = self.region_desc(index)
        limits = (desc.size, bool(desc.flags & _READ), bool(desc.flags & _WRITE))
        self._limits[index] = limits
        return limits

    def check_access(self, index: int, offset: int, count: int, flag: int) -> None:
        size, readable, writable = self._limits.get(index) or self._region_limits(index)
        if not (readable if flag == _READ else writable):
            raise DeviceError(f"region {index} does not allow this access", errno.EINVAL)
        if offset + count > size:
            raise DeviceError(f"access {offset:#x}+{count} beyond region {index}", errno.EINVAL)

    def start_twin(self) -> int:
        """Create the twin socket; returns the fd to pass to the client."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._twin = (Transport(ours, max_recv_fds=0), self.conn.twin())
        return theirs.detach()


class Server:
    """Serves one device on a listening socket, one client at a time."""

    def __init__(
        self,
        device: Device,
        *,
        capabilities: wire.Capabilities | None = None,
        twin_socket: bool = True,
        allowed_uids: Iterable[int] | None = None,
        guest_mappers: Mapping[str, Callable[[dict[str, Any]], MappedGuestMemory]] | None = None,
        ioreq_attachers: Mapping[str, Callable[[dict[str, Any], Device], IoreqAttachment]]
        | None = None,
    ) -> None:
        """``guest_mappers``: kinds of guest memory this server can map by
        itself (see Session.accept_xdev), e.g. ``xen-foreign``.
        ``ioreq_attachers``: kinds of ioreq server whose requests this server
        can take itself (Session.accept_xdev), e.g. ``xen``."""
        self.device = device
        self.guest_mappers = dict(guest_mappers or {})
        self.ioreq_attachers = dict(ioreq_attachers or {})
        self.capabilities = capabilities or wire.Capabilities(max_msg_fds=8)
        self.twin_socket = twin_socket
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else None
        self.session: Session | None = None
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self.on_state: Callable[[str], None] | None = None

    def stop(self) -> None:
        self._stop.set()

    def _permitted(self, sock: socket.socket) -> bool:
        if self.allowed_uids is None:
            return True
        cred = peer_credentials(sock)
        if cred is None or cred.uid in self.allowed_uids:
            return True
        log.warning("refusing client pid %d uid %d", cred.pid, cred.uid)
        return False

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve one client until it disconnects (in this thread)."""
        caps = self.capabilities
        if sock.family != socket.AF_UNIX and caps.max_msg_fds:
            # No fd passing over TCP: say so, so that the client maps memory
            # without fds and expects no mmap'able regions.
            caps = dataclasses.replace(caps, max_msg_fds=0)
        session = Session(self, sock)
        session.conn.our_caps = caps
        self.session = session
        self._notify("client connected")
        try:
            session.run()
        finally:
            self.session = None
            self._notify("waiting for a client")

    def serve(self, listener: socket.socket, *, max_sessions: int | None = None) -> None:
        """Accept clients until stop() or ``max_sessions`` sessions served."""
        listener.settimeout(0.2)
        served = 0
        worker: threading.Thread | None = None
        self._notify("waiting for a client")
        try:
            while not self._stop.is_set():
                if worker is not None and not worker.is_alive():
                    worker = None
                    served += 1
                if max_sessions is not None and served >= max_sessions:
                    return
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                sock.settimeout(None)
                if not self._permitted(sock):
                    sock.close()
                    continue
                if worker is not None and worker.is_alive():
                    threading.Thread(target=refuse_busy, args=(sock,), daemon=True).start()
                    continue
                if worker is not None:
                    served += 1
                    if max_sessions is not None and served >= max_sessions:
                        sock.close()
                        return
                worker = threading.Thread(target=self.serve_connection, args=(sock,),
                                          name="vfio-user-session", daemon=True)
                worker.start()
        finally:
            if worker is not None:
                session = self.session
                if session is not None:
                    try:
                        session.transport.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                worker.join(5)

    def _notify(self, state: str) -> None:
        if self.on_state is not None:
            self.on_state(state)


def refuse_busy(sock: socket.socket, timeout: float = 2.0) -> None:
    """Answer a second client's VERSION with EBUSY, then hang up."""
    try:
        sock.settimeout(timeout)
        head = sock.recv(wire.HEADER_SIZE, socket.MSG_PEEK)
        if len(head) == wire.HEADER_SIZE:
            msg_id, command = wire.HEADER.unpack(head)[:2]
            sock.sendall(Connection.send_error(msg_id, command, errno.EBUSY))
        log.warning("refused a second client: the device already has one")
    except OSError:
        pass
    finally:
        sock.close()


# -- command handlers ----------------------------------------------------------------
# Each returns (reply payload, fds to pass) or raises a VfioUserError.

NOTHING: tuple[bytes, list[int]] = (b"", [])
_REGION_READ = int(Command.REGION_READ)
_READ = int(wire.RegionFlags.READ)
_WRITE = int(wire.RegionFlags.WRITE)


def _version(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    s.accept_xdev(req)
    try:
        reply = s.conn.accept_version(req, twin_socket=s.server.twin_socket
                                      and s.transport.passes_fds)
    except PeerProtocolError as exc:
        raise PeerProtocolError(str(exc), exc.errno, fatal=True) from None
    fds: list[int] = []
    if reply.capabilities.twin_socket is not None:
        fds = [s.start_twin()]
    s.attached = True
    s.device.attach(s)
    return reply, fds


def _dma_map(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.DmaMap)
    fd = req.fds[0] if req.fds else None
    try:
        neg = s.conn.negotiated
        page = (neg.pgsizes & -neg.pgsizes) if neg and neg.pgsizes else 4096
        if (p.address | p.size | p.offset) % page:
            raise DeviceError(f"DMA region not aligned to {page} bytes", errno.EINVAL)
        region = DmaRegion(p.address, p.size, bool(p.flags & wire.DmaMapFlags.READ),
                           bool(p.flags & wire.DmaMapFlags.WRITE), fd, p.offset)
        s.dma.add(region)
    except VfioUserError:
        close_fds(req.fds)
        raise
    try:
        s.device.dma_map(region)
    except BaseException:
        s.dma.remove(region.iova, region.size)
        raise
    return NOTHING


def _dma_unmap(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.DmaUnmap)
    if p.flags & wire.DmaUnmapFlags.ALL:
        regions = s.dma.clear()
    else:
        regions = [s.dma.remove(p.address, p.size)]
    for region in regions:
        s._unmap(region)
    return wire.DmaUnmap(wire.DmaUnmap.SIZE, p.flags, p.address, p.size), []


def _device_info(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    d = s.device
    return wire.DeviceInfo(wire.DeviceInfo.SIZE, d.info_flags, d.num_regions, d.num_irqs), []


def _region_info(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.RegionInfo)
    desc = s.region_desc(p.index)
    # A client that can receive no fds (max_msg_fds 0) gets the region
    # without MMAP, as over a transport without fd passing.
    neg = s.conn.negotiated
    mmap = bool(desc.flags & wire.RegionFlags.MMAP and desc.fd is not None
                and s.transport.passes_fds and (neg is None or neg.peer_max_msg_fds > 0))
    flags = desc.flags if mmap else desc.flags & ~wire.RegionFlags.MMAP
    caps = desc.caps if mmap else tuple(c for c in desc.caps
                                        if not isinstance(c, wire.SparseMmapCap))
    full = wire.RegionInfo(0, flags | (wire.RegionFlags.CAPS if caps else 0), p.index, 0,
                           desc.size, desc.fd_offset if mmap else 0, caps)
    need = full.encoded_size
    if need > p.argsz:
        # Too small for the capabilities: the struct alone, with the size
        # needed; the fd comes with the full answer ("Message sizes").
        return wire.RegionInfo(need, flags, p.index, 0, desc.size, full.offset), []
    out = wire.RegionInfo(need, full.flags, p.index, 0, desc.size, full.offset, caps)
    return out, [desc.fd] if mmap and desc.fd is not None else []


def _region_io_fds(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.RegionIoFds)
    s.region_desc(p.index)
    # We offer no ioeventfds: every sub-region is reached by REGION_WRITE.
    return wire.RegionIoFds(wire.RegionIoFds.SIZE, 0, p.index, 0), []


def _irq_info(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.IrqInfo)
    if not 0 <= p.index < s.device.num_irqs:
        raise DeviceError(f"no interrupt index {p.index}", errno.EINVAL)
    desc = s.device.irq(p.index)
    return wire.IrqInfo(wire.IrqInfo.SIZE, desc.flags, p.index, desc.count), []


def _set_irqs(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.SetIrqs)
    try:
        if not 0 <= p.index < s.device.num_irqs:
            raise DeviceError(f"no interrupt index {p.index}", errno.EINVAL)
        count = s.device.irq(p.index).count
        if p.start + p.count > count:
            raise DeviceError(f"vectors {p.start}+{p.count} beyond {count}", errno.EINVAL)
    except VfioUserError:
        close_fds(req.fds)
        raise
    data = p.flags & wire.SET_IRQS_DATA_MASK
    action = p.flags & wire.SET_IRQS_ACTION_MASK
    fds: list[int | None] | None = None
    bools = None
    if data == SetIrqsFlags.DATA_EVENTFD:
        fds = list(req.fds) if req.fds else [None] * p.count
    elif data == SetIrqsFlags.DATA_BOOL:
        bools = p.data
    s.device.set_irqs(p.index, action, p.start, p.count, fds, bools)
    return NOTHING


def _region_access(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.RegionAccess)
    data = s.access_region(req.command, p.offset, p.region, p.count, p.data)
    return wire.REGION_ACCESS.pack(p.offset, p.region, p.count) + data, []


def _write_multi(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.RegionWriteMulti)
    for e in p.entries:
        s.check_access(e.region, e.offset, e.count, _WRITE)
        s.device.region_write(e.region, e.offset, e.data[:e.count])
    return wire.WriteMultiReply(len(p.entries)), []


def _invalidate_guest_memory(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    memory = s.direct_memory
    if memory is None:
        raise DeviceError("no guest memory of the xdev extension to invalidate", errno.ENOTSUP)
    # Copies hold the mapper's lock, so none is half done on a dropped
    # mapping; the next access maps the guest's frames as they are now.
    memory.invalidate()
    s.invalidations += 1
    if s.invalidations <= 20 or s.invalidations % 1000 == 0:
        log.info("guest memory mappings dropped: the guest's memory map changed "
                 "(%d so far)", s.invalidations)
    return NOTHING


def _ioreq_serve(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    if s.ioreq is None:
        raise DeviceError("no ioreq server of the xdev extension to serve", errno.ENOTSUP)
    p = req.payload
    assert isinstance(p, wire.IoreqServe)
    for r in p.ranges:
        size = s.device.region(r.region).size if 0 <= r.region < s.device.num_regions else 0
        if not size or r.region == wire.PciRegion.CONFIG:
            raise DeviceError(f"range {r.start:#x}+{r.size:#x}: no region {r.region} "
                              "to serve", errno.EINVAL)
    s.ioreq.serve(p)
    return NOTHING


def _ioreq_release(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    if s.ioreq is None:
        raise DeviceError("no ioreq server of the xdev extension to release", errno.ENOTSUP)
    s.ioreq.release()
    return NOTHING


def _reset(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    s.device.reset()
    return NOTHING


def _mig_data_read(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.MigData)
    if s.device.mig_state() not in (wire.MigState.PRE_COPY, wire.MigState.STOP_COPY):
        raise DeviceError("MIG_DATA_READ outside PRE_COPY/STOP_COPY", errno.EINVAL)
    data = s.device.mig_data_read(p.size)[:p.size]
    return wire.MigData(wire.MigData.SIZE + len(data), len(data), data), []


def _mig_data_write(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    p = req.payload
    assert isinstance(p, wire.MigData)
    if s.device.mig_state() is not wire.MigState.RESUMING:
        raise DeviceError("MIG_DATA_WRITE outside RESUMING", errno.EINVAL)
    s.device.mig_data_write(p.data)
    return NOTHING


def _feature(s: Session, req: Request) -> tuple[wire.Payload | bytes, list[int]]:
    return handle_feature(s.device, req)


HANDLERS: dict[Command, Handler] = {
    Command.VERSION: _version,
    Command.DMA_MAP: _dma_map,
    Command.DMA_UNMAP: _dma_unmap,
    Command.DEVICE_GET_INFO: _device_info,
    Command.DEVICE_GET_REGION_INFO: _region_info,
    Command.DEVICE_GET_REGION_IO_FDS: _region_io_fds,
    Command.DEVICE_GET_IRQ_INFO: _irq_info,
    Command.DEVICE_SET_IRQS: _set_irqs,
    Command.REGION_READ: _region_access,
    Command.REGION_WRITE: _region_access,
    Command.REGION_WRITE_MULTI: _write_multi,
    Command.DEVICE_RESET: _reset,
    Command.DEVICE_FEATURE: _feature,
    Command.MIG_DATA_READ: _mig_data_read,
    Command.MIG_DATA_WRITE: _mig_data_write,
    Command.XDEV_GUEST_MEMORY_INVALIDATE: _invalidate_guest_memory,
    Command.XDEV_IOREQ_SERVE: _ioreq_serve,
    Command.XDEV_IOREQ_RELEASE: _ioreq_release,
}


def serve_forever(device: Device, listener: socket.socket, **kw: object) -> None:
    """Convenience: Server(device, **kw).serve(listener)."""
    Server(device, **kw).serve(listener)  # type: ignore[arg-type]


def run_in_thread(server: Server, listener: socket.socket) -> threading.Thread:
    t = threading.Thread(target=server.serve, args=(listener,), daemon=True,
                         name="vfio-user-server")
    t.start()
    return t

