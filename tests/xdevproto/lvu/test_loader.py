"""The loader's refusals: no library, missing symbols, an older library.

These use stand-in library objects, so they run without libvfio-user.
"""

from __future__ import annotations

from typing import Any

import pytest

from xdevproto import wire
from xdevproto.lvu import cdef, loader


class FakeLib:
    """Answers like libvfio-user would, with knobs for what an old one does."""

    def __init__(self, missing: str = "", takes_12k_bar: bool = False,
                 sg_size: int = 40) -> None:
        self.missing = missing
        self.takes_12k_bar = takes_12k_bar
        self.sg_size = sg_size
        self.destroyed = False

    def __getattr__(self, name: str) -> Any:
        if name == self.missing or name not in cdef.FUNCTIONS:
            raise AttributeError(name)
        return getattr(self, "_" + name, lambda *a: 0)

    def _dma_sg_size(self) -> int:
        return self.sg_size

    def _vfu_create_ctx(self, *_: Any) -> object:
        return object()

    def _vfu_setup_region(self, _ctx: Any, _idx: int, size: int, *_: Any) -> int:
        if size & (size - 1) and not self.takes_12k_bar:
            return -1
        return 0

    def _vfu_destroy_ctx(self, _ctx: Any) -> None:
        self.destroyed = True


def test_a_library_that_passes_the_checks_is_accepted() -> None:
    lib = FakeLib()
    loader.check_abi(lib, "fake")
    assert lib.destroyed, "the probe context must be destroyed"


def test_a_missing_symbol_is_named() -> None:
    with pytest.raises(loader.AbiMismatch, match="lacks vfu_sgl_read"):
        loader.check_abi(FakeLib(missing="vfu_sgl_read"), "fake")


def test_an_implausible_sg_size_is_refused() -> None:
    with pytest.raises(loader.AbiMismatch, match="dma_sg_size"):
        loader.check_abi(FakeLib(sg_size=0), "fake")


def test_a_library_from_before_64bit_bars_is_refused() -> None:
    lib = FakeLib(takes_12k_bar=True)
    with pytest.raises(loader.AbiMismatch, match="predates libvfio-user #832"):
        loader.check_abi(lib, "fake")
    assert lib.destroyed


def test_an_absent_library_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Any) -> None:
    monkeypatch.setattr(loader, "_lib", None)
    monkeypatch.setenv(loader.ENV_LIBRARY, str(tmp_path / "libvfio-user.so.0"))
    with pytest.raises(loader.LibraryUnavailable, match="nutanix/libvfio-user"):
        loader.load()
    reason = loader.unavailable_reason()
    assert reason is not None and "cannot load" in reason


def test_constants_match_the_wire_numbering() -> None:
    # The bindings' IRQ types and region indexes double as vfio-user's numbers.
    assert {t.name: int(t) for t in cdef.IrqType} == {i.name: int(i) for i in wire.IrqIndex}
    assert [int(r) for r in cdef.Region] == [int(r) for r in wire.PciRegion]
