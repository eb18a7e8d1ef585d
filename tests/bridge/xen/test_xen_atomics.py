"""Atomic ring-pointer helpers, with libatomic and with the fallback."""

from __future__ import annotations

import pytest

from bridge.xen.atomics import Atomics
from bridge.xen.fake import FakeMapping


@pytest.mark.parametrize("atomics", [Atomics.load(), Atomics(None, None)],
                         ids=["libatomic", "fallback"])
def test_fetch_add_wraps_and_returns_the_old_value(atomics: Atomics) -> None:
    page = FakeMapping(bytearray(4096), 0, 4096)
    page.view[4:8] = (0xFFFFFFFE).to_bytes(4, "little")
    assert atomics.fetch_add_u32(page, 4, 3) == 0xFFFFFFFE
    assert atomics.load_u32(page, 4) == 1
    assert bytes(page.view[0:4]) == b"\0" * 4 and bytes(page.view[8:12]) == b"\0" * 4
    atomics.fence()


def test_unaligned_or_outside_offsets_are_refused() -> None:
    atomics = Atomics.load()
    if not atomics.atomic:
        pytest.skip("libatomic.so.1 not installed")
    page = FakeMapping(bytearray(4096), 0, 4096)
    for offset in (2, 4094, 4096, -4):
        with pytest.raises(ValueError):
            atomics.fetch_add_u32(page, offset, 1)
