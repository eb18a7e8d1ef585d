"""The ioreq server loop against the in-memory FakeXen: life cycle, requests, ring, teardown."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator

import pytest

from bridge.xen import abi
from bridge.xen.abi import IoreqDir, IoreqState, IoreqType, RawBufIoreq, Sbdf
from bridge.xen.atomics import Atomics
from bridge.xen.errors import XenCallError
from bridge.xen.fake import FakeXen
from bridge.xen.guestmem import GuestMemory
from bridge.xen.ioreq_server import IoreqServer
from tests.bridge.test_cli import wait_for
from tests.bridge.xen.xen_helpers import RecordingHandler

R, W = IoreqDir.READ, IoreqDir.WRITE


@pytest.fixture
def xen() -> Iterator[FakeXen]:
    fake = FakeXen(domid=7, vcpus=2)
    yield fake
    fake.close()


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
def memory(xen: FakeXen) -> GuestMemory:
    return GuestMemory(xen, xen.domid, max_buckets=4)


@pytest.fixture
def server(xen: FakeXen, handler: RecordingHandler, memory: GuestMemory) -> Iterator[IoreqServer]:
    srv = IoreqServer(xen, xen.domid, handler, memory=memory)
    srv.start()
    yield srv
    srv.close()


def sid(server: IoreqServer) -> int:
    assert server.id is not None
    return server.id


def test_start_uses_atomic_ring_resource_mapping_and_binds_every_port(
        xen: FakeXen, server: IoreqServer) -> None:
    assert Atomics.load().atomic, "libatomic.so.1 should be present where the tests run"
    assert ("create", sid(server), abi.BufioreqMode.ATOMIC) in xen.calls
    assert ("info", sid(server), False) in xen.calls  # port only: pages stay out of the physmap
    assert not server.legacy_gfn_mapping
    assert xen.servers[sid(server)].enabled
    assert sorted(xen.bound.values()) == sorted(
        [xen.vp_eport(0), xen.vp_eport(1), xen.servers[sid(server)].buf_remote_port])


def test_mmio_read_goes_through_ready_inprocess_resp_and_notifies(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    handler.values[("mmio", 0xFE000010)] = 0xCAFEBABE_DEADBEEF
    xen.send(sid(server), 1, IoreqType.COPY, R, 0xFE000010, 4)
    assert xen.slot(sid(server), 1).state == IoreqState.IOREQ_READY
    assert server.handle_events() == 1
    slot = xen.slot(sid(server), 1)
    assert slot.state == IoreqState.IORESP_READY
    assert slot.data == 0xDEADBEEF  # masked to the access size
    assert handler.calls == [("mmio_read", 0xFE000010, 4)]
    local = next(p for p, r in xen.bound.items() if r == xen.vp_eport(1))
    assert xen.notified == [local]
    assert local not in xen.masked


def test_writes_pio_and_config(xen: FakeXen, server: IoreqServer,
                               handler: RecordingHandler) -> None:
    xen.send(sid(server), 0, IoreqType.COPY, W, 0xFE000000, 8, data=0x0102030405060708)
    server.handle_events()
    xen.send(sid(server), 0, IoreqType.PIO, W, 0xC000, 2, data=0xFFFF_1234)
    server.handle_events()
    xen.send(sid(server), 0, IoreqType.PIO, R, 0xC002, 1)
    server.handle_events()
    assert xen.slot(sid(server), 0).data == 0x44
    sbdf = Sbdf(0, 0, 5, 0).to_int()
    xen.send(sid(server), 0, IoreqType.PCI_CONFIG, W, (sbdf << 32) | 0x10, 4, data=0xFFFFFFFF)
    server.handle_events()
    xen.send(sid(server), 0, IoreqType.PCI_CONFIG, R, (sbdf << 32) | 0x2, 2)
    server.handle_events()
    assert handler.calls == [
        ("mmio_write", 0xFE000000, 8, 0x0102030405060708),
        ("pio_write", 0xC000, 2, 0x1234),
        ("pio_read", 0xC002, 1),
        ("config_write", sbdf, 0x10, 4, 0xFFFFFFFF),
        ("config_read", sbdf, 0x2, 2),
    ]
    assert server.stats.handled == 5


def test_invalid_request_completes_as_all_ones_without_calling_handler(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    raw = abi.RawIoreq(0x10000, 0, 1, 2, xen.vp_eport(0), 0, IoreqState.IOREQ_READY, 0, R, 0, 0,
                       IoreqType.PIO)  # port beyond 64 KiB
    xen.write_slot(sid(server), 0, raw)
    assert server.handle_events() == 1
    slot = xen.slot(sid(server), 0)
    assert (slot.state, slot.data) == (IoreqState.IORESP_READY, 0xFFFF)
    assert handler.calls == []
    assert server.stats.invalid == 1


@pytest.mark.parametrize("addr, size, df, ptr, ok", [
    ((1 << 64) - 8, 8, 0, 0, True),     # the last quadword: a plain access
    ((1 << 64) - 4, 8, 0, 0, False),    # wraps the address space
    ((1 << 64) - 8, 8, 1, 0, True),     # df means nothing for one element
    (0x1000, 16, 0, 0, False),          # no 16-byte MMIO
    (0x1000, 4, 0, 1, True),            # one element through guest memory
])
def test_single_mmio_accesses_are_checked_like_validate(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler, memory: GuestMemory,
        addr: int, size: int, df: int, ptr: int, ok: bool) -> None:
    """Plain register accesses take a fast path; it must accept and refuse
    exactly what abi.validate does."""
    raw = abi.RawIoreq(addr, 0x2000 if ptr else 0x1122334455667788, 1, size, 0, 0,
                       IoreqState.IOREQ_READY, ptr, R, df, 0, IoreqType.COPY)
    try:
        abi.validate(raw)
        valid = True
    except abi.InvalidIoreq:
        valid = False
    assert valid is ok
    xen.write_slot(sid(server), 0, raw)
    assert server.handle_events() == 1
    assert (server.stats.invalid == 0) is ok
    assert bool(handler.calls) is ok
    if ok:
        assert handler.calls[0][:3] == ("mmio_read", addr, size)


def test_garbage_size_read_returns_64_bit_all_ones(xen: FakeXen, server: IoreqServer) -> None:
    raw = abi.RawIoreq(0x1000, 0, 1, 3, 0, 0, IoreqState.IOREQ_READY, 0, R, 0, 0, IoreqType.COPY)
    xen.write_slot(sid(server), 0, raw)
    server.handle_events()
    assert xen.slot(sid(server), 0).data == (1 << 64) - 1


def test_failing_handler_reads_all_ones_and_loop_continues(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    handler.fail = True
    xen.send(sid(server), 0, IoreqType.COPY, R, 0xFE000000, 2)
    server.handle_events()
    assert xen.slot(sid(server), 0).data == 0xFFFF
    assert server.stats.handler_errors == 1
    handler.fail = False
    xen.send(sid(server), 0, IoreqType.COPY, R, 0xFE000000, 2)
    server.handle_events()
    assert xen.slot(sid(server), 0).data == 0x3344


def test_spurious_event_leaves_slot_alone(xen: FakeXen, server: IoreqServer,
                                          handler: RecordingHandler) -> None:
    raw = abi.RawIoreq(0x1000, 5, 1, 4, 0, 0, IoreqState.IORESP_READY, 0, R, 0, 0, 1)
    xen.write_slot(sid(server), 0, raw)
    assert server.handle_events() == 0
    assert xen.slot(sid(server), 0) == raw
    assert xen.notified == [] and handler.calls == []


def test_rep_ins_stores_each_element_in_guest_memory(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    handler.values[("pio", 0x1F0)] = 0xBEEF
    xen.send(sid(server), 0, IoreqType.PIO, R, 0x1F0, 2, data=0x5000, count=4, data_is_ptr=True)
    server.handle_events()
    assert bytes(xen.ram[0x5000:0x5008]) == b"\xef\xbe" * 4
    assert handler.calls == [("pio_read", 0x1F0, 2)] * 4
    assert xen.slot(sid(server), 0).data == 0x5000  # a pointer is never overwritten


def test_rep_movs_with_direction_flag_walks_down(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    xen.ram[0x6000:0x600C] = bytes(range(12))
    xen.send(sid(server), 0, IoreqType.COPY, W, 0xFE000100, 4, data=0x6008, count=3,
             data_is_ptr=True, df=True)
    server.handle_events()
    assert handler.calls == [("mmio_write", 0xFE000100, 4, 0x0B0A0908),
                             ("mmio_write", 0xFE0000FC, 4, 0x07060504),
                             ("mmio_write", 0xFE0000F8, 4, 0x03020100)]


def test_rep_stos_without_pointer_repeats_the_value(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    xen.send(sid(server), 0, IoreqType.COPY, W, 0xFE000000, 1, data=0xAA, count=3)
    server.handle_events()
    assert [c[1] for c in handler.calls] == [0xFE000000, 0xFE000001, 0xFE000002]


def test_string_into_a_hole_stops_and_completes(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    xen.holes.add(0x7)
    xen.send(sid(server), 0, IoreqType.PIO, R, 0x60, 4, data=0x6FF8, count=4, data_is_ptr=True)
    server.handle_events()
    assert xen.slot(sid(server), 0).state == IoreqState.IORESP_READY
    assert bytes(xen.ram[0x6FF8:0x7000]) == (0x11223344).to_bytes(4, "little") * 2
    assert server.stats.invalid == 1


def test_invalidate_drops_guest_mappings_and_tells_the_handler(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler,
        memory: GuestMemory) -> None:
    memory.read(0x1000, 4)
    assert memory.mapped_buckets == 1
    xen.send(sid(server), 0, IoreqType.INVALIDATE, W, 0, 4, data=(1 << 64) - 1)
    server.handle_events()
    assert memory.mapped_buckets == 0
    assert handler.calls == [("invalidate",)]
    assert xen.slot(sid(server), 0).state == IoreqState.IORESP_READY
    assert server.stats.invalidations == 1


def buf(typ: int, size_log2: int, addr: int, data: int, direction: int = 0) -> bytes:
    return abi.pack_buf_ioreq(RawBufIoreq(typ, 0, direction, size_log2, addr, data))


def test_buffered_ring_writes_and_qword(xen: FakeXen, server: IoreqServer,
                                        handler: RecordingHandler) -> None:
    xen.push_buffered(sid(server), [
        buf(IoreqType.COPY, 0, 0xA0000, 0x5A),
        buf(IoreqType.PIO, 1, 0x3C4, 0x0F02),
        buf(IoreqType.COPY, 3, 0xA0008, 0x44332211), buf(0, 0, 0, 0x88776655),
    ])
    assert server.handle_events() == 3
    assert handler.calls == [("mmio_write", 0xA0000, 1, 0x5A), ("pio_write", 0x3C4, 2, 0x0F02),
                             ("mmio_write", 0xA0008, 8, 0x8877665544332211)]
    rp, wp = xen.ring_pointers(sid(server))
    assert rp == wp == 4


def test_buffered_timeoffset_is_recorded(xen: FakeXen, server: IoreqServer) -> None:
    offset = -3600 & ((1 << 64) - 1)
    xen.push_buffered(sid(server), [buf(IoreqType.TIMEOFFSET, 3, 0, offset & 0xFFFFFFFF),
                                    buf(0, 0, 0, offset >> 32)])
    server.handle_events()
    assert server.time_offset == -3600


def test_buffered_ring_wraps_around_the_slot_array(xen: FakeXen, server: IoreqServer,
                                                   handler: RecordingHandler) -> None:
    xen.set_ring_pointers(sid(server), 510, 510)
    xen.push_buffered(sid(server), [buf(IoreqType.COPY, 3, 0xA0000, 1), buf(0, 0, 0, 2)])
    server.handle_events()
    assert handler.calls == [("mmio_write", 0xA0000, 8, (2 << 32) | 1)]
    assert xen.ring_pointers(sid(server)) == (512, 512)


def test_hostile_ring_pointers_are_resynchronised_not_followed(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    xen.set_ring_pointers(sid(server), 5, 5 + abi.IOREQ_BUFFER_SLOT_NUM + 1)
    assert server.poll_buffered() == 0
    assert handler.calls == []
    rp, wp = xen.ring_pointers(sid(server))
    assert rp == wp
    xen.set_ring_pointers(sid(server), 100, 99)  # write behind read: 2**32 - 1 "entries"
    assert server.poll_buffered() == 0
    assert handler.calls == [] and server.stats.invalid == 2


def test_lone_qword_half_and_buffered_reads_are_rejected(
        xen: FakeXen, server: IoreqServer, handler: RecordingHandler) -> None:
    xen.push_buffered(sid(server), [buf(IoreqType.COPY, 2, 0xA0000, 1, direction=1),
                                    buf(IoreqType.PCI_CONFIG, 2, 0, 1),
                                    buf(IoreqType.PIO, 2, 0xFFFFE, 1),
                                    buf(IoreqType.COPY, 3, 0xA0000, 1)])
    server.handle_events()
    assert handler.calls == []
    assert server.stats.invalid == 4
    rp, wp = xen.ring_pointers(sid(server))
    assert rp == wp == 4


def test_claims(xen: FakeXen, server: IoreqServer) -> None:
    server.claim_pci(Sbdf(0, 0, 5, 0))
    server.claim_range(True, 0xFEBF0000, 0xFEBFFFFF)
    server.claim_range(False, 0xC000, 0xC03F)
    fs = xen.servers[sid(server)]
    assert fs.pcidevs == {(0, 0, 5, 0)}
    assert fs.ranges == {(True, 0xFEBF0000, 0xFEBFFFFF), (False, 0xC000, 0xC03F)}
    server.release_range(True, 0xFEBF0000, 0xFEBFFFFF)
    server.release_pci(Sbdf(0, 0, 5, 0))
    assert fs.ranges == {(False, 0xC000, 0xC03F)} and fs.pcidevs == set()
    assert server.claims == {("pio", 0xC000, 0xC03F)}
    with pytest.raises(ValueError):
        server.claim_range(False, 0xFFF0, 0x10000)
    with pytest.raises(ValueError):
        server.claim_range(True, 0x2000, 0x1FFF)


def test_orderly_teardown(xen: FakeXen, handler: RecordingHandler) -> None:
    server = IoreqServer(xen, xen.domid, handler)
    server.start()
    server_id = sid(server)
    server.close()
    server.close()
    assert [c for c in xen.calls if c[0] in ("set_state", "destroy")] == [
        ("set_state", server_id, True), ("set_state", server_id, False), ("destroy", server_id)]
    assert xen.bound == {}
    assert all(m.closed for m in xen.maps)
    assert server.handle_events() == 0


def test_teardown_after_the_guest_died(xen: FakeXen, handler: RecordingHandler) -> None:
    server = IoreqServer(xen, xen.domid, handler)
    server.start()
    xen.kill_domain()
    server.close()  # must not raise
    assert server.closed and all(m.closed for m in xen.maps)


def test_run_serves_until_stopped_and_tears_down(xen: FakeXen) -> None:
    stop = threading.Event()

    class StoppingHandler(RecordingHandler):
        def mmio_read(self, addr: int, size: int) -> int:
            stop.set()
            return super().mmio_read(addr, size)

    handler = StoppingHandler()
    server = IoreqServer(xen, xen.domid, handler)
    server.start()
    page = xen.servers[sid(server)].ioreq_page  # outlives the server's destruction
    thread = threading.Thread(target=server.run, args=(stop,))
    thread.start()
    xen.send(sid(server), 0, IoreqType.COPY, R, 0xFE000000, 4)
    thread.join(10)
    assert not thread.is_alive()
    assert server.closed
    assert handler.calls == [("mmio_read", 0xFE000000, 4)]
    assert abi.unpack_ioreq(abi.ioreq_slot(page, 0)).state == IoreqState.IORESP_READY
    assert ("destroy", 1) in xen.calls


def serving_without_a_ring(xen: FakeXen, handler: RecordingHandler
                           ) -> tuple[IoreqServer, threading.Event, threading.Thread]:
    """A server without a buffered ring, its run() on a thread, one MMIO
    read served through it."""
    server = IoreqServer(xen, xen.domid, handler, buffered=False)
    server.start()
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,))
    thread.start()
    xen.send(sid(server), 0, IoreqType.COPY, R, 0xFE000000, 4)
    wait_for(lambda: handler.calls == [("mmio_read", 0xFE000000, 4)])
    return server, stop, thread


def test_run_without_a_buffered_ring_waits_without_a_timer_and_wakes_to_stop(
        xen: FakeXen, handler: RecordingHandler) -> None:
    """Nothing is due on a timer without a buffered ring, so run() waits
    for events alone: setting ``stop`` takes effect at wake(), promptly."""
    server, stop, thread = serving_without_a_ring(xen, handler)
    stop.set()
    time.sleep(0.3)  # longer than the buffered ring's timer: no timer fires
    assert thread.is_alive()
    server.wake()
    thread.join(10)
    assert not thread.is_alive() and server.closed
    server.wake()  # after the loop: harmless
    assert xen.loop == {} and xen.unbound == set()  # the wake-up pair is gone too


def test_run_polls_where_no_loopback_pair_can_be_bound(
        xen: FakeXen, handler: RecordingHandler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hypervisor (or XSM policy) that refuses the loopback pair: run()
    serves by polling and sees ``stop`` within the ring's timer."""
    def refuse(domid: int) -> int:
        raise XenCallError("xenevtchn_bind_unbound_port", errno.EACCES)

    monkeypatch.setattr(xen, "bind_unbound_port", refuse)
    server, stop, thread = serving_without_a_ring(xen, handler)
    stop.set()  # no wake() needed, nor possible
    thread.join(5)
    assert not thread.is_alive() and server.closed


def test_fake_loopback_pair_behaves_like_xen(xen: FakeXen) -> None:
    """What run()'s wake-up relies on: a pair bound in this domain, the new
    end pending once on binding, a notify on one end making the other
    pending, and unbinding one end leaving the other unbound."""
    listen = xen.bind_unbound_port(abi.DOMID_SELF)
    kick = xen.bind_interdomain(abi.DOMID_SELF, listen)
    assert xen.pending() == kick and xen.pending() is None
    xen.notify(kick)
    assert xen.pending() == listen
    xen.notify(listen)
    assert xen.pending() == kick
    with pytest.raises(XenCallError):
        xen.bind_interdomain(abi.DOMID_SELF, listen)  # already bound
    xen.unbind(kick)
    assert xen.unbound == {listen}
    xen.unbind(listen)
    assert xen.loop == {} and xen.unbound == set()


def test_fallback_to_gfn_mapping(handler: RecordingHandler) -> None:
    xen = FakeXen(resource_mapping=False)
    server = IoreqServer(xen, xen.domid, handler)
    server.start()
    assert server.legacy_gfn_mapping
    assert ("info", sid(server), True) in xen.calls
    xen.send(sid(server), 0, IoreqType.COPY, R, 0xFE000000, 4)
    server.handle_events()
    assert xen.slot(sid(server), 0).data == 0x11223344
    xen.push_buffered(sid(server), [buf(IoreqType.COPY, 0, 0xA0000, 7)])
    server.handle_events()
    assert handler.calls[-1] == ("mmio_write", 0xA0000, 1, 7)
    server.close()
    xen.close()


def test_without_libatomic_there_is_no_buffered_ring(xen: FakeXen,
                                                     handler: RecordingHandler) -> None:
    server = IoreqServer(xen, xen.domid, handler, atomics=Atomics(None, None))
    server.start()
    assert ("create", sid(server), abi.BufioreqMode.OFF) in xen.calls
    assert len(xen.bound) == xen.vcpus
    assert server.poll_buffered() == 0
    server.close()


class RefusingXen(FakeXen):
    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        raise XenCallError("xenevtchn_bind_interdomain", 22)


def test_failed_start_destroys_the_server(handler: RecordingHandler) -> None:
    xen = RefusingXen()
    server = IoreqServer(xen, xen.domid, handler)
    with pytest.raises(XenCallError):
        server.start()
    assert xen.servers == {}
    assert all(m.closed for m in xen.maps)
    xen.close()


class RacingXen(FakeXen):
    """Xen posts a request for vCPU 1 right after enabling, before ports are bound."""

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None:
        super().set_ioreq_server_state(domid, server, enabled)
        if enabled:
            raw = abi.RawIoreq(0xFE000000, 0, 1, 4, self.vp_eport(1), 0,
                               IoreqState.IOREQ_READY, 0, R, 0, 0, IoreqType.COPY)
            abi.ioreq_slot(self.servers[server].ioreq_page, 1)[:] = abi.pack_ioreq(raw)


def test_request_posted_before_ports_were_bound_is_served_at_start(
        handler: RecordingHandler) -> None:
    xen = RacingXen()
    server = IoreqServer(xen, xen.domid, handler)
    server.start()
    assert xen.slot(sid(server), 1).state == IoreqState.IORESP_READY
    assert handler.calls == [("mmio_read", 0xFE000000, 4)]
    server.close()
    xen.close()
