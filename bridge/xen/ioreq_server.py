"""A secondary ioreq server for one guest: life cycle and request loop.

Theory of operation (public/hvm/dm_op.h, public/hvm/ioreq.h, public/memory.h):

1. ``start``: create the server (``HVM_IOREQSRV_BUFIOREQ_ATOMIC`` when
   libatomic gives us an atomic add, else without a buffered ring), map its
   pages with ``xenforeignmemory_map_resource`` (frame 0 = buffered ring,
   frame 1 = the ``shared_iopage_t``) or, where the hypervisor lacks
   resource mapping, through the gfns ``get_ioreq_server_info`` returns;
   enable it; bind each vCPU's ``vp_eport`` and the buffered port.
2. ``claim_pci`` / ``claim_range`` route a PCI function, or a port or MMIO
   range (end inclusive), to us; only requests entirely inside a claimed
   range come here (dm_op.h).
3. Each request (``handle_events``): a port fires; unmask it; the vCPU's
   slot must be IOREQ_READY; barrier; take one private snapshot of the slot
   (the guest may be able to write the page, XSA-199, so fields are read
   once and validated); mark INPROCESS; perform it through the
   :class:`IoHandler`; store the data; barrier; mark IORESP_READY; notify.
   An invalid request or a failing handler completes as an unanswered
   access: reads return all-ones, writes are dropped; it is logged (rate
   limited) and counted.
4. The buffered ring (``poll_buffered``, on its port and on a 100 ms timer
   as QEMU does): writes only, consumed between ``read_pointer`` and
   ``write_pointer``, the read pointer advanced atomically; inconsistent
   pointers are resynchronised, never followed.
5. ``close``: disable, unbind, unmap, destroy (Xen drops the claims with
   the server).  Tolerates a guest that has already died.

The bridge core owns the loop: either call :meth:`run`, or put
:meth:`fileno` into its own selector and call :meth:`handle_events` when
readable and :meth:`poll_buffered` at least every 100 ms.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge.xen import abi
from bridge.xen.abi import Ioreq, IoreqDir, IoreqState, IoreqType, Sbdf
from bridge.xen.atomics import Atomics
from bridge.xen.backend import SharedMapping, XenBackend
from bridge.xen.dispatch import execute
from bridge.xen.errors import (
    DomainGone,
    GuestError,
    RingError,
    XenCallError,
    XenError,
)
from bridge.xen.guestmem import GuestMemory
from bridge.xen.handler import IoHandler

BUFFERED_POLL_INTERVAL = 0.1  # QEMU's BUFFER_IO_MAX_DELAY (100 ms)
MAX_EVENTS_PER_STEP = 1024
_FALLBACK_ERRNOS = {errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY}
_U64 = struct.Struct("<Q")
# The fast path's view of byte 30 and the fields (abi.unpack_ioreq's layout).
_COPY = int(IoreqType.COPY)
_PTR_BIT, _DIR_READ_BIT = 1 << 4, 1 << 5
_MMIO_SIZES = frozenset((1, 2, 4, 8))
_ADDR_LIMIT = 1 << 64
# The state nibble of byte 30 (abi.state_of/with_state, written out for the loop).
_STATE_AT, _STATE_MASK = abi.IOREQ_STATE_OFFSET, abi.state_of(0xFF)
_OTHER_BITS = 0xFF & ~_STATE_MASK
_IOREQ_READY, _IOREQ_INPROCESS = int(IoreqState.IOREQ_READY), int(IoreqState.IOREQ_INPROCESS)
_IORESP_READY = int(IoreqState.IORESP_READY)

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    handled: int = 0
    buffered: int = 0
    invalid: int = 0
    handler_errors: int = 0
    spurious: int = 0
    invalidations: int = 0  # IOREQ_TYPE_INVALIDATE: the guest's physmap shrank
    #: CPU seconds the serving thread used in :meth:`IoreqServer.run` (set when it ends)
    cpu_seconds: float = 0.0


class IoreqServer:
    """One ioreq server of ``domid``, answering through ``handler``."""

    def __init__(self, xen: XenBackend, domid: int, handler: IoHandler, *,
                 memory: GuestMemory | None = None, atomics: Atomics | None = None,
                 nr_vcpus: int | None = None, buffered: bool = True,
                 attach_id: int | None = None) -> None:
        """``attach_id``: serve an ioreq server someone else (in this
        domain) created and enabled, rather than creating one: map its page
        and bind its ports; :meth:`close` then only unbinds and unmaps.
        Without a buffered ring (Xen sends buffered requests for the legacy
        VGA range only)."""
        self._xen = xen
        self.domid = domid
        self._handler = handler
        self._memory = memory
        self._atomics = atomics if atomics is not None else Atomics.load()
        self._barrier = self._atomics.rw_barrier
        self._nr_vcpus = nr_vcpus
        self._attach_id = attach_id
        self._want_buffered = buffered and self._atomics.atomic and attach_id is None
        if buffered and attach_id is None and not self._atomics.atomic:
            log.warning("libatomic.so.1 not found: ioreq server without a buffered ring")
        self.id: int | None = None
        self.stats = ServerStats()
        self.time_offset = 0  # last TIMEOFFSET (seconds, signed), for an RTC model
        self.legacy_gfn_mapping = False
        self._mappings: list[SharedMapping] = []
        self._page_view: memoryview | None = None
        self._slots: list[memoryview] = []  # each vCPU's slot of it
        self._buf_map: SharedMapping | None = None
        self._vcpu_ports: list[int] = []
        self._port_vcpu: dict[int, int] = {}
        self._remote_ports: list[int] = []  # each vCPU's, read once from the page
        self._buf_remote: int | None = None
        self._buf_port: int | None = None
        self._adopted: dict[int, IoreqServer] = {}  # port -> another server we serve
        # One request at a time per server: the loop of the server that
        # adopted us and a takeover's scan may both look at a slot.
        self._slot_lock = threading.Lock()
        self._wake_lock = threading.Lock()
        self._wake_ports: tuple[int, ...] = ()  # run()'s loopback pair: (listen, kick)
        self._claims: set[tuple[str, int, int]] = set()
        self._enabled = False
        self.closed = False

    # -- life cycle ------------------------------------------------------------
    def start(self, bind: bool = True) -> None:
        """Create, map, enable and (``bind``) bind; on failure everything done
        is undone. In attach mode: map and bind."""
        vcpus = self._nr_vcpus if self._nr_vcpus is not None else self._xen.nr_vcpus(self.domid)
        if not 1 <= vcpus <= abi.MAX_VCPUS_PER_PAGE:
            raise XenError(f"domain {self.domid} has {vcpus} vCPUs; one ioreq page holds "
                           f"{abi.MAX_VCPUS_PER_PAGE}")
        if self._attach_id is not None:
            self.id = self._attach_id
        else:
            mode = abi.BufioreqMode.ATOMIC if self._want_buffered else abi.BufioreqMode.OFF
            self.id = self._xen.create_ioreq_server(self.domid, mode)
        try:
            self._buf_remote = self._map_pages()
            if self._attach_id is None:
                self._xen.set_ioreq_server_state(self.domid, self.id, True)
                self._enabled = True
            # Xen writes each vCPU's port into the page when the server is
            # enabled. Read once, at set-up: later values are not trusted.
            page = self._page()
            self._remote_ports = [
                struct.unpack_from("<I", page, vcpu * abi.IOREQ_SIZE
                                   + abi.IOREQ_VP_EPORT_OFFSET)[0] for vcpu in range(vcpus)]
            if 0 in self._remote_ports:  # port 0 is never allocated
                raise XenError(f"ioreq server {self.id} of domain {self.domid} has no event "
                               f"channel for vCPU {self._remote_ports.index(0)}: not enabled?")
            if bind:
                self.bind_ports()
        except BaseException:
            self.close()
            raise
        log.info("ioreq server %d for domain %d%s: %d vCPUs, buffered ring %s%s", self.id,
                 self.domid, " (attached)" if self._attach_id is not None else "", vcpus,
                 "on" if self._buf_map else "off",
                 " (legacy gfn mapping: guest-writable pages)" if self.legacy_gfn_mapping else "")

    @property
    def bound(self) -> bool:
        return bool(self._vcpu_ports)

    def bind_ports(self, scan: bool = True) -> None:
        """Bind the vCPUs' ports (and the buffered ring's), then (``scan``)
        look at every slot once: an event sent while nobody had them bound
        is lost. Fails (XenCallError) while someone else has them bound;
        nothing stays bound then."""
        if self.bound or self.closed:
            return
        try:
            for vcpu, remote in enumerate(self._remote_ports):
                local = self._xen.bind_interdomain(self.domid, remote)
                self._vcpu_ports.append(local)
                self._port_vcpu[local] = vcpu
            if self._buf_map is not None and self._buf_remote is not None:
                self._buf_port = self._xen.bind_interdomain(self.domid, self._buf_remote)
        except BaseException:
            self.unbind_ports()
            raise
        if scan:
            self.scan()

    def scan(self) -> int:
        """Serve every slot that holds a request, whether or not its event came."""
        return sum(self._handle_vcpu(vcpu) for vcpu in range(len(self._remote_ports)))

    def unbind_ports(self) -> None:
        """Let go of the ports (someone else is to serve this server)."""
        ports = [*self._vcpu_ports, *([self._buf_port] if self._buf_port else [])]
        self._vcpu_ports, self._port_vcpu, self._buf_port = [], {}, None
        for port in ports:
            self._teardown_step("unbind", functools.partial(self._xen.unbind, port))

    def adopt(self, other: IoreqServer) -> None:
        """Serve ``other``'s ports from this server's loop (one event channel
        handle per process: its events arrive here)."""
        for port in other.ports:
            self._adopted[port] = other

    def disown(self, other: IoreqServer) -> None:
        for port in [p for p, s in self._adopted.items() if s is other]:
            del self._adopted[port]

    @property
    def ports(self) -> tuple[int, ...]:
        return (*self._vcpu_ports, *([self._buf_port] if self._buf_port else []))

    def answer_abandoned(self) -> int:
        """Complete, as unanswered accesses, requests another server took
        (IOREQ_INPROCESS) and never answered: it died. Call with our ports
        bound; returns how many there were."""
        if self._ioreq_page is None or not self.bound:
            return 0
        done = 0
        with self._slot_lock:
            for vcpu in range(len(self._remote_ports)):
                slot = abi.ioreq_slot(self._ioreq_page, vcpu)
                bits = slot[abi.IOREQ_STATE_OFFSET]
                if abi.state_of(bits) != IoreqState.IOREQ_INPROCESS:
                    continue
                self._atomics.fence()
                value = self._unanswered(abi.unpack_ioreq(bytes(slot)))
                if value is not None:
                    _U64.pack_into(slot, abi.IOREQ_DATA_OFFSET, value)
                self._atomics.fence()
                slot[abi.IOREQ_STATE_OFFSET] = abi.with_state(bits, IoreqState.IORESP_READY)
                self._xen.notify(self._vcpu_ports[vcpu])
                done += 1
        if done:
            log.warning("ioreq server %d: %d requests its server left unanswered completed "
                        "as all-ones", self.id, done)
        return done

    @property
    def _ioreq_page(self) -> memoryview | None:
        """The mapped ``shared_iopage_t`` (None when not mapped)."""
        return self._page_view

    @_ioreq_page.setter
    def _ioreq_page(self, page: memoryview | None) -> None:
        self._page_view = page
        self._slots = [] if page is None else [abi.ioreq_slot(page, v) for v in
                                               range(len(page) // abi.IOREQ_SIZE)]

    def _map_pages(self) -> int | None:
        """Map the ioreq page (and ring); return the buffered ring's remote port."""
        assert self.id is not None
        buffered = self._want_buffered
        first = abi.XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ if buffered else 1
        try:
            mapping = self._xen.map_resource(self.domid, abi.XENMEM_RESOURCE_IOREQ_SERVER,
                                             self.id, first, 2 if buffered else 1)
        except XenCallError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
            return self._map_pages_by_gfn()
        self._mappings.append(mapping)
        if buffered:
            self._buf_map = mapping
            self._ioreq_page = mapping.view[abi.PAGE_SIZE:2 * abi.PAGE_SIZE]
        else:
            self._ioreq_page = mapping.view[:abi.PAGE_SIZE]
        _, _, port = self._xen.get_ioreq_server_info(self.domid, self.id, False, buffered)
        return port

    def _map_pages_by_gfn(self) -> int | None:
        """Hypervisors without XENMEM_acquire_resource: map the gfns Xen names."""
        assert self.id is not None
        buffered = self._want_buffered
        gfn, bgfn, port = self._xen.get_ioreq_server_info(self.domid, self.id, True, buffered)
        self.legacy_gfn_mapping = True
        pages = [gfn] + ([bgfn] if buffered else [])
        for i, frame in enumerate(pages):
            if frame is None:
                raise XenError("get_ioreq_server_info returned no gfn")
            mapping, errs = self._xen.map_foreign(self.domid, [frame])
            self._mappings.append(mapping)
            if errs[0]:
                raise XenCallError("xenforeignmemory_map", errs[0], f"ioreq gfn {frame:#x}")
            if i == 0:
                self._ioreq_page = mapping.view[:abi.PAGE_SIZE]
            else:
                self._buf_map = mapping
        return port

    def _page(self) -> memoryview:
        if self._ioreq_page is None:
            raise XenError("ioreq server is not started")
        return self._ioreq_page

    def close(self) -> None:
        """Disable, unbind, unmap and destroy; idempotent, tolerant of a dead guest."""
        if self.closed:
            return
        self.closed = True
        sid = self.id
        if sid is not None and self._enabled:
            self._teardown_step("disable", lambda: self._xen.set_ioreq_server_state(
                self.domid, sid, False))
        self.unbind_ports()
        self._adopted.clear()
        self._ioreq_page = None
        self._buf_map = None
        for mapping in self._mappings:
            mapping.close()
        self._mappings.clear()
        if sid is not None and self._attach_id is None:
            self._teardown_step("destroy",
                                lambda: self._xen.destroy_ioreq_server(self.domid, sid))
        self._claims.clear()

    def _teardown_step(self, name: str, step: Callable[[], None]) -> None:
        try:
            step()
        except DomainGone:
            log.info("ioreq server %s: %s skipped, domain %d is gone", self.id, name, self.domid)
        except XenCallError as exc:
            # ENOENT: the server went with a dying domain before we got to it.
            level = logging.INFO if exc.errno == errno.ENOENT else logging.WARNING
            log.log(level, "ioreq server %s: %s failed: %s", self.id, name, exc)
        except XenError as exc:
            log.warning("ioreq server %s: %s failed: %s", self.id, name, exc)

    def __enter__(self) -> IoreqServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- claims ------------------------------------------------------------------
    def claim_pci(self, sbdf: Sbdf) -> None:
        """Route config accesses of one PCI function here (map_pcidev_to_ioreq_server)."""
        self._xen.map_pcidev(self.domid, self._sid(), sbdf.segment, sbdf.bus, sbdf.device,
                             sbdf.function)
        self._claims.add(("pci", sbdf.to_int(), 0))

    def release_pci(self, sbdf: Sbdf) -> None:
        self._xen.unmap_pcidev(self.domid, self._sid(), sbdf.segment, sbdf.bus, sbdf.device,
                               sbdf.function)
        self._claims.discard(("pci", sbdf.to_int(), 0))

    def claim_range(self, mmio: bool, start: int, end: int) -> None:
        """Route ports or MMIO ``[start, end]`` (end inclusive, as Xen takes it) here."""
        self._check_range(mmio, start, end)
        self._xen.map_io_range(self.domid, self._sid(), mmio, start, end)
        self._claims.add(("mmio" if mmio else "pio", start, end))

    def release_range(self, mmio: bool, start: int, end: int) -> None:
        self._check_range(mmio, start, end)
        self._xen.unmap_io_range(self.domid, self._sid(), mmio, start, end)
        self._claims.discard(("mmio" if mmio else "pio", start, end))

    @property
    def claims(self) -> frozenset[tuple[str, int, int]]:
        return frozenset(self._claims)

    @staticmethod
    def _check_range(mmio: bool, start: int, end: int) -> None:
        limit = (1 << 64) - 1 if mmio else abi.PIO_PORT_LIMIT - 1
        if not 0 <= start <= end <= limit:
            raise ValueError(f"bad {'MMIO' if mmio else 'port'} range [{start:#x}, {end:#x}]")

    def _sid(self) -> int:
        if self.id is None or self.closed:
            raise XenError("ioreq server is not running")
        return self.id

    # -- the loop ------------------------------------------------------------------
    def fileno(self) -> int:
        """The event channel fd: readable when a port is pending."""
        return self._xen.evtchn_fd()

    def handle_events(self, most: int = MAX_EVENTS_PER_STEP) -> int:
        """Serve up to ``most`` pending ports; return how many requests were completed."""
        done = 0
        for _ in range(most):
            if self.closed:
                break
            port = self._xen.pending()
            if port is None:
                break
            self._xen.unmask(port)
            vcpu = self._port_vcpu.get(port)
            done += self._handle_vcpu(vcpu) if vcpu is not None else self._other_port(port)
        return done

    def _other_port(self, port: int) -> int:
        """An event on a port other than a vCPU's."""
        if port == self._buf_port:
            return self.poll_buffered()
        if port in self._adopted:
            return self._adopted[port].handle_port(port)
        log.debug("event on unknown port %d", port)
        return 0

    def handle_port(self, port: int) -> int:
        """One event on one of our ports (when another server's loop took it)."""
        if port == self._buf_port:
            return self.poll_buffered()
        vcpu = self._port_vcpu.get(port)
        return self._handle_vcpu(vcpu) if vcpu is not None else 0

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (then call :meth:`wake`), the server is
        closed or the domain dies; closes the server on the way out.

        While it runs, this loop is the server's only server and owns the
        handle's event channel fd: nothing else may call handle_events,
        handle_port or scan on it, nor adopt it (a device server's own
        ioreq server, bridge.direct, is used so). That spares the slot lock,
        which in Python 3.11 costs a clock read per acquisition, a system
        call in a dom0 without a vDSO clock (Xen PV on a host without a
        stable TSC, as under emulation).

        Without a buffered ring nothing is due on a timer, so the loop waits
        in a blocking read of the fd, which returns the next port: one
        system call per request fewer than poll and read. wake() notifies a
        loopback event channel pair of ours to end that wait. With a
        buffered ring, or where no loopback pair can be bound (a handle
        already restricted to the guest by xentoolcore_restrict_all may not
        bind one), it polls with the ring's 100 ms timer and looks at
        ``stop`` at least that often.
        """
        cpu = time.thread_time()
        try:
            if self._buf_map is None and self._open_wake():
                self._run_blocking(stop)
            else:
                self._run_polling(stop)
        except DomainGone:
            log.info("domain %d is gone; tearing down ioreq server %s", self.domid, self.id)
        finally:
            self.stats.cpu_seconds = time.thread_time() - cpu
            self._close_wake()
            self.close()

    def _run_blocking(self, stop: threading.Event) -> None:
        # handle_events(1) written out, the wait being the read itself: this
        # loop is every register access's way through the process.
        fd = self.fileno()
        wake_ports = self._wake_ports
        pending, unmask = self._xen.pending, self._xen.unmask
        os.set_blocking(fd, True)
        try:
            while not stop.is_set() and not self.closed:
                port = pending()
                if port is None:
                    continue
                unmask(port)
                vcpu = self._port_vcpu.get(port)
                if vcpu is not None:
                    self._handle_vcpu_locked(vcpu)
                elif port not in wake_ports:
                    self._other_port(port)
        finally:
            os.set_blocking(fd, False)

    def _run_polling(self, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        timeout = int(BUFFERED_POLL_INTERVAL * 1000)
        while not stop.is_set() and not self.closed:
            # One port per wake-up: poll says whether more are pending,
            # which spares the read that would find none after the last.
            if poller.poll(timeout):
                self.handle_events(1)
            if self._buf_map is not None:
                self.poll_buffered()

    def _open_wake(self) -> bool:
        """Bind the loopback pair wake() notifies; False if Xen will not."""
        xen = self._xen
        try:
            listen = xen.bind_unbound_port(abi.DOMID_SELF)
            try:
                kick = xen.bind_interdomain(abi.DOMID_SELF, listen)
            except XenError:
                xen.unbind(listen)
                raise
        except XenError as exc:
            log.info("ioreq server %s: no loopback event channel (%s); polling", self.id, exc)
            return False
        with self._wake_lock:
            self._wake_ports = (listen, kick)
        return True

    def _close_wake(self) -> None:
        with self._wake_lock:
            ports, self._wake_ports = self._wake_ports, ()
        for port in ports:
            try:
                self._xen.unbind(port)
            except XenError as exc:
                log.info("ioreq server %s: unbinding wake port %d: %s", self.id, port, exc)

    def wake(self) -> None:
        """Have :meth:`run` look at its ``stop`` event now."""
        with self._wake_lock:
            if self._wake_ports:
                try:
                    self._xen.notify(self._wake_ports[1])
                except XenError as exc:
                    log.warning("ioreq server %s: wake-up not sent: %s", self.id, exc)

    def _complain(self, what: str, exc: Exception) -> None:
        n = self.stats.invalid + self.stats.handler_errors
        if n <= 20 or n % 1000 == 0:
            log.warning("domain %d: %s (%d so far): %s", self.domid, what, n, exc)

    def _perform(self, req: Ioreq) -> int | None:
        if req.type is IoreqType.INVALIDATE:
            self.stats.invalidations += 1
            n = self.stats.invalidations
            if n <= 20 or n % 1000 == 0:  # a ballooning guest sends them by the thousand
                log.info("domain %d: INVALIDATE (%d so far): guest memory mappings dropped",
                         self.domid, n)
            if self._memory is not None:
                self._memory.invalidate()
            self._handler.invalidate()
            return None
        if req.type is IoreqType.TIMEOFFSET:
            self.time_offset = req.data - (1 << 64) if req.data >> 63 else req.data
            log.debug("domain %d: time offset %d", self.domid, self.time_offset)
            return None
        return execute(req, self._handler, self._memory)

    def _handle_vcpu(self, vcpu: int) -> int:
        """Serve ``vcpu``'s slot if it holds a request; 1 if one was completed."""
        with self._slot_lock:
            return self._handle_vcpu_locked(vcpu)

    def _handle_vcpu_locked(self, vcpu: int) -> int:
        slots = self._slots
        if vcpu >= len(slots) or vcpu >= len(self._vcpu_ports):
            return 0
        slot = slots[vcpu]
        if slot[_STATE_AT] & _STATE_MASK != _IOREQ_READY:
            self.stats.spurious += 1
            return 0
        if self._barrier is not None:
            self._barrier()  # rmb: the fields were written before the state
        snapshot = bytes(slot)
        bits = snapshot[_STATE_AT]
        slot[_STATE_AT] = bits & _OTHER_BITS | _IOREQ_INPROCESS
        value: int | None
        raw: abi.RawIoreq | None = None
        try:
            addr, data, count, size, _, _, _, typ = abi.IOREQ_STRUCT.unpack(snapshot)
            if typ == _COPY and count == 1 and not bits & _PTR_BIT and size in _MMIO_SIZES \
                    and addr + size <= _ADDR_LIMIT:
                # A plain register access, nearly every request: checked here
                # exactly as validate() would check it, without its objects.
                mask = (1 << (8 * size)) - 1
                if bits & _DIR_READ_BIT:
                    value = self._handler.mmio_read(addr, size) & mask
                else:
                    self._handler.mmio_write(addr, size, data & mask)
                    value = None
            else:
                raw = abi.unpack_ioreq(snapshot)
                value = self._perform(abi.validate(raw))
        except GuestError as exc:
            raw = raw or abi.unpack_ioreq(snapshot)
            self.stats.invalid += 1
            self._complain("invalid ioreq completed as unanswered", exc)
            value = self._unanswered(raw)
        except DomainGone:
            raise
        except Exception as exc:  # a handler bug must not stop the guest's vCPU
            self.stats.handler_errors += 1
            self._complain("handler failed", exc)
            value = self._unanswered(raw or abi.unpack_ioreq(snapshot))
        if value is not None:
            _U64.pack_into(slot, abi.IOREQ_DATA_OFFSET, value)
        if self._barrier is not None:
            self._barrier()  # wmb: data before state
        slot[_STATE_AT] = bits & _OTHER_BITS | _IORESP_READY
        self._xen.notify(self._vcpu_ports[vcpu])
        self.stats.handled += 1
        return 1

    @staticmethod
    def _unanswered(raw: abi.RawIoreq) -> int | None:
        """All-ones for a read returning a value, nothing otherwise."""
        if raw.dir != IoreqDir.READ or raw.data_is_ptr:
            return None
        return abi.size_mask(raw.size) if raw.size in (1, 2, 4, 8) else (1 << 64) - 1

    def poll_buffered(self) -> int:
        """Consume the buffered ring; return the number of requests performed."""
        ring = self._buf_map
        if ring is None or self.closed:
            return 0
        at = self._atomics
        rp = at.load_u32(ring, abi.BUFFERED_READ_POINTER_OFFSET)
        at.fence()
        wp = at.load_u32(ring, abi.BUFFERED_WRITE_POINTER_OFFSET)
        at.fence()
        avail = (wp - rp) & 0xFFFFFFFF
        if avail > abi.IOREQ_BUFFER_SLOT_NUM:
            self.stats.invalid += 1
            self._complain("buffered ring pointers resynchronised",
                           RingError(f"read {rp:#x} write {wp:#x}"))
            at.fetch_add_u32(ring, abi.BUFFERED_READ_POINTER_OFFSET, avail)
            return 0
        done = 0
        view = ring.view
        while avail:
            off = abi.buf_slot_offset(rp)
            first = bytes(view[off:off + abi.BUF_IOREQ_SIZE])
            slots = abi.buf_ioreq_slots(first)
            second = None
            if slots == 2 and avail >= 2:
                off2 = abi.buf_slot_offset(rp + 1)
                second = bytes(view[off2:off2 + abi.BUF_IOREQ_SIZE])
            slots = min(slots, avail)  # a lone half is consumed and rejected
            try:
                self._perform(abi.decode_buf_ioreq(first, second))
                done += 1
            except GuestError as exc:
                self.stats.invalid += 1
                self._complain("invalid buffered ioreq dropped", exc)
            except DomainGone:
                raise
            except Exception as exc:  # a handler bug must not stop the ring
                self.stats.handler_errors += 1
                self._complain("handler failed on a buffered write", exc)
            at.fetch_add_u32(ring, abi.BUFFERED_READ_POINTER_OFFSET, slots)
            rp += slots
            avail -= slots
        self.stats.buffered += done
        return done
