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
