"""Guest memory: memfd-backed regions, message DMA through a fake context,
bounds, partial and unmapped cases, unmap while busy, dirty logging."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdevproto.device import DeviceContext, DmaRegion
from xdevproto.errors import DeviceError, RemoteError
from xdevproto.guestmem import MemfdRam
from xdevproto.pci.dma import DmaError, GuestMemory, SgEntry, WouldBlock, in_memory_fs

PAGE = 4096


class FakeContext(DeviceContext):
    """Message DMA served from a bytearray; records every message."""

    def __init__(self, base: int, size: int, xfer: int = 1000) -> None:
        self.base = base
        self.mem = bytearray(size)
        self.xfer = xfer
        self.messages: list[tuple[str, int, int]] = []
        self.fail = False

    def dma_read(self, iova: int, length: int) -> bytes:
        self.messages.append(("read", iova, length))
        if self.fail:
            raise RemoteError(13, errno.EFAULT)
        assert length <= self.xfer
        return bytes(self.mem[iova - self.base:iova - self.base + length])

    def dma_write(self, iova: int, data: bytes | memoryview) -> None:
        self.messages.append(("write", iova, len(data)))
        assert len(data) <= self.xfer
        self.mem[iova - self.base:iova - self.base + len(data)] = data

    @property
    def max_data_xfer_size(self) -> int:
        return self.xfer


def memfd_region(ram: MemfdRam, iova: int, size: int, offset: int = 0,
                 writable: bool = True) -> DmaRegion:
    return DmaRegion(iova, size, True, writable, os.dup(ram.fd), offset)


@pytest.fixture
def ram() -> Iterator[MemfdRam]:
    with MemfdRam(16 * PAGE) as r:
        yield r


@pytest.fixture
def gm() -> Iterator[GuestMemory]:
    g = GuestMemory()
    yield g
    g.unmap_all()


def test_fd_region_reads_and_writes_in_place(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0x10000, 4 * PAGE, offset=PAGE))
    gm.write(0x10010, b"hello")
    assert bytes(ram.view[PAGE + 0x10:PAGE + 0x15]) == b"hello"
    ram.view[PAGE + 0x100:PAGE + 0x104] = b"abcd"
    assert gm.read(0x10100, 4) == b"abcd"
    buf = bytearray(4)
    gm.readinto(0x10100, buf)
    assert buf == b"abcd"


def test_zero_copy_view(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0, 2 * PAGE))
    with gm.view(0x20, 4, write=True) as v:
        v[:] = b"WXYZ"
    assert bytes(ram.view[0x20:0x24]) == b"WXYZ"


def test_access_across_adjacent_regions(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0, PAGE, offset=0))
    gm.map(memfd_region(ram, PAGE, PAGE, offset=8 * PAGE))
    gm.write(PAGE - 2, b"ABCD")
    assert bytes(ram.view[PAGE - 2:PAGE]) == b"AB"
    assert bytes(ram.view[8 * PAGE:8 * PAGE + 2]) == b"CD"
    assert gm.read(PAGE - 2, 4) == b"ABCD"


@pytest.mark.parametrize("addr,length", [
    (2 * PAGE, 4),           # unmapped
    (PAGE - 2, 4),           # partially mapped: runs off the end
    (-4, 8),                 # negative
    ((1 << 64) - 2, 4),      # wraps the address space
])
def test_out_of_range_is_dma_error(ram: MemfdRam, gm: GuestMemory, addr: int,
                                   length: int) -> None:
    gm.map(memfd_region(ram, 0, PAGE))
    with pytest.raises(DmaError) as exc:
        gm.read(addr, length)
    assert exc.value.errno == errno.EFAULT
    with pytest.raises(DmaError):
        gm.write(addr, bytes(length))


def test_hole_between_regions_is_an_error(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0, PAGE))
    gm.map(memfd_region(ram, 2 * PAGE, PAGE, offset=2 * PAGE))
    with pytest.raises(DmaError):
        gm.read(PAGE - 4, PAGE + 8)


def test_read_only_region_refuses_writes(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0, PAGE, writable=False))
    assert gm.read(0, 4) == bytes(4)
    with pytest.raises(DmaError):
        gm.write(0, b"x")


def test_message_dma_is_chunked(gm: GuestMemory) -> None:
    ctx = FakeContext(0x8000, 2 * PAGE, xfer=1000)
    gm.ctx = ctx
    gm.map(DmaRegion(0x8000, 2 * PAGE, True, True))
    data = bytes(range(256)) * 10
    gm.write(0x8010, data)
    assert bytes(ctx.mem[0x10:0x10 + len(data)]) == data
    assert [m[2] for m in ctx.messages] == [1000, 1000, 560]
    ctx.messages.clear()
    assert gm.read(0x8010, len(data)) == data
    assert [(m[1], m[2]) for m in ctx.messages] == [(0x8010, 1000), (0x8010 + 1000, 1000),
                                                   (0x8010 + 2000, 560)]


def test_mixed_fd_and_message_regions(ram: MemfdRam, gm: GuestMemory) -> None:
    ctx = FakeContext(PAGE, PAGE)
    gm.ctx = ctx
    gm.map(memfd_region(ram, 0, PAGE))
    gm.map(DmaRegion(PAGE, PAGE, True, True))
    gm.write(PAGE - 3, b"123456")
    assert bytes(ram.view[PAGE - 3:PAGE]) == b"123"
    assert bytes(ctx.mem[:3]) == b"456"


def test_message_dma_failure_becomes_dma_error(gm: GuestMemory) -> None:
    ctx = FakeContext(0, PAGE)
    ctx.fail = True
    gm.ctx = ctx
    gm.map(DmaRegion(0, PAGE, True, True))
    with pytest.raises(DmaError):
        gm.read(0, 4)


def test_message_dma_without_client(gm: GuestMemory) -> None:
    gm.map(DmaRegion(0, PAGE, True, True))
    with pytest.raises(DmaError):
        gm.read(0, 4)


def test_scatter_gather(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0, 4 * PAGE))
    sg = [SgEntry(0x100, 3), SgEntry(0x2000, 5)]
    assert gm.write_sg(sg, b"abcdefgh") == 8
    assert gm.read_sg(sg) == b"abcdefgh"
    assert bytes(ram.view[0x2000:0x2005]) == b"defgh"


def test_preadv_pwritev_straight_into_guest_memory(ram: MemfdRam, gm: GuestMemory) -> None:
    ctx = FakeContext(8 * PAGE, PAGE)
    gm.ctx = ctx
    gm.map(memfd_region(ram, 0, 4 * PAGE))
    gm.map(DmaRegion(8 * PAGE, PAGE, True, True))
    with tempfile.TemporaryFile() as f:
        payload = os.urandom(3 * 512)
        os.pwrite(f.fileno(), payload, 512)
        sg = [SgEntry(0x200, 512), SgEntry(8 * PAGE, 512), SgEntry(0x1000, 512)]
        assert gm.preadv(f.fileno(), sg, 512) == 3 * 512
        assert bytes(ram.view[0x200:0x400]) == payload[:512]
        assert bytes(ctx.mem[:512]) == payload[512:1024]
        assert bytes(ram.view[0x1000:0x1200]) == payload[1024:]
        assert gm.pwritev(f.fileno(), sg, 4096) == 3 * 512
        assert os.pread(f.fileno(), 3 * 512, 4096) == payload
        # past end of file: short count
        assert gm.preadv(f.fileno(), [SgEntry(0, 1024)], 4096 + 3 * 512 - 100) == 100


class DirectContext(FakeContext):
    """A runtime that reaches guest memory itself (DeviceContext.file_io)."""

    def __init__(self, base: int, size: int) -> None:
        super().__init__(base, size)
        self.file_calls: list[list[tuple[int, int]]] = []

    direct = True

    def file_io(self, fd: int, ranges, offset: int, to_guest: bool,  # type: ignore[no-untyped-def]
                flags: int = 0) -> int:
        self.file_calls.append(list(ranges))
        views = [memoryview(self.mem)[a - self.base:a - self.base + n] for a, n in ranges]
        return (os.preadv if to_guest else os.pwritev)(fd, views, offset, flags)


def test_file_io_through_the_runtime_when_no_region_has_an_fd(
        ram: MemfdRam, gm: GuestMemory) -> None:
    """Regions without an fd, with a runtime that maps the guest: a whole
    list is one file_io call, no message; mixed with fd regions, the
    entries go one by one as before."""
    ctx = DirectContext(8 * PAGE, 4 * PAGE)
    gm.ctx = ctx
    gm.map(DmaRegion(8 * PAGE, 4 * PAGE, True, True))
    gm.map(memfd_region(ram, 0, PAGE))
    with tempfile.TemporaryFile() as f:
        payload = os.urandom(3 * 512)
        os.pwrite(f.fileno(), payload, 0)
        sg = [SgEntry(9 * PAGE, 512), SgEntry(8 * PAGE + 100, 512), SgEntry(11 * PAGE, 512)]
        assert gm.preadv(f.fileno(), sg, 0) == 3 * 512
        assert ctx.file_calls == [[(9 * PAGE, 512), (8 * PAGE + 100, 512), (11 * PAGE, 512)]]
        assert ctx.messages == []
        assert bytes(ctx.mem[PAGE:PAGE + 512]) == payload[:512]
        assert bytes(ctx.mem[100:612]) == payload[512:1024]
        assert gm.pwritev(f.fileno(), sg, 4096) == 3 * 512
        assert os.pread(f.fileno(), 3 * 512, 4096) == payload
        assert gm.preadv(f.fileno(), sg, 4096 + 3 * 512 - 100) == 100  # end of file
        ctx.file_calls.clear()
        assert gm.preadv(f.fileno(), [SgEntry(0x10, 512), SgEntry(9 * PAGE, 512)], 0) == 1024
        assert ctx.file_calls == [] and ctx.messages == [("write", 9 * PAGE, 512)]
        with pytest.raises(DmaError):  # outside every region: refused before the call
            gm.preadv(f.fileno(), [SgEntry(13 * PAGE, 512)], 0)
        assert ctx.file_calls == []


def test_short_accesses_go_straight_to_a_runtime_that_maps_the_guest(
        gm: GuestMemory) -> None:
    """Regions without an fd, with a runtime that maps the guest: a short
    read or write inside one region is one dma_read/dma_write call, also
    under nowait(); region bounds and permissions are still checked before
    the runtime is asked, and its errors become DmaError."""
    ctx = DirectContext(8 * PAGE, 4 * PAGE)
    gm.ctx = ctx
    gm.map(DmaRegion(8 * PAGE, 2 * PAGE, True, True))
    gm.map(DmaRegion(10 * PAGE, 2 * PAGE, True, False))  # read-only
    with gm.nowait():
        gm.write(8 * PAGE + 10, b"header!!")
        assert gm.read(8 * PAGE + 10, 8) == b"header!!"
        buf = bytearray(4)
        gm.readinto(8 * PAGE + 12, buf)
    assert buf == b"ader"
    assert ctx.messages == [("write", 8 * PAGE + 10, 8), ("read", 8 * PAGE + 10, 8),
                            ("read", 8 * PAGE + 12, 4)]
    ctx.messages.clear()
    with pytest.raises(DmaError):
        gm.write(10 * PAGE, b"x")  # read-only region
    with pytest.raises(DmaError):
        gm.read(12 * PAGE - 2, 4)  # past the last region
    assert ctx.messages == []
    # Across the two regions: the piecewise path, within the runtime's limit per call.
    assert gm.read(10 * PAGE - 2, 4) == bytes(4)
    assert ctx.messages == [("read", 10 * PAGE - 2, 2), ("read", 10 * PAGE, 2)]
    ctx.messages.clear()
    assert len(gm.read(8 * PAGE, 1500)) == 1500  # beyond max_data_xfer_size: in pieces
    assert ctx.messages == [("read", 8 * PAGE, 1000), ("read", 8 * PAGE + 1000, 500)]
    ctx.fail = True
    with pytest.raises(DmaError):
        gm.read(8 * PAGE, 4)


def _nowait_reads(fd: int) -> bool:
    """Whether reads inside nowait() can succeed here: the file system
    answers RWF_NOWAIT reads, or keeps its data in memory (tmpfs, which
    refuses the flag)."""
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError:
        return in_memory_fs(fd)
    return True


def test_nowait_reads_from_tmpfs(ram: MemfdRam, gm: GuestMemory) -> None:
    """tmpfs refuses RWF_NOWAIT, but its data is memory: a read inside
    nowait() is done there and then, not handed to a worker; a write still
    is."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    gm.map(memfd_region(ram, 0, PAGE))
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:
        assert in_memory_fs(f.fileno())  # /dev/shm is tmpfs on Linux
        payload = os.urandom(1024)
        os.pwrite(f.fileno(), payload, 0)
        with gm.nowait():
            assert gm.preadv(f.fileno(), [SgEntry(0, 1024)], 0) == 1024
            with pytest.raises(WouldBlock):
                gm.pwritev(f.fileno(), [SgEntry(0, 512)], 0)
        assert ram.read(0, 1024) == payload
    r, w = os.pipe()
    try:
        assert not in_memory_fs(r)  # pipefs: not a file system that holds file data
    finally:
        os.close(r)
        os.close(w)


def test_nowait_refuses_what_would_wait(ram: MemfdRam, gm: GuestMemory,
                                        tmp_path: Path) -> None:
    """Inside nowait(): fd-mapped memory and cached file data work; a DMA
    message to a peer, a file write and uncached data raise WouldBlock; a
    runtime that reaches the guest itself counts as mapped. Outside it,
    everything works as before."""
    gm.map(memfd_region(ram, 0, PAGE))
    ctx = FakeContext(8 * PAGE, 4 * PAGE)
    gm.ctx = ctx
    gm.map(DmaRegion(8 * PAGE, 4 * PAGE, True, True))
    with open(tmp_path / "disk", "w+b") as f:
        payload = os.urandom(1024)
        os.pwrite(f.fileno(), payload, 0)
        # Clean before the NOWAIT reads: a dirty page that background
        # writeback has locked makes the kernel refuse them (EAGAIN), which
        # is right but would fail this test's "cached" reads on a busy host.
        os.fsync(f.fileno())
        if not _nowait_reads(f.fileno()):  # every read refuses: correct, and nothing more to see
            with gm.nowait(), pytest.raises(WouldBlock):
                gm.preadv(f.fileno(), [SgEntry(0, 1024)], 0)
            return
        with gm.nowait():
            assert not gm.may_wait
            gm.write(0x10, b"abc")
            assert gm.read(0x10, 3) == b"abc"
            with pytest.raises(WouldBlock):
                gm.read(8 * PAGE, 4)
            with pytest.raises(WouldBlock):
                gm.pwritev(f.fileno(), [SgEntry(0, 512)], 0)
            assert gm.preadv(f.fileno(), [SgEntry(0, 1024)], 0) == 1024  # cached: just written
        assert gm.may_wait and ctx.messages == []
        assert ram.read(0, 1024) == payload
        assert gm.read(8 * PAGE, 4) == bytes(4)  # outside nowait: a message
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with gm.nowait(), pytest.raises(WouldBlock):
            gm.preadv(f.fileno(), [SgEntry(0, 1024)], 0)
        direct = DirectContext(8 * PAGE, 4 * PAGE)
        gm.ctx = direct
        with gm.nowait():
            assert gm.read(8 * PAGE, 4) == bytes(4)
            os.pread(f.fileno(), 1024, 0)  # into the page cache again
            assert gm.preadv(f.fileno(), [SgEntry(9 * PAGE, 1024)], 0) == 1024
        assert bytes(direct.mem[PAGE:PAGE + 1024]) == payload


def test_unmap_waits_for_in_flight_dma(ram: MemfdRam, gm: GuestMemory) -> None:
    region = memfd_region(ram, 0, PAGE)
    gm.map(region)
    inside = threading.Event()
    release = threading.Event()
    unmapped = threading.Event()

    def busy() -> None:
        with gm.view(0, 16, write=True) as v:
            inside.set()
            release.wait(5)
            v[:4] = b"late"  # still valid: unmap has not returned

    worker = threading.Thread(target=busy)
    worker.start()
    assert inside.wait(5)
    def unmap() -> None:
        gm.unmap(region)
        unmapped.set()

    unmapper = threading.Thread(target=unmap)
    unmapper.start()
    assert not unmapped.wait(0.05)  # unmap must not return while the view is in use
    with pytest.raises(DmaError):  # new accesses are refused at once
        gm.read(0, 4)
    release.set()
    worker.join(5)
    unmapper.join(5)
    assert unmapped.is_set()
    assert bytes(ram.view[:4]) == b"late"


def test_dirty_logging(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 0x100000, 8 * PAGE))
    gm.logging_start(PAGE)
    gm.write(0x100000 + 10, b"x")
    gm.write(0x100000 + 3 * PAGE - 1, b"yz")  # pages 2 and 3
    bitmap = gm.logging_report(0x100000, 8 * PAGE, PAGE)
    assert int.from_bytes(bitmap, "little") == 0b1101
    assert int.from_bytes(gm.logging_report(0x100000, 8 * PAGE, PAGE), "little") == 0
    gm.write(0x100000 + 5 * PAGE, b"q")
    # a report of a sub-range: bit 0 = first page of the range
    assert int.from_bytes(gm.logging_report(0x100000 + 4 * PAGE, 2 * PAGE, PAGE),
                          "little") == 0b10
    gm.logging_stop()
    with pytest.raises(DeviceError):
        gm.logging_report(0x100000, PAGE, PAGE)


def test_message_dma_is_not_logged(gm: GuestMemory) -> None:
    gm.ctx = FakeContext(0, PAGE)
    gm.map(DmaRegion(0, PAGE, True, True))
    gm.logging_start(PAGE)
    gm.write(0, b"abc")
    assert gm.logging_report(0, PAGE, PAGE) == bytes(8)


def test_bad_fd_is_refused(gm: GuestMemory) -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(DmaError):
        gm.map(DmaRegion(0, PAGE, True, True, r))
    with pytest.raises(OSError):
        os.close(r)  # ownership passed and the fd was closed


def test_dirty_report_range_wider_than_the_region(ram: MemfdRam, gm: GuestMemory) -> None:
    gm.map(memfd_region(ram, 4 * PAGE, 2 * PAGE))
    gm.logging_start(PAGE)
    gm.write(5 * PAGE + 1, b"z")
    bitmap = int.from_bytes(gm.logging_report(0, 70 * PAGE, PAGE), "little")
    assert bitmap == 1 << 5
    assert len(gm.logging_report(0, 70 * PAGE, PAGE)) == 16  # u64 words


def test_preadv_batches_many_entries_and_marks_dirty(gm: GuestMemory) -> None:
    """A long list of fd-mapped entries (more than IOV_MAX, with a region
    boundary in the middle of one) moves in batched system calls with the
    same result as entry by entry, and dirty logging sees every page."""
    ram = MemfdRam(128 * PAGE)
    gm.map(memfd_region(ram, 0, 64 * PAGE))
    gm.map(memfd_region(ram, 64 * PAGE, 64 * PAGE, offset=64 * PAGE))
    gm.logging_start(PAGE)
    # 1500 entries of 100 bytes, scattered; one straddles the two regions.
    sg = [SgEntry(i * 300 % (128 * PAGE - 100), 100) for i in range(1500)]
    sg[700] = SgEntry(64 * PAGE - 50, 100)
    with tempfile.TemporaryFile() as f:
        payload = os.urandom(1500 * 100)
        os.pwrite(f.fileno(), payload, 0)
        assert gm.preadv(f.fileno(), sg, 0) == len(payload)
        got = b"".join(bytes(ram.view[e.addr:e.addr + e.length]) for e in sg[-300:])
        assert got == payload[-300 * 100:]
        assert bytes(ram.view[64 * PAGE - 50:64 * PAGE + 50]) == payload[70000:70100]
        assert gm.pwritev(f.fileno(), sg[-300:], len(payload)) == 300 * 100
        assert os.pread(f.fileno(), 300 * 100, len(payload)) == payload[-300 * 100:]
    assert gm.logging_report(0, 64 * PAGE, PAGE)[7] & 0x80  # page 63 (the straddle)
    gm.unmap_all()
    ram.close()
