"""The test device served by the runtime, driven by the client over a real
UNIX socket through every command."""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import select
import struct
import time

import pytest

from xdevproto import wire
from xdevproto.client import Client
from xdevproto.errors import RemoteError
from xdevproto.guestmem import MemfdRam
from xdevproto.testdev import BAR0_SIZE, BAR2_SIZE, BUF_OFF, ID_VALUE
from xdevproto.wire import IrqIndex, MigState, PciRegion, SetIrqsFlags


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def eventfd_fired(fd: int, timeout: float = 2.0) -> int:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.eventfd_read(fd) if ready else 0


def test_device_and_region_info(served) -> None:
    with Client.connect(served.path) as c:
        info = c.device_info()
        assert info.num_regions == 9 and info.num_irqs == 5
        assert info.flags == wire.DeviceInfoFlags.RESET | wire.DeviceInfoFlags.PCI
        r0 = c.region_info(PciRegion.BAR0)
        assert r0.size == BAR0_SIZE and r0.fd is None
        r2 = c.region_info(PciRegion.BAR2)
        assert r2.size == BAR2_SIZE and r2.flags & wire.RegionFlags.MMAP
        assert r2.flags & wire.RegionFlags.CAPS
        assert r2.sparse_areas == (wire.SparseArea(0, BAR2_SIZE // 2),)
        assert r2.fd is not None
        # The fd maps the same memory the device serves.
        m = mmap.mmap(r2.fd, BAR2_SIZE)
        m[0:4] = b"abcd"
        assert c.region_read(PciRegion.BAR2, 0, 4) == b"abcd"
        m.close()
        os.close(r2.fd)
        assert c.region_info(PciRegion.BAR1).size == 0
        with pytest.raises(RemoteError) as e:
            c.region_info(42)
        assert e.value.errno == errno.EINVAL
        assert c.irq_info(IrqIndex.MSI).count == 4
        with pytest.raises(RemoteError):
            c.irq_info(9)
        fdsinfo, fds = c.region_io_fds(PciRegion.BAR0)
        assert fdsinfo.count == 0 and fds == []


def test_region_read_write_and_bounds(served) -> None:
    with Client.connect(served.path) as c:
        assert struct.unpack("<I", c.region_read(PciRegion.BAR0, 0, 4))[0] == ID_VALUE
        c.region_write(PciRegion.BAR0, 4, b"\x11\x22\x33\x44")
        assert c.region_read(PciRegion.BAR0, 4, 4) == b"\x11\x22\x33\x44"
        assert c.region_read(PciRegion.BAR0, 0, 0) == b""
        big = os.urandom(BAR0_SIZE - BUF_OFF)
        c.region_write(PciRegion.BAR0, BUF_OFF, big)
        assert c.region_read(PciRegion.BAR0, BUF_OFF, len(big)) == big
        for off, n in ((BAR0_SIZE - 2, 4), (BAR0_SIZE, 1), (1 << 40, 4)):
            with pytest.raises(RemoteError) as e:
                c.region_read(PciRegion.BAR0, off, n)
            assert e.value.errno == errno.EINVAL
        with pytest.raises(RemoteError):
            c.region_write(PciRegion.BAR1, 0, b"x")
        # The connection survives every refusal.
        assert c.region_read(PciRegion.BAR0, 4, 4) == b"\x11\x22\x33\x44"


def test_dma_with_fd_and_with_messages(served) -> None:
    with MemfdRam(1 << 20) as ram, Client.connect(served.path, guest=ram) as c:
        # Region A is fd-backed, region B message-only.
        c.dma_map(0, 1 << 19, fd=ram.fd)
        c.dma_map(1 << 19, 1 << 19)
        for base in (0x1000, (1 << 19) + 0x2000):
            pattern = os.urandom(512)
            ram.write(base, pattern)
            c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", base, 512))
            c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 1))  # guest -> buffer
            assert c.region_read(PciRegion.BAR0, 0x18, 4) == b"\0\0\0\0"
            assert c.region_read(PciRegion.BAR0, BUF_OFF, 512) == pattern
            c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", base + 0x1000, 512))
            c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 2))  # buffer -> guest
            assert ram.read(base + 0x1000, 512) == pattern
        # Overlap and bad unmap are refused; FLAG_ALL clears.
        with pytest.raises(RemoteError) as e:
            c.dma_map(0x1000, 0x1000)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(RemoteError) as e:
            c.dma_unmap(0, 0x1000)
        assert e.value.errno == errno.ENOENT
        c.dma_unmap(0, 1 << 19)
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x1000, 16))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 1))
        assert struct.unpack("<I", c.region_read(PciRegion.BAR0, 0x18, 4))[0] == errno.EFAULT
        c.dma_unmap_all()
        assert served.device.dma_regions == []


def test_dma_from_worker_thread_on_twin_socket(served) -> None:
    with MemfdRam(1 << 16) as ram, Client.connect(served.path, guest=ram) as c:
        assert c.conn.negotiated is not None and c.conn.negotiated.twin_socket
        c.start_dma_service()
        c.dma_map(0, 1 << 16)  # message DMA only
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, 0, fds=[efd])
        ram.write(0x100, b"worker!!")
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x100, 8))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 3))
        assert eventfd_fired(efd) == 1
        assert c.region_read(PciRegion.BAR0, BUF_OFF, 8) == b"worker!!"
        os.close(efd)


def test_dma_from_worker_without_twin_socket(served) -> None:
    with MemfdRam(1 << 16) as ram, Client.connect(served.path, guest=ram,
                                                  twin_socket=False) as c:
        assert not c.conn.negotiated.twin_socket
        c.start_dma_service()
        c.dma_map(0, 1 << 16)
        ram.write(0x200, b"no twin!")
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x200, 8))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 3))
        wait_for(lambda: ram.read(0x200, 8) == b"no twin!" and
                 served.device.regs[BUF_OFF:BUF_OFF + 8] == b"no twin!")
        # Interleaved calls keep working while the worker's DMA is served.
        for _ in range(20):
            assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)


def test_posted_writes_take_effect_in_order_and_fail_silently(served) -> None:
    with Client.connect(served.path) as c:
        for i in range(50):
            c.region_write(PciRegion.BAR0, 4, struct.pack("<I", i), posted=True)
        # The read's reply comes after every write before it took effect.
        assert c.region_read(PciRegion.BAR0, 4, 4) == struct.pack("<I", 49)
        # A refused posted write sends nothing back, not even an error, so
        # the next call gets its own reply; a large one goes in pieces.
        c.region_write(PciRegion.BAR0, BAR0_SIZE, b"\xff" * 4, posted=True)
        c.region_write(PciRegion.BAR1, 0, b"x", posted=True)
        big = os.urandom(BAR0_SIZE - BUF_OFF)
        c.region_write(PciRegion.BAR0, BUF_OFF, big, posted=True)
        assert c.region_read(PciRegion.BAR0, BUF_OFF, len(big)) == big
        assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)


def test_posted_write_whose_handler_does_message_dma_without_twin_socket(served) -> None:
    """Without a twin socket, the DMA_READ a posted write's handler sends
    comes on the main socket while the client makes no call: the client
    must answer it, or the server waits forever (here: no further call is
    made until the copy is seen)."""
    with MemfdRam(1 << 16) as ram, Client.connect(served.path, guest=ram,
                                                  twin_socket=False) as c:
        c.dma_map(0, 1 << 16)  # message DMA only
        ram.write(0x300, b"posted!!")
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x300, 8))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 1), posted=True)
        wait_for(lambda: served.device.regs[BUF_OFF:BUF_OFF + 8] == b"posted!!")
        assert c.region_read(PciRegion.BAR0, 0x18, 4) == b"\0\0\0\0"


def test_interrupts_on_eventfds(served) -> None:
    with Client.connect(served.path) as c:
        efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
        c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, 0, fds=efds)
        c.region_write(PciRegion.BAR0, 0x1C, struct.pack("<I", 2))
        assert eventfd_fired(efds[2]) == 1
        assert eventfd_fired(efds[0], 0.05) == 0
        # Masked vectors stay quiet; the client can fire one through DATA_BOOL.
        c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_MASK, 1, bools=[True])
        c.region_write(PciRegion.BAR0, 0x1C, struct.pack("<I", 1))
        assert eventfd_fired(efds[1], 0.05) == 0
        c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_UNMASK, 1, bools=[True])
        c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, 3, bools=[True])
        assert eventfd_fired(efds[3]) == 1
        with pytest.raises(RemoteError):
            c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, 3, fds=efds[:2])
        # Disable everything: the device drops its fds.
        c.set_irqs(IrqIndex.MSI, SetIrqsFlags.ACTION_TRIGGER, 0, count=0)
        assert all(fd is None for fd in served.device.irq_fds[IrqIndex.MSI])
        for fd in efds:
            os.close(fd)


def test_reset_features_and_migration(served, tmp_path) -> None:
    with Client.connect(served.path) as c:
        c.region_write(PciRegion.BAR0, 4, b"keep")
        assert c.migration_flags() & wire.MigrationFlags.STOP_COPY
        assert c.mig_state() == MigState.RUNNING
        state = c.save_device()
        assert c.mig_state() == MigState.STOP
        c.set_mig_state(MigState.RUNNING)
        c.reset()
        assert served.device.resets == 1
        assert c.region_read(PciRegion.BAR0, 4, 4) == b"\0\0\0\0"
        c.load_device(state)
        assert c.region_read(PciRegion.BAR0, 4, 4) == b"keep"
        with pytest.raises(RemoteError):
            c.mig_data_read(16)  # not in a saving state
        with pytest.raises(RemoteError):
            c.set_mig_state(MigState.ERROR)


def test_dirty_logging(served) -> None:
    with MemfdRam(1 << 20) as ram, Client.connect(served.path, guest=ram) as c:
        c.dma_map(0, 1 << 20, fd=ram.fd)
        c.dma_logging_start(4096)
        c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 3 * 4096 + 100, 16))
        c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 2))
        bitmap = c.dma_logging_report(0, 1 << 20)
        assert len(bitmap) == 32
        assert int.from_bytes(bitmap[:8], "little") == 1 << 3
        assert c.dma_logging_report(0, 1 << 20) == bytes(32)  # cleared when reported
        c.dma_logging_stop()


def test_disconnect_then_second_client(served) -> None:
    ram = MemfdRam(1 << 16)
    c = Client.connect(served.path, guest=ram)
    c.dma_map(0, 1 << 16, fd=ram.fd)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, 0, fds=[efd])
    c.region_write(PciRegion.BAR0, 4, b"stay")
    c.close()
    wait_for(lambda: served.server.session is None)
    # DMA maps and IRQ fds are dropped, device state is kept.
    assert served.device.dma_regions == []
    assert served.device.irq_fds[IrqIndex.INTX] == [None]
    with Client.connect(served.path) as c2:
        assert c2.region_read(PciRegion.BAR0, 4, 4) == b"stay"
    os.close(efd)
    ram.close()


def test_second_concurrent_client_is_refused(served) -> None:
    with Client.connect(served.path) as c:
        with pytest.raises(RemoteError) as e:
            Client.connect(served.path)
        assert e.value.errno == errno.EBUSY
        assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)


class CountingRam(MemfdRam):
    """Guest RAM that counts the message DMA it serves."""

    served = 0

    def read(self, addr: int, length: int) -> bytes:
        CountingRam.served += 1
        return super().read(addr, length)


def test_direct_guest_memory_extension(tmp_path) -> None:
    """A server with a mapper for the offered kind does DMA without
    messages, drops its mappings on XDEV_GUEST_MEMORY_INVALIDATE and for
    good when the session ends; one without falls back to DMA_READ/DMA_WRITE
    and refuses the invalidation."""
    import threading

    from xdevproto.server import Server
    from xdevproto.testdev import TestDevice
    from xdevproto.transport import listen

    ram = CountingRam(1 << 16)

    class Direct:  # the server's own view of the same memory, uncounted
        invalidations = 0
        closed = False

        def read(self, addr: int, length: int) -> bytes:
            assert not self.closed
            return MemfdRam.read(ram, addr, length)

        def write(self, addr: int, data: bytes) -> None:
            assert not self.closed
            MemfdRam.write(ram, addr, data)

        def invalidate(self) -> None:
            self.invalidations += 1

        def close(self) -> None:
            self.closed = True

    direct = Direct()
    for mapper, expect_direct in (({"shared-test": lambda p: {"ram": direct}[p["name"]]}, True),
                                  ({}, False)):
        dev = TestDevice()
        server = Server(dev, guest_mappers=mapper)
        path = str(tmp_path / f"d{expect_direct}.sock")
        lst = listen(path)
        t = threading.Thread(target=server.serve, args=(lst,), daemon=True)
        t.start()
        CountingRam.served = 0
        with Client.connect(path, guest=ram,
                            guest_memory_offer={"kind": "shared-test", "name": "ram"}) as c:
            assert c.direct_memory is expect_direct
            c.dma_map(0, 1 << 16)  # no fd
            ram.write(0x40, b"direct??")
            c.region_write(PciRegion.BAR0, 0x08, struct.pack("<QI", 0x40, 8))
            c.region_write(PciRegion.BAR0, 0x14, struct.pack("<I", 1))
            assert c.region_read(PciRegion.BAR0, BUF_OFF, 8) == b"direct??"
            if expect_direct:
                c.invalidate_guest_memory()
                assert direct.invalidations == 1 and not direct.closed
            else:
                with pytest.raises(RemoteError) as exc:
                    c.invalidate_guest_memory()
                assert exc.value.errno == errno.ENOTSUP
            assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)
        assert (CountingRam.served == 0) is expect_direct
        server.stop()
        t.join(5)
        lst.close()
    assert direct.closed and direct.invalidations == 1
    ram.close()


def test_client_refuses_direct_memory_without_invalidation(tmp_path, monkeypatch) -> None:
    """A server that would map guest memory but cannot be told to drop its
    mappings would go on using frames the guest gave up: no session."""
    import threading

    from xdevproto.errors import PeerProtocolError
    from xdevproto.server import Server, Session
    from xdevproto.testdev import TestDevice
    from xdevproto.transport import listen

    def old_style_accept(self: Session, req) -> None:
        caps = self.conn.our_caps
        exts = {**caps.extensions, wire.XDEV_EXTENSION: {"guest_memory": {"kind": "k"}}}
        self.conn.our_caps = dataclasses.replace(caps, extensions=exts)

    monkeypatch.setattr(Session, "accept_xdev", old_style_accept)
    server = Server(TestDevice())
    lst = listen(str(tmp_path / "old.sock"))
    t = threading.Thread(target=server.serve, args=(lst,), daemon=True)
    t.start()
    with pytest.raises(PeerProtocolError, match="does not drop its mappings"):
        Client.connect(str(tmp_path / "old.sock"), guest_memory_offer={"kind": "k"})
    # The same server still serves a client that offers nothing, once it
    # has seen the first one go (until then it answers EBUSY).
    deadline = time.monotonic() + 5
    while server.session is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    with Client.connect(str(tmp_path / "old.sock")) as c:
        assert not c.direct_memory
        assert c.region_read(PciRegion.BAR0, 0, 4) == struct.pack("<I", ID_VALUE)
    server.stop()
    t.join(5)
    lst.close()
