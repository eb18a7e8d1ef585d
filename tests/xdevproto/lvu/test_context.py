"""A Python device on libvfio-user's engine, driven by real vfio-user clients.

Needs libvfio-user (skipped with the loader's reason where absent). Each
test builds a :class:`Context` on a temporary socket, runs it in a thread
(attach, then run until the client leaves) and talks to it over the socket.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xdevproto.client import Client
from xdevproto.errors import DeviceError, RemoteError
from xdevproto.guestmem import MemfdRam
from xdevproto.lvu import Context, DmaInfo, IrqType, MigrState, Region, RegionFlag, ResetType
from xdevproto.lvu.loader import unavailable_reason
from xdevproto.wire import SetIrqsFlags

pytestmark = pytest.mark.lvu

_reason = unavailable_reason()
if _reason is not None:
    pytest.skip(f"libvfio-user unavailable: {_reason}", allow_module_level=True)

BAR0_SIZE = 0x1000


class Running:
    """A context served on a worker thread, one client at a time."""

    def __init__(self, ctx: Context, path: str) -> None:
        self.ctx = ctx
        self.path = path
        self.end: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.ctx.attach()
            self.ctx.run()
        except OSError as exc:
            self.end.append(exc)

    def stop(self) -> None:
        if self.thread.is_alive():
            # a blocked accept() or run() ends when a client comes and goes
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(self.path)
                except OSError:
                    pass
        self.thread.join(10)
        assert not self.thread.is_alive(), "vfu_run_ctx did not return"
        self.ctx.destroy()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[Callable[[Context], None]], Running]]:
    """``make(setup)``: a PCI context, ``setup(ctx)`` adds to it, then it is realized and run."""
    started: list[Running] = []

    def build(setup: Callable[[Context], None]) -> Running:
        path = str(tmp_path / f"lvu{len(started)}.sock")
        ctx = Context(path)
        ctx.pci_init()
        setup(ctx)
        ctx.realize()
        started.append(Running(ctx, path))
        return started[-1]

    yield build
    for r in started:
        r.stop()


def pattern(offset: int, count: int) -> bytes:
    return bytes((offset + i) * 7 & 0xFF for i in range(count))


def bar0(ctx: Context, writes: list[tuple[int, bytes]] | None = None) -> None:
    ctx.setup_region(Region.BAR0, BAR0_SIZE, read=pattern,
                     write=(lambda off, data: writes.append((off, data))) if writes is not None
                     else None, flags=RegionFlag.RW | RegionFlag.MEM)


def raw_call(s: socket.socket, msg_id: int, command: int, payload: bytes) -> tuple[int, bytes]:
    """One request/reply with hand-packed bytes (vfio-user §2 header), not xdevproto.wire."""
    s.sendall(struct.pack("<HHIII", msg_id, command, 16 + len(payload), 0, 0) + payload)
    head = s.recv(16, socket.MSG_WAITALL)
    r_id, r_cmd, size, flags, err = struct.unpack("<HHIII", head)
    assert (r_id, r_cmd, flags & 0xF) == (msg_id, command, 1)
    body = s.recv(size - 16, socket.MSG_WAITALL) if size > 16 else b""
    return (err if flags & 0x20 else 0), body


def test_raw_version_then_region_read_is_answered_by_python(make: Callable[..., Running]) -> None:
    r = make(bar0)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(r.path)
        caps = json.dumps({"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"
        err, body = raw_call(s, 1, 1, struct.pack("<HH", 0, 2) + caps)
        assert err == 0 and struct.unpack_from("<HH", body) == (0, 2)
        offered = json.loads(body[4:].rstrip(b"\0"))
        assert offered["capabilities"]["max_data_xfer_size"] == 1 << 20
        err, body = raw_call(s, 2, 9, struct.pack("<QII", 0x10, Region.BAR0, 8))
        assert err == 0
        assert body[:16] == struct.pack("<QII", 0x10, Region.BAR0, 8)
        assert body[16:] == pattern(0x10, 8)
    r.stop()
    assert [getattr(e, "errno", None) for e in r.end] == [errno.ENOTCONN]


def test_writes_reach_python_and_config_space_is_the_librarys(
        make: Callable[..., Running]) -> None:
    writes: list[tuple[int, bytes]] = []

    def setup(ctx: Context) -> None:
        bar0(ctx, writes)
        ctx.pci_set_id(0x1AF4, 0x10F0, 0x1AF4, 0x0001)
        ctx.pci_set_class(0x01, 0x06, 0x01)

    r = make(setup)
    with Client.connect(r.path) as c:
        c.region_write(Region.BAR0, 0x20, b"\x01\x02\x03\x04")
        assert writes == [(0x20, b"\x01\x02\x03\x04")]
        assert c.region_read(Region.CFG, 0, 4) == struct.pack("<HH", 0x1AF4, 0x10F0)
        assert c.region_read(Region.CFG, 9, 3) == bytes([0x01, 0x06, 0x01])
        info = c.region_info(Region.BAR0)
        assert info.size == BAR0_SIZE
    assert r.ctx.read_config(0, 2) == b"\xf4\x1a"


def test_a_callback_error_becomes_the_reply_errno(make: Callable[..., Running]) -> None:
    def refuse(offset: int, data: bytes) -> None:
        raise DeviceError("read-only register", errno.EPERM)

    def setup(ctx: Context) -> None:
        ctx.setup_region(Region.BAR0, BAR0_SIZE, read=pattern, write=refuse,
                         flags=RegionFlag.RW | RegionFlag.MEM)

    r = make(setup)
    with Client.connect(r.path) as c:
        with pytest.raises(RemoteError) as exc:
            c.region_write(Region.BAR0, 0, b"\0\0\0\0")
        assert exc.value.errno == errno.EPERM
        assert c.region_read(Region.BAR0, 4, 4) == pattern(4, 4), "still serving"


def test_capability_lands_in_config_space(make: Callable[..., Running]) -> None:
    where: list[int] = []

    def setup(ctx: Context) -> None:
        # PCI power management capability (ID 1): id, next, PMC, PMCSR, 2 more bytes
        where.append(ctx.add_capability(bytes([0x01, 0x00, 0x03, 0x00, 0, 0, 0, 0])))

    r = make(setup)
    with Client.connect(r.path) as c:
        status, cap_ptr = struct.unpack("<H", c.region_read(Region.CFG, 6, 2))[0], \
            c.region_read(Region.CFG, 0x34, 1)[0]
        assert status & 0x10, "capabilities list bit"
        assert cap_ptr == where[0]
        assert c.region_read(Region.CFG, cap_ptr, 1) == b"\x01"


def test_dma_with_and_without_fd_and_an_irq(make: Callable[..., Running]) -> None:
    maps: list[DmaInfo] = []
    seen: list[bytes] = []

    def setup(ctx: Context) -> None:
        def doorbell(offset: int, data: bytes) -> None:
            # runs on the thread in vfu_run_ctx: DMA and IRQs are allowed here
            iova = int.from_bytes(data, "little")
            seen.append(ctx.dma_read(iova, 16))
            ctx.dma_write(iova + 16, b"pong" * 4)
            ctx.irq_trigger(0)

        ctx.setup_region(Region.BAR0, BAR0_SIZE, read=pattern, write=doorbell,
                         flags=RegionFlag.RW | RegionFlag.MEM)
        ctx.setup_irqs(IrqType.INTX, 1)
        ctx.setup_dma(maps.append, None)

    r = make(setup)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    with MemfdRam(0x2000, base=0x10000) as ram, Client.connect(r.path, guest=ram) as c:
        c.start_dma_service()
        c.set_irqs(IrqType.INTX, SetIrqsFlags.ACTION_TRIGGER, fds=[efd])
        c.dma_map(0x10000, 0x1000, fd=ram.fd)            # direct: the server mmaps it
        c.dma_map(0x11000, 0x1000)                       # messages: DMA_READ/DMA_WRITE
        assert [(m.iova, m.length, m.vaddr != 0) for m in maps] == [
            (0x10000, 0x1000, True), (0x11000, 0x1000, False)]
        for iova in (0x10000, 0x11000):
            ram.write(iova, b"ping" * 4)
            c.region_write(Region.BAR0, 0, iova.to_bytes(8, "little"))
            assert ram.read(iova + 16, 16) == b"pong" * 4
            assert select.select([efd], [], [], 5)[0] == [efd]
            assert os.eventfd_read(efd) == 1
        assert seen == [b"ping" * 4] * 2
    os.close(efd)


def test_reset_and_lost_connection_reach_the_reset_callback(
        make: Callable[..., Running]) -> None:
    resets: list[ResetType] = []

    def setup(ctx: Context) -> None:
        bar0(ctx)
        ctx.on_reset(resets.append)

    r = make(setup)
    with Client.connect(r.path) as c:
        c.reset()
        assert resets == [ResetType.DEVICE]
    r.thread.join(10)
    assert resets == [ResetType.DEVICE, ResetType.LOST_CONN]
    r.stop()  # vfu_destroy_ctx resets once more, client or not
    assert resets == [ResetType.DEVICE, ResetType.LOST_CONN, ResetType.LOST_CONN]


def test_sparse_mmap_areas_and_the_region_fd_reach_the_client(
        make: Callable[..., Running]) -> None:
    fd = os.memfd_create("lvu-bar1")
    os.ftruncate(fd, 0x4000)
    os.pwrite(fd, b"shared", 0x2000)

    def setup(ctx: Context) -> None:
        ctx.setup_region(Region.BAR1, 0x4000, read=pattern, flags=RegionFlag.RW | RegionFlag.MEM,
                         mmap_areas=[(0, 0x1000), (0x2000, 0x1000)], fd=fd)

    r = make(setup)
    with Client.connect(r.path) as c:
        info = c.region_info(Region.BAR1)
        assert [(a.offset, a.size) for a in info.sparse_areas] == [(0, 0x1000), (0x2000, 0x1000)]
        assert info.fd is not None
        assert os.pread(info.fd, 6, info.offset + 0x2000) == b"shared"
        os.close(info.fd)
        assert c.region_read(Region.BAR1, 0x1000, 4) == pattern(0x1000, 4)
    os.close(fd)


def test_irq_mask_and_unmask_reach_the_state_callback(make: Callable[..., Running]) -> None:
    states: list[tuple[int, int, bool]] = []

    def setup(ctx: Context) -> None:
        bar0(ctx)
        ctx.setup_irqs(IrqType.MSIX, 4)
        ctx.on_irq_state(IrqType.MSIX, lambda start, count, masked:
                         states.append((start, count, masked)))

    r = make(setup)
    with Client.connect(r.path) as c:
        assert c.irq_info(IrqType.MSIX).count == 4
        c.set_irqs(IrqType.MSIX, SetIrqsFlags.ACTION_MASK, 1, count=2)
        c.set_irqs(IrqType.MSIX, SetIrqsFlags.ACTION_UNMASK, 1, count=2)
    assert states == [(1, 2, True), (1, 2, False)]


def test_quiesce_comes_before_dma_map_and_reset(make: Callable[..., Running]) -> None:
    events: list[str] = []

    def setup(ctx: Context) -> None:
        bar0(ctx)
        ctx.setup_dma(lambda info: events.append("map"), None)
        ctx.on_reset(lambda kind: events.append(f"reset {kind.name}"))

        def quiesce() -> bool:
            events.append("quiesce")
            return True
        ctx.on_quiesce(quiesce)

    r = make(setup)
    with Client.connect(r.path) as c:
        c.dma_map(0x10000, 0x1000)
        c.reset()
    assert events[:4] == ["quiesce", "map", "quiesce", "reset DEVICE"]


def test_migration_state_saved_from_one_context_loads_into_another(
        make: Callable[..., Running]) -> None:
    state = bytes(range(256)) * 3
    seen: dict[str, list[object]] = {"a": [], "b": []}
    loaded = bytearray()

    def migratable(name: str) -> Callable[[Context], None]:
        left = bytearray(state)

        def read(count: int) -> bytes:
            chunk = bytes(left[:count])
            del left[:count]
            return chunk

        def setup(ctx: Context) -> None:
            bar0(ctx)
            ctx.setup_migration(seen[name].append, read, loaded.extend)
        return setup

    source, target = make(migratable("a")), make(migratable("b"))
    with Client.connect(source.path) as c:
        saved = c.save_device()
    with Client.connect(target.path) as c:
        c.load_device(saved)
    assert saved == state and bytes(loaded) == state
    # the library walks the vfio v2 arcs one state at a time, through STOP
    assert seen["a"] == [MigrState.STOP, MigrState.STOP_AND_COPY, MigrState.STOP]
    assert seen["b"] == [MigrState.STOP, MigrState.RESUME, MigrState.STOP, MigrState.RUNNING]
