"""The engine's direct DMA table (no libvfio-user needed: plain memory)."""

from __future__ import annotations

import errno
import threading

import pytest

from xdevproto.errors import VfioUserError
from xdevproto.lvu.direct import DirectMaps
from xdevproto.lvu.loader import ffi


def _memory(size: int) -> tuple[object, int]:
    buf = ffi.new("char[]", size)
    return buf, int(ffi.cast("uintptr_t", buf))


def test_copies_inside_one_region_and_queues_dirty_writes() -> None:
    keep, addr = _memory(0x2000)
    maps = DirectMaps()
    maps.add(0x10000, 0x2000, addr, writable=True)
    maps.add(0x20000, 0x1000, 0, writable=True)  # no fd: not direct
    assert maps.write(0x10ffe, b"abcd")
    assert maps.read(0x10ffe, 4) == b"abcd"
    assert ffi.buffer(keep)[0xffe:0x1002] == b"abcd"
    assert maps.take_dirty() == [(0x10ffe, 4)] and maps.take_dirty() == []
    assert maps.read(0x11ffe, 4) is None  # runs past the region
    assert maps.read(0x20000, 4) is None and not maps.write(0x20000, b"x")


def test_a_read_only_region_refuses_writes_with_eperm() -> None:
    _keep, addr = _memory(0x1000)
    maps = DirectMaps()
    maps.add(0, 0x1000, addr, writable=False)
    with pytest.raises(VfioUserError) as e:
        maps.write(0, b"x")
    assert e.value.errno == errno.EPERM
    assert maps.take_dirty() == []


def test_remove_waits_for_copies_in_flight() -> None:
    _keep, addr = _memory(0x1000)
    maps = DirectMaps()
    maps.add(0, 0x1000, addr, writable=True)
    user = maps._acquire(0, 16)  # a copy in progress on a worker
    assert user is not None
    removed = threading.Event()

    def unmap() -> None:
        maps.remove(0, 0x1000)
        removed.set()

    t = threading.Thread(target=unmap)
    t.start()
    assert not removed.wait(0.2)
    assert maps.read(0, 16) is None  # already gone for new copies
    maps._release(user)
    t.join(10)
    assert removed.is_set()
