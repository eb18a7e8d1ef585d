"""Guest memory: bounded LRU of 1 MiB foreign mappings, typed errors, invalidation."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from bridge.xen.errors import GuestMemoryError
from bridge.xen.fake import FakeXen
from bridge.xen.guestmem import BUCKET_SIZE, GuestMemory

MiB = 1 << 20


@pytest.fixture
def xen() -> Iterator[FakeXen]:
    fake = FakeXen(ram_pages=1024)  # 4 MiB of guest RAM
    yield fake
    fake.close()


def test_read_write_round_trip_across_pages_and_buckets(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid)
    data = bytes(range(256)) * 40
    gpa = MiB - 5000
    mem.write(gpa, data)
    assert bytes(xen.ram[gpa:gpa + len(data)]) == data
    assert mem.read(gpa, len(data)) == data
    buf = bytearray(10)
    mem.readinto(gpa + 3, buf)
    assert bytes(buf) == data[3:13]
    assert mem.mapped_buckets == 2


def test_lru_keeps_at_most_max_buckets_and_unmaps_the_oldest(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid, max_buckets=2)
    mem.read(0, 1)
    mem.read(MiB, 1)
    mem.read(0, 1)  # bucket 0 is now the most recent
    mem.read(2 * MiB, 1)
    assert mem.mapped_buckets == 2
    assert [m.closed for m in xen.maps] == [False, True, False]
    maps = mem.maps
    mem.read(0, 1)
    assert mem.maps == maps  # still cached


def test_invalidate_unmaps_everything(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid)
    mem.read(0, 1)
    mem.read(3 * MiB, 1)
    mem.invalidate()
    assert mem.mapped_buckets == 0 and all(m.closed for m in xen.maps)
    assert mem.read(0, 1) == b"\0" and mem.mapped_buckets == 1  # maps afresh


def test_closed_memory_unmaps_and_refuses_further_access(xen: FakeXen) -> None:
    """A device server's session ended: a late DMA from one of its workers
    must not map the guest again."""
    mem = GuestMemory(xen, xen.domid)
    mem.read(0, 1)
    mem.close()
    assert mem.mapped_buckets == 0 and all(m.closed for m in xen.maps)
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.write(0x10, b"late")
    assert mem.mapped_buckets == 0 and bytes(xen.ram[0x10:0x14]) == b"\0" * 4


def test_hole_page_refuses_and_nothing_is_written(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid)
    xen.holes.add(2)
    with pytest.raises(GuestMemoryError) as info:
        mem.write(0x1FF0, b"\xAA" * 0x20)  # half in page 1, half in the hole
    assert info.value.errno == 14  # EFAULT, for a DMA reply
    assert bytes(xen.ram[0x1FF0:0x2010]) == b"\0" * 0x20
    with pytest.raises(GuestMemoryError):
        mem.read(0x2000, 1)


def test_page_populated_later_is_remapped_once(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid)
    xen.holes.update({5, 6})
    with pytest.raises(GuestMemoryError):
        mem.read(5 * 4096, 4)
    xen.holes.discard(5)
    assert mem.read(5 * 4096, 4) == b"\0" * 4  # the miss re-mapped the bucket
    maps = mem.maps
    for _ in range(3):  # still a hole after the re-map: no mapping storm
        with pytest.raises(GuestMemoryError):
            mem.read(6 * 4096, 4)
    assert mem.maps == maps


def test_beyond_guest_ram_and_limits(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid, limit=1 << 40)
    with pytest.raises(GuestMemoryError):
        mem.read(4 * MiB, 1)  # past the last page of RAM
    with pytest.raises(GuestMemoryError):
        mem.read(64 * MiB, 1)  # Xen refuses the whole mapping
    with pytest.raises(GuestMemoryError):
        mem.read((1 << 40) - 2, 4)
    with pytest.raises(GuestMemoryError):
        mem.read(-4096, 4)
    with pytest.raises(GuestMemoryError):
        mem.read(0, -1)


def test_one_access_never_spans_more_buckets_than_the_cache(xen: FakeXen) -> None:
    mem = GuestMemory(xen, xen.domid, max_buckets=2)
    with pytest.raises(GuestMemoryError):
        mem.read(0, BUCKET_SIZE + 1)
    assert len(mem.read(100, BUCKET_SIZE)) == BUCKET_SIZE
    with pytest.raises(ValueError):
        GuestMemory(xen, xen.domid, max_buckets=1)


def test_access_over_a_page_populated_later_and_one_before_it(xen: FakeXen) -> None:
    """The bad page re-maps its bucket in the middle of an access: the
    pieces before it must use the new mapping, not the closed one."""
    mem = GuestMemory(xen, xen.domid)
    xen.holes.add(3)
    with pytest.raises(GuestMemoryError):
        mem.read(3 * 4096, 4)
    xen.holes.discard(3)
    mem.write(2 * 4096 + 4090, b"abcdefghij")  # page 2, then page 3
    assert bytes(xen.ram[2 * 4096 + 4090:2 * 4096 + 4100]) == b"abcdefghij"
    assert mem.read(2 * 4096 + 4090, 10) == b"abcdefghij"


def test_a_re_map_that_loses_a_page_refuses_the_access(xen: FakeXen) -> None:
    """Page 5 was a hole and is populated now, page 2 was good and is a
    hole now: the access over 2..5 re-maps for page 5, and the new mapping
    must be checked again, for page 2."""
    mem = GuestMemory(xen, xen.domid)
    xen.holes.add(5)
    mem.read(0, 1)  # bucket 0 mapped with page 5 bad
    xen.holes = {2}
    with pytest.raises(GuestMemoryError):
        mem.write(2 * 4096, b"\xAA" * (4 * 4096))
    assert bytes(xen.ram[2 * 4096:6 * 4096]) == bytes(4 * 4096)


def scattered(n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` ranges of assorted sizes, none overlapping, all over the 4 MiB."""
    rng = random.Random(seed)
    pages = rng.sample(range(0, 1022, 2), n)  # a range covers at most two pages
    return [(p * 4096 + rng.randrange(64), rng.choice((512, 4000, 6000))) for p in pages]


@pytest.mark.parametrize("max_buckets", [2, 3, 64])
def test_file_io_moves_scattered_ranges_through_the_mappings(
        xen: FakeXen, tmp_path, max_buckets: int) -> None:
    mem = GuestMemory(xen, xen.domid, max_buckets=max_buckets)
    ranges = scattered(300, max_buckets)
    total = sum(n for _, n in ranges)
    content = random.Random(1).randbytes(total + 100)
    path = tmp_path / "disk"
    path.write_bytes(content)
    with open(path, "r+b") as f:
        assert mem.file_io(f.fileno(), ranges, 100, to_guest=True) == total
        pos = 100
        for gpa, n in ranges:
            assert bytes(xen.ram[gpa:gpa + n]) == content[pos:pos + n]
            pos += n
        assert mem.mapped_buckets <= max_buckets
        # And back out, reversed, somewhere else in the file.
        back = list(reversed(ranges))
        assert mem.file_io(f.fileno(), back, 0, to_guest=False) == total
        f.seek(0)
        expect = b"".join(bytes(xen.ram[g:g + n]) for g, n in back)
        assert f.read(total) == expect


def test_file_io_short_at_end_of_file_and_refused_hole(xen: FakeXen, tmp_path) -> None:
    mem = GuestMemory(xen, xen.domid, max_buckets=2)
    path = tmp_path / "disk"
    path.write_bytes(b"x" * 5000)
    ranges = [(0x10000, 4096), (2 * MiB, 4096)]
    with open(path, "rb") as f:
        assert mem.file_io(f.fileno(), ranges, 0, to_guest=True) == 5000
        assert bytes(xen.ram[2 * MiB:2 * MiB + 904]) == b"x" * 904
        assert bytes(xen.ram[2 * MiB + 904:2 * MiB + 4096]) == bytes(3192)
        xen.holes.add(3 * MiB // 4096)
        with pytest.raises(GuestMemoryError):
            mem.file_io(f.fileno(), [(0x20000, 100), (3 * MiB, 100)], 0, to_guest=True)
        assert bytes(xen.ram[3 * MiB:3 * MiB + 100]) == bytes(100)
        with pytest.raises(GuestMemoryError):
            mem.file_io(f.fileno(), [(4 * MiB - 10, 100)], 0, to_guest=True)


def test_file_io_passes_rwf_nowait_to_the_file(xen: FakeXen, tmp_path) -> None:
    """A device's inline read (GuestMemory.nowait) asks with RWF_NOWAIT: data
    not in the page cache raises BlockingIOError instead of waiting."""
    import os
    mem = GuestMemory(xen, xen.domid)
    path = tmp_path / "disk"
    path.write_bytes(b"y" * 8192)
    with open(path, "rb") as f:
        fd = f.fileno()
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except OSError:
            pytest.skip("this file system refuses RWF_NOWAIT reads (tmpfs)")
        assert mem.file_io(fd, [(0x3000, 8192)], 0, True, os.RWF_NOWAIT) == 8192
        assert bytes(xen.ram[0x3000:0x5000]) == b"y" * 8192
        os.fsync(fd)  # dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with pytest.raises(BlockingIOError):
            mem.file_io(fd, [(0x8000, 4096)], 0, True, os.RWF_NOWAIT)
        assert mem.file_io(fd, [(0x8000, 4096)], 0, True) == 4096


class SlowMapXen(FakeXen):
    """Mapping takes a while (as a real hypercall does), so other threads run meanwhile."""

    def map_foreign(self, domid: int, gfns: list[int]):  # type: ignore[no-untyped-def]
        time.sleep(0.0005)
        return super().map_foreign(domid, gfns)


def test_threads_sharing_the_cache_never_copy_through_an_evicted_mapping() -> None:
    # The bridge's ioreq thread and each device's DMA thread share one
    # GuestMemory. Every access spans two buckets of a cache that holds three,
    # so without the lock another thread evicts a bucket between the lookup
    # and the copy (with real mappings the copy would land in whatever is
    # mapped there next).
    xen = SlowMapXen(ram_pages=16 * 256)
    mem = GuestMemory(xen, xen.domid, max_buckets=3)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(150):
                gpa = rnd.randrange(seed + 1, 16, 3) * MiB - 2048
                data = rnd.randbytes(4096)
                mem.write(gpa, data)
                assert mem.read(gpa, 4096) == data
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    # Thread i uses every third MiB boundary from i + 1: what it reads back is its own.
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    xen.close()
    assert not errors, errors[:3]
    assert mem.mapped_buckets <= 3


def test_remap_midway_through_an_access_checks_every_page_again(xen: FakeXen) -> None:
    """Page 4 is good and page 5 a hole when the bucket is first mapped; the
    guest then populates 5 and gives 4 back. An access over both re-maps the
    bucket for page 5, which closes the mapping page 4 was checked against:
    the access must fail cleanly, with nothing written, not copy through the
    closed mapping or the now-missing page."""
    mem = GuestMemory(xen, xen.domid)
    xen.holes.add(5)
    assert mem.read(4 * 4096, 4) == b"\0" * 4
    xen.holes.discard(5)
    xen.holes.add(4)
    with pytest.raises(GuestMemoryError) as info:
        mem.write(5 * 4096 - 8, b"\xAA" * 16)
    assert info.value.errno == 14
    assert bytes(xen.ram[5 * 4096 - 8:5 * 4096 + 8]) == b"\0" * 16
    xen.holes.discard(4)  # both pages good again, but the bucket was re-mapped once
    with pytest.raises(GuestMemoryError):
        mem.read(4 * 4096, 4)
    mem.write(5 * 4096, b"\xBB" * 4)  # page 5 works through the new mapping
    assert bytes(xen.ram[5 * 4096:5 * 4096 + 4]) == b"\xBB" * 4


def test_file_io_pins_its_mappings_without_holding_the_cache(
        xen: FakeXen, tmp_path, monkeypatch) -> None:
    """While one command's read is in the file system, an INVALIDATE and
    other accesses go ahead: the invalidated bucket leaves the cache at once
    (the next access maps afresh) and is unmapped when the read ends."""
    import os
    mem = GuestMemory(xen, xen.domid, max_buckets=2)
    path = tmp_path / "disk"
    path.write_bytes(b"z" * 8192)
    in_read, go = threading.Event(), threading.Event()
    real_preadv = os.preadv

    def slow_preadv(fd, views, offset, flags=0):
        in_read.set()
        assert go.wait(10)
        return real_preadv(fd, views, offset, flags)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    moved: list[int] = []
    with open(path, "rb") as f:
        worker = threading.Thread(target=lambda: moved.append(
            mem.file_io(f.fileno(), [(0x1000, 8192)], 0, to_guest=True)))
        worker.start()
        assert in_read.wait(5)
        (pinned,) = xen.maps
        mem.invalidate()  # does not wait for the read
        assert mem.mapped_buckets == 0 and not pinned.closed
        mem.write(0x100, b"meanwhile")  # a fresh mapping of the same bucket
        mem.read(1 * MiB, 1)
        mem.read(2 * MiB, 1)  # evicts the fresh one: not pinned, unmapped now
        assert xen.maps[1].closed and not pinned.closed
        go.set()
        worker.join(5)
    assert moved == [8192] and pinned.closed
    assert bytes(xen.ram[0x1000:0x3000]) == b"z" * 8192
    assert bytes(xen.ram[0x100:0x109]) == b"meanwhile"
    assert mem.mapped_buckets == 2


def test_file_io_after_close_is_refused(xen: FakeXen, tmp_path) -> None:
    mem = GuestMemory(xen, xen.domid)
    path = tmp_path / "disk"
    path.write_bytes(b"w" * 4096)
    mem.close()
    with open(path, "rb") as f, pytest.raises(GuestMemoryError, match="closed"):
        mem.file_io(f.fileno(), [(0, 4096)], 0, to_guest=True)
    assert not xen.maps and bytes(xen.ram[:4096]) == bytes(4096)
