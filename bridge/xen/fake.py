"""An in-memory Xen for tests: the :class:`XenBackend` calls plus the hypervisor's side.

The bridge's own tests (and the bridge core's) drive a real
:class:`~bridge.xen.ioreq_server.IoreqServer` against this: pages are
bytearrays (shared, not copied, so the atomics act on them), event
channels are a queue behind a pipe whose read end is the pollable fd, and
guest RAM is one bytearray.  The hypervisor side is :meth:`FakeXen.send`
(a vCPU issues an ioreq), :meth:`FakeXen.push_buffered` (Xen appends to the
buffered ring) and :meth:`FakeXen.kill_domain`.

Not a model of Xen's scheduling: the test calls the server's step between
sending and checking, as a vCPU would wait for the event.

Each process has its own event channel handle in real life; a test with
two parties (the bridge and a device server serving an ioreq server
itself) gives the second its own with :meth:`FakeXen.open_handle`. A
guest-side port can be bound by one party at a time, as in Xen.
"""

from __future__ import annotations

import collections
import errno
import os
from dataclasses import dataclass, field
from typing import Any

import cffi

from bridge.xen import abi
from bridge.xen.errors import DomainGone, XenCallError

_ffi = cffi.FFI()
FAKE_IOREQ_GFN = 0xFEFF0
FAKE_BUFIOREQ_GFN = 0xFEFF1


class FakeMapping:
    """A view of a bytearray, with the address the atomics need."""

    def __init__(self, backing: bytearray, offset: int, length: int) -> None:
        self._cdata = _ffi.from_buffer(backing)  # keeps the address stable and alive
        self._view: memoryview | None = memoryview(backing)[offset:offset + length]
        self._address = int(_ffi.cast("uintptr_t", self._cdata)) + offset
        self.closed = False

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("mapping is closed")
        return self._view

    @property
    def address(self) -> int:
        return self._address

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            self.closed = True


@dataclass
class FakeServer:
    """One ioreq server as the hypervisor sees it."""

    bufioreq: int
    # Frame 0 = buffered page, frame 1 = ioreq page (XENMEM_resource_ioreq_server).
    pages: bytearray = field(default_factory=lambda: bytearray(2 * abi.PAGE_SIZE))
    enabled: bool = False
    pcidevs: set[tuple[int, int, int, int]] = field(default_factory=set)
    ranges: set[tuple[bool, int, int]] = field(default_factory=set)
    buf_remote_port: int = 0

    @property
    def ioreq_page(self) -> memoryview:
        return memoryview(self.pages)[abi.PAGE_SIZE:]

    @property
    def buf_page(self) -> memoryview:
        return memoryview(self.pages)[:abi.PAGE_SIZE]


class FakeXen:
    """A :class:`~bridge.xen.backend.XenBackend` for one guest, in memory."""

    def __init__(self, domid: int = 7, vcpus: int = 2, ram_pages: int = 1024,
                 *, resource_mapping: bool = True) -> None:
        self.domid = domid
        self.vcpus = vcpus
        self.ram_pages = ram_pages
        self.resource_mapping = resource_mapping
        # Slack past the end keeps bucket-sized mappings contiguous; its pages report errors.
        self.ram = bytearray((ram_pages + 256) * abi.PAGE_SIZE)
        self.holes: set[int] = set()
        self.servers: dict[int, FakeServer] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.alive = True
        self.intx: dict[tuple[int, int, int, int], int] = {}
        self.msis: list[tuple[int, int]] = []
        self.maps: list[FakeMapping] = []
        # Event channels: local port -> remote port, and which handle bound
        # it; each handle's pending queue and pipe for poll().
        self.bound: dict[int, int] = {}
        self.owner: dict[int, FakeXen | FakeHandle] = {}
        self.masked: set[int] = set()
        # Loopback pairs in this domain (bind_unbound_port(DOMID_SELF) and
        # bind_interdomain(DOMID_SELF, it)): each local port to its peer.
        self.loop: dict[int, int] = {}
        self.unbound: set[int] = set()
        self.notified: list[int] = []
        self._pending: collections.deque[int] = collections.deque()
        self._next_port = 1
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self.handles: list[FakeHandle] = []

    def open_handle(self) -> FakeHandle:
        """Another process's view: its own event channel handle, the same Xen."""
        handle = FakeHandle(self)
        self.handles.append(handle)
        return handle

    # -- helpers ----------------------------------------------------------
    def _live(self, domid: int) -> None:
        if not self.alive or domid != self.domid:
            raise DomainGone("fake", errno.ESRCH, f"domain {domid}")

    def _server(self, domid: int, server: int) -> FakeServer:
        self._live(domid)
        if server not in self.servers:
            raise XenCallError("fake", errno.ENOENT, f"no ioreq server {server}")
        return self.servers[server]

    @staticmethod
    def vp_eport(vcpu: int, server: int = 1) -> int:
        """The guest-side port Xen allocated for ``vcpu`` of ioreq ``server``."""
        return 100 + 16 * (server - 1) + vcpu

    # -- libxendevicemodel ---------------------------------------------------
    def create_ioreq_server(self, domid: int, handle_bufioreq: int) -> int:
        self._live(domid)
        if len(self.servers) >= 7:  # MAX_NR_IOREQ_SERVERS minus the default server
            raise XenCallError("fake", errno.ENOSPC)
        sid = len(self.servers) + 1
        self.servers[sid] = FakeServer(handle_bufioreq, buf_remote_port=90 + sid)
        self.calls.append(("create", sid, handle_bufioreq))
        return sid

    def get_ioreq_server_info(self, domid: int, server: int, want_gfns: bool,
                              want_buffered: bool
                              ) -> tuple[int | None, int | None, int | None]:
        srv = self._server(domid, server)
        self.calls.append(("info", server, want_gfns))
        port = srv.buf_remote_port if want_buffered else None
        if not want_gfns:
            return None, None, port
        return FAKE_IOREQ_GFN, FAKE_BUFIOREQ_GFN if want_buffered else None, port

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None:
        srv = self._server(domid, server)
        srv.enabled = enabled
        if enabled:
            # Xen fills in each vCPU's port when it enables the server
            # (hvm_update_ioreq_evtchn); before that the page holds zeros.
            for vcpu in range(self.vcpus):
                raw = abi.RawIoreq(0, 0, 0, 0, self.vp_eport(vcpu, server), 0, 0, 0, 0, 0, 0, 0)
                abi.ioreq_slot(srv.ioreq_page, vcpu)[:] = abi.pack_ioreq(raw)
        self.calls.append(("set_state", server, enabled))

    def destroy_ioreq_server(self, domid: int, server: int) -> None:
        self._server(domid, server)
        del self.servers[server]
        self.calls.append(("destroy", server))

    def map_io_range(self, domid: int, server: int, is_mmio: bool, start: int,
                     end: int) -> None:
        self._server(domid, server).ranges.add((is_mmio, start, end))

    def unmap_io_range(self, domid: int, server: int, is_mmio: bool, start: int,
                       end: int) -> None:
        self._server(domid, server).ranges.discard((is_mmio, start, end))

    def map_pcidev(self, domid: int, server: int, segment: int, bus: int, device: int,
                   function: int) -> None:
        self._server(domid, server).pcidevs.add((segment, bus, device, function))

    def unmap_pcidev(self, domid: int, server: int, segment: int, bus: int, device: int,
                     function: int) -> None:
        self._server(domid, server).pcidevs.discard((segment, bus, device, function))

    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int,
                           intx: int, level: int) -> None:
        self._live(domid)
        self.intx[(segment, bus, device, intx)] = level

    def inject_msi(self, domid: int, addr: int, data: int) -> None:
        self._live(domid)
        self.msis.append((addr, data))

    def nr_vcpus(self, domid: int) -> int:
        self._live(domid)
        return self.vcpus

    # -- libxenforeignmemory -------------------------------------------------
    def map_resource(self, domid: int, rtype: int, rid: int, frame: int,
                     nr_frames: int) -> FakeMapping:
        if not self.resource_mapping:
            raise XenCallError("xenforeignmemory_map_resource", errno.EOPNOTSUPP)
        srv = self._server(domid, rid)
        if rtype != abi.XENMEM_RESOURCE_IOREQ_SERVER or frame + nr_frames > 2:
            raise XenCallError("fake", errno.EINVAL)
        mapping = FakeMapping(srv.pages, frame * abi.PAGE_SIZE, nr_frames * abi.PAGE_SIZE)
        self.maps.append(mapping)
        return mapping

    def map_foreign(self, domid: int, gfns: list[int]) -> tuple[FakeMapping, list[int]]:
        self._live(domid)
        for gfn, page in ((FAKE_IOREQ_GFN, 1), (FAKE_BUFIOREQ_GFN, 0)):
            if gfns == [gfn] and not self.resource_mapping:
                srv = self.servers[max(self.servers)]
                mapping = FakeMapping(srv.pages, page * abi.PAGE_SIZE, abi.PAGE_SIZE)
                self.maps.append(mapping)
                return mapping, [0]
        first = gfns[0]
        if gfns != list(range(first, first + len(gfns))):
            raise XenCallError("fake", errno.EINVAL, "fake maps contiguous gfns only")
        if (first + len(gfns)) * abi.PAGE_SIZE > len(self.ram):
            raise XenCallError("xenforeignmemory_map", errno.EFAULT)
        errs = [errno.ENOENT if g >= self.ram_pages or g in self.holes else 0 for g in gfns]
        mapping = FakeMapping(self.ram, first * abi.PAGE_SIZE, len(gfns) * abi.PAGE_SIZE)
        self.maps.append(mapping)
        return mapping, errs

    # -- libxenevtchn ----------------------------------------------------------
    def evtchn_fd(self) -> int:
        return self._rfd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self._bind(self, domid, remote_port)

    def bind_unbound_port(self, domid: int) -> int:
        return self._bind_unbound(self, domid)

    def _bind_unbound(self, owner: FakeXen | FakeHandle, domid: int) -> int:
        if domid != abi.DOMID_SELF:
            raise XenCallError("fake", errno.EINVAL, "only loopback ports are modelled")
        port = self._new_port(owner)
        self.unbound.add(port)
        return port

    def _new_port(self, owner: FakeXen | FakeHandle) -> int:
        port = self._next_port
        self._next_port += 1
        self.owner[port] = owner
        return port

    def _bind(self, owner: FakeXen | FakeHandle, domid: int, remote_port: int) -> int:
        if domid == abi.DOMID_SELF:
            if remote_port not in self.unbound:
                raise XenCallError("xenevtchn_bind_interdomain", errno.EINVAL)
            self.unbound.discard(remote_port)
            port = self._new_port(owner)
            self.loop[port], self.loop[remote_port] = remote_port, port
            self._deliver(port)  # Xen marks a newly bound port pending
            return port
        self._live(domid)
        if remote_port in self.bound.values():
            # Xen's evtchn_bind_interdomain: the remote port is not unbound.
            raise XenCallError("xenevtchn_bind_interdomain", errno.EINVAL)
        port = self._new_port(owner)
        self.bound[port] = remote_port
        return port

    def unbind(self, port: int) -> None:
        self._unbind(self, port)

    def _unbind(self, owner: FakeXen | FakeHandle, port: int) -> None:
        if self.owner.get(port) is not owner:
            raise XenCallError("xenevtchn_unbind", errno.EINVAL)
        del self.owner[port]
        self.unbound.discard(port)
        peer = self.loop.pop(port, None)
        if peer is not None:
            del self.loop[peer]
            self.unbound.add(peer)  # Xen leaves the other end unbound
        else:
            self.bound.pop(port, None)

    def pending(self) -> int | None:
        try:
            os.read(self._rfd, 1)  # one byte per queued port; waits if the fd blocks
        except BlockingIOError:
            return None
        port = self._pending.popleft()
        self.masked.add(port)  # the kernel masks a port when it reports it
        return port

    def unmask(self, port: int) -> None:
        self.masked.discard(port)

    def notify(self, port: int) -> None:
        if port in self.loop:
            self._deliver(self.loop[port])
            return
        if port not in self.bound:
            raise XenCallError("xenevtchn_notify", errno.EINVAL)
        self.notified.append(port)

    def _deliver(self, local: int) -> None:
        """Make ``local`` pending for whoever has it bound."""
        owner = self.owner[local]
        owner._pending.append(local)
        os.write(owner._wfd, b"e")

    # -- the hypervisor's side ---------------------------------------------------
    def _fire(self, remote_port: int) -> None:
        for local, remote in self.bound.items():
            if remote == remote_port:
                self._deliver(local)
                return
        raise AssertionError(f"nobody bound remote port {remote_port}")

    def bound_by(self, remote_port: int) -> FakeXen | FakeHandle | None:
        """Who has the guest-side port ``remote_port`` bound, if anyone."""
        for local, remote in self.bound.items():
            if remote == remote_port:
                return self.owner[local]
        return None

    def write_slot(self, server: int, vcpu: int, raw: abi.RawIoreq) -> None:
        """Store ``raw`` as is (hostile values welcome) and signal the vCPU's port."""
        abi.ioreq_slot(self.servers[server].ioreq_page, vcpu)[:] = abi.pack_ioreq(raw)
        self._fire(self.vp_eport(vcpu, server))

    def send(self, server: int, vcpu: int, typ: abi.IoreqType, direction: abi.IoreqDir,
             addr: int, size: int, data: int = 0, count: int = 1, *,
             data_is_ptr: bool = False, df: bool = False) -> None:
        """A vCPU's access, as Xen would post it."""
        if not self.servers[server].enabled:
            raise AssertionError("Xen sends nothing to a disabled server")
        self.write_slot(server, vcpu, abi.RawIoreq(
            addr, data, count, size, self.vp_eport(vcpu, server), 0, abi.IoreqState.IOREQ_READY,
            int(data_is_ptr), int(direction), int(df), 0, int(typ)))

    def slot(self, server: int, vcpu: int) -> abi.RawIoreq:
        return abi.unpack_ioreq(abi.ioreq_slot(self.servers[server].ioreq_page, vcpu))

    def push_buffered(self, server: int, entries: list[bytes], *, signal: bool = True) -> None:
        """Append raw slots at write_pointer, then advance it (Xen's order)."""
        page = self.servers[server].buf_page
        wp = int.from_bytes(page[4:8], "little")
        for i, entry in enumerate(entries):
            off = abi.buf_slot_offset(wp + i)
            page[off:off + abi.BUF_IOREQ_SIZE] = entry
        page[4:8] = ((wp + len(entries)) & 0xFFFFFFFF).to_bytes(4, "little")
        if signal:
            self._fire(self.servers[server].buf_remote_port)

    def set_ring_pointers(self, server: int, read: int, write: int) -> None:
        page = self.servers[server].buf_page
        page[0:4] = (read & 0xFFFFFFFF).to_bytes(4, "little")
        page[4:8] = (write & 0xFFFFFFFF).to_bytes(4, "little")

    def ring_pointers(self, server: int) -> tuple[int, int]:
        page = self.servers[server].buf_page
        return int.from_bytes(page[0:4], "little"), int.from_bytes(page[4:8], "little")

    def kill_domain(self) -> None:
        self.alive = False

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        os.close(self._rfd)
        os.close(self._wfd)


class FakeHandle:
    """A second party's handles on a :class:`FakeXen`: everything is the same
    Xen except the event channels, which are its own (bound ports, pending
    queue, pollable fd)."""

    def __init__(self, xen: FakeXen) -> None:
        self.xen = xen
        self._pending: collections.deque[int] = collections.deque()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.xen, name)

    def evtchn_fd(self) -> int:
        return self._rfd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        return self.xen._bind(self, domid, remote_port)

    def bind_unbound_port(self, domid: int) -> int:
        return self.xen._bind_unbound(self, domid)

    def unbind(self, port: int) -> None:
        self.xen._unbind(self, port)

    def pending(self) -> int | None:
        try:
            os.read(self._rfd, 1)
        except BlockingIOError:
            return None
        port = self._pending.popleft()
        self.xen.masked.add(port)
        return port

    def notify(self, port: int) -> None:
        if self.xen.owner.get(port) is not self:
            raise XenCallError("xenevtchn_notify", errno.EINVAL)
        if port in self.xen.loop:
            self.xen._deliver(self.xen.loop[port])
            return
        self.xen.notified.append(port)

    def exit(self) -> None:
        """The process died: the kernel closes its ports."""
        for port in [p for p, o in self.xen.owner.items() if o is self]:
            self.xen._unbind(self, port)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._rfd)
            os.close(self._wfd)
