"""The xdev ioreq extension end to end on the fake Xen: the bridge's run()
makes an ioreq server per device, the device server (bridge.direct) serves
it itself with event channels of its own, and the bridge takes it over
while the server is gone."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from bridge.direct import XenIoreqAttachment
from bridge.xen import abi
from bridge.xen.abi import IoreqDir, IoreqState, IoreqType
from bridge.xen.fake import FakeHandle, FakeXen
from servers.e1000 import regs as ER
from servers.e1000.backends import NullBackend
from servers.e1000.device import E1000Device
from tests.bridge.test_cli import (
    SBDF,
    FakeXenstore,
    bridge_rig,
    cfg_addr,
    guest_dies,
    wait_for,
)
from xdevproto.device import Device
from xdevproto.server import Server
from xdevproto.testdev import ID_VALUE, TestDevice
from xdevproto.transport import listen

R, W = IoreqDir.READ, IoreqDir.WRITE
MAIN = 1  # the bridge's own ioreq server; the device's is made next
BAR = 0xF000_0000


@contextlib.contextmanager
def direct_rig(tmp_path: Path, device: Device, *, serve_direct: bool = True,
               offer: bool = True) -> Iterator[tuple[FakeXen, list[FakeHandle], Server,
                                                     threading.Thread, FakeXenstore,
                                                     list[int]]]:
    """test_cli's rig with a server that takes the ioreq extension; each
    session of the server gets its own event channel handle, as a process
    of its own would. Yields (xen, handles, server, bridge thread,
    xenstore, run's result)."""
    handles: list[FakeHandle] = []
    servers: list[Server] = []

    def attachers(xen: FakeXen) -> dict:
        def attach(params: dict, dev: Device) -> XenIoreqAttachment:
            handles.append(xen.open_handle())
            return XenIoreqAttachment(handles[-1], params["domid"], dev)
        return {"xen": attach}

    with bridge_rig(tmp_path, device=device, attachers=attachers if serve_direct else None,
                    servers=servers, direct_ioreq=offer) as (xen, xs, _, _, bthread, result):
        yield xen, handles, servers[0], bthread, xs, result


def access(xen: FakeXen, sid: int, typ: IoreqType, d: IoreqDir, addr: int, size: int,
           data: int = 0, vcpu: int = 0) -> int:
    xen.send(sid, vcpu, typ, d, addr, size, data=data)
    wait_for(lambda: xen.slot(sid, vcpu).state == IoreqState.IORESP_READY)
    return xen.slot(sid, vcpu).data


def config(xen: FakeXen, reg: int, size: int, value: int | None = None) -> int:
    if value is None:
        return access(xen, MAIN, IoreqType.PCI_CONFIG, R, cfg_addr(reg), size)
    return access(xen, MAIN, IoreqType.PCI_CONFIG, W, cfg_addr(reg), size, value)


def answered_by(xen: FakeXen, who: object) -> bool:
    """Whether the last completion was notified through ``who``'s handle."""
    return xen.owner.get(xen.notified[-1]) is who


def test_the_device_server_serves_its_bar_itself(tmp_path: Path) -> None:
    with direct_rig(tmp_path, TestDevice()) as (xen, handles, server, *_):
        config(xen, 0x10, 4, BAR)
        config(xen, 0x04, 2, 0x0002)  # memory decoding on: the BAR is claimed
        dev_sid = max(xen.servers)
        assert dev_sid != MAIN and xen.servers[dev_sid].enabled
        assert xen.servers[dev_sid].ranges == {(True, BAR, BAR + 0xFFF)}
        assert not any(mmio for mmio, _, _ in xen.servers[MAIN].ranges)
        assert xen.servers[MAIN].pcidevs == {(0, 0, 5, 0)}  # config space stays
        (handle,) = handles
        assert xen.bound_by(xen.vp_eport(0, dev_sid)) is handle
        assert access(xen, dev_sid, IoreqType.COPY, R, BAR, 4) == ID_VALUE
        assert answered_by(xen, handle)
        access(xen, dev_sid, IoreqType.COPY, W, BAR + 4, 4, 0x1234_5678, vcpu=1)
        assert access(xen, dev_sid, IoreqType.COPY, R, BAR + 4, 2, vcpu=1) == 0x5678
        assert answered_by(xen, handle)
        # The guest moves the BAR: the claim and the server's table follow.
        config(xen, 0x04, 2, 0)
        assert xen.servers[dev_sid].ranges == set()
        config(xen, 0x10, 4, 0xE000_0000)
        config(xen, 0x04, 2, 0x0002)
        assert xen.servers[dev_sid].ranges == {(True, 0xE000_0000, 0xE000_0FFF)}
        assert access(xen, dev_sid, IoreqType.COPY, R, 0xE000_0004, 4) == 0x1234_5678
        # Xen would not route the old address here any more; if a stale
        # request came, it is not the device's.
        assert access(xen, dev_sid, IoreqType.COPY, R, BAR, 4) == 0xFFFF_FFFF


def test_a_server_without_the_extension_is_served_through_the_bridge(tmp_path: Path) -> None:
    for serve_direct, offer in ((False, True), (True, False)):
        sub = tmp_path / f"{serve_direct}-{offer}"
        sub.mkdir()
        with direct_rig(sub, TestDevice(), serve_direct=serve_direct,
                        offer=offer) as (xen, handles, *_):
            config(xen, 0x10, 4, BAR)
            config(xen, 0x04, 2, 0x0002)
            assert list(xen.servers) == [MAIN] and not handles
            assert (True, BAR, BAR + 0xFFF) in xen.servers[MAIN].ranges
            assert access(xen, MAIN, IoreqType.COPY, R, BAR, 4) == ID_VALUE


def test_the_server_drives_intx_itself_and_serves_port_io(tmp_path: Path) -> None:
    """An e1000 (INTx only, an MMIO and an I/O BAR). The bridge sees none of
    the BAR accesses, so the level it could never end must come from the
    server: raised by ICS, lowered by the read of ICR."""
    nic = E1000Device(bytes.fromhex("525400123456"), NullBackend())
    try:
        with direct_rig(tmp_path, nic) as (xen, handles, *_):
            config(xen, 0x10, 4, BAR)
            config(xen, 0x14, 4, 0xC000)
            config(xen, 0x04, 2, 0x0003)  # I/O and memory decoding
            dev_sid = max(xen.servers)
            assert xen.servers[dev_sid].ranges == {(True, BAR, BAR + 0x1FFFF),
                                                   (False, 0xC000, 0xC03F)}
            mmio = IoreqType.COPY
            access(xen, dev_sid, mmio, W, BAR + ER.IMS, 4, ER.ICR_TXDW)
            access(xen, dev_sid, mmio, W, BAR + ER.ICS, 4, ER.ICR_TXDW)
            wait_for(lambda: xen.intx.get((0, 0, 5, 0)) == 1)
            assert access(xen, dev_sid, mmio, R, BAR + ER.ICR, 4) & ER.ICR_TXDW
            wait_for(lambda: xen.intx.get((0, 0, 5, 0)) == 0)
            # IOADDR/IODATA through the I/O BAR reach the same registers.
            pio = IoreqType.PIO
            access(xen, dev_sid, pio, W, 0xC000, 4, ER.IMS)
            assert access(xen, dev_sid, pio, R, 0xC004, 4) == ER.ICR_TXDW
            assert answered_by(xen, handles[0])
            # Interrupt Disable in the command register holds the line low.
            config(xen, 0x04, 2, 0x0403)
            access(xen, dev_sid, mmio, W, BAR + ER.ICS, 4, ER.ICR_TXDW)
            assert xen.intx.get((0, 0, 5, 0)) == 0
            config(xen, 0x04, 2, 0x0003)
            wait_for(lambda: xen.intx.get((0, 0, 5, 0)) == 1)
    finally:
        nic.close()


def test_the_bridge_takes_over_while_the_server_is_gone(tmp_path: Path) -> None:
    """The server dies holding a request (IOREQ_INPROCESS): the bridge binds
    the ports the kernel freed, completes that request as unanswered and
    answers all-ones until the server is back; then the server serves again."""
    with direct_rig(tmp_path, TestDevice()) as (xen, handles, server, *_):
        config(xen, 0x10, 4, BAR)
        config(xen, 0x04, 2, 0x0002)
        dev_sid = max(xen.servers)
        assert access(xen, dev_sid, IoreqType.COPY, R, BAR, 4) == ID_VALUE
        # Death: the process's event channels close, and the request it had
        # taken stays in progress.
        handles[0].exit()
        slot = abi.ioreq_slot(xen.servers[dev_sid].ioreq_page, 1)
        slot[:] = abi.pack_ioreq(abi.RawIoreq(
            BAR, 0, 1, 4, xen.vp_eport(1, dev_sid), 0, IoreqState.IOREQ_INPROCESS, 0, int(R),
            0, 0, int(IoreqType.COPY)))
        session = server.session
        assert session is not None
        session.transport.sock.shutdown(socket.SHUT_RDWR)
        config(xen, 0x2C, 4)  # forwarded: the bridge finds the server gone
        wait_for(lambda: xen.slot(dev_sid, 1).state == IoreqState.IORESP_READY)
        assert xen.slot(dev_sid, 1).data == 0xFFFF_FFFF
        assert xen.bound_by(xen.vp_eport(0, dev_sid)) is xen  # the bridge's handle
        # The server's session came back (the same listener): it serves again.
        wait_for(lambda: len(handles) == 2 and xen.bound_by(xen.vp_eport(0, dev_sid))
                 is handles[1], timeout=10)
        assert access(xen, dev_sid, IoreqType.COPY, R, BAR, 4) == ID_VALUE
        assert answered_by(xen, handles[1])
        assert xen.servers[dev_sid].ranges == {(True, BAR, BAR + 0xFFF)}


def test_bridge_exit_releases_and_destroys_the_device_server(tmp_path: Path) -> None:
    with direct_rig(tmp_path, TestDevice()) as (xen, handles, server, bthread, *_):
        config(xen, 0x10, 4, BAR)
        config(xen, 0x04, 2, 0x0002)
        dev_sid = max(xen.servers)
        assert xen.bound_by(xen.vp_eport(0, dev_sid)) is handles[0]
    bthread.join(5)
    assert not bthread.is_alive()
    assert xen.servers == {}  # both ioreq servers destroyed
    assert not [p for p, owner in xen.owner.items() if owner is handles[0]]


def test_the_guest_dies_with_its_bars_served_directly(tmp_path: Path) -> None:
    """Xen destroys the guest's ioreq servers with it: the bridge's clean-up
    of the device's claims meets ENOENT/ESRCH and must still exit cleanly."""
    with direct_rig(tmp_path, TestDevice()) as (xen, _, _, bthread, xs, result):
        config(xen, 0x10, 4, BAR)
        config(xen, 0x04, 2, 0x0002)
        assert len(xen.servers) == 2
        guest_dies(xen, xs)
        bthread.join(10)
        assert not bthread.is_alive() and result == [0]


def test_serve_requests_are_checked(tmp_path: Path) -> None:
    """XDEV_IOREQ_SERVE from a client: ranges must name regions the device
    has; a server without the extension refuses it."""
    from xdevproto.client import Client
    from xdevproto.errors import RemoteError
    from xdevproto.wire import IoreqRange, IoreqServe

    xen = FakeXen(domid=7, vcpus=1)
    made: list[XenIoreqAttachment] = []

    def attacher(params: dict, dev: Device) -> XenIoreqAttachment:
        made.append(XenIoreqAttachment(xen.open_handle(), params["domid"], dev))
        return made[-1]

    for attachers in ({"xen": attacher}, None):
        server = Server(TestDevice(), ioreq_attachers=attachers)
        path = tmp_path / f"s{bool(attachers)}.sock"
        listener = listen(str(path))
        t = threading.Thread(target=server.serve, args=(listener,), daemon=True)
        t.start()
        try:
            with Client.connect(str(path), ioreq_offer={"kind": "xen", "domid": 7}) as c:
                assert c.direct_ioreq == ("xen" if attachers else None)
                sid = xen.create_ioreq_server(7, 0)
                if attachers:
                    # Not enabled yet: Xen has not given it event channels.
                    early = IoreqServe(sid, SBDF, 1, (IoreqRange(BAR, 0x1000, 0, True),))
                    try:
                        c.ioreq_serve(early)
                    except RemoteError as exc:
                        assert exc.errno == 5  # EIO
                    else:
                        raise AssertionError("served an ioreq server Xen had not enabled")
                xen.set_ioreq_server_state(7, sid, True)
                bad = IoreqServe(sid, SBDF, 1, (IoreqRange(BAR, 0x1000, 4, True),))
                try:
                    c.ioreq_serve(bad)
                except RemoteError as exc:
                    assert exc.errno in (22, 95)  # EINVAL: no region 4; ENOTSUP
                else:
                    raise AssertionError("a range of a missing region was accepted")
                if attachers:
                    good = IoreqServe(sid, SBDF, 1, (IoreqRange(BAR, 0x1000, 0, True),))
                    c.ioreq_serve(good)
                    assert xen.bound_by(xen.vp_eport(0, sid)) is not None
                    c.ioreq_release()
                    assert xen.bound_by(xen.vp_eport(0, sid)) is None
        finally:
            server.stop()
            t.join(5)
            listener.close()
