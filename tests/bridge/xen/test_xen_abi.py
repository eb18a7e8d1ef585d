"""Request decoding with hostile field values: one test per validation rule (XSA-199)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.xen import abi
from bridge.xen.abi import IoreqDir, IoreqState, IoreqType, RawIoreq, Sbdf
from bridge.xen.errors import InvalidIoreq

U64 = (1 << 64) - 1
GOOD_MMIO = RawIoreq(addr=0xFE000000, data=0, count=1, size=4, vp_eport=3, pad0=0,
                     state=IoreqState.IOREQ_READY, data_is_ptr=0, dir=IoreqDir.READ, df=0,
                     pad1=0, type=IoreqType.COPY)
GOOD_PIO = dataclasses.replace(GOOD_MMIO, addr=0x1F0, type=IoreqType.PIO, size=2)
GOOD_CFG = dataclasses.replace(GOOD_MMIO, addr=(0x28 << 32) | 0x10, type=IoreqType.PCI_CONFIG)


def decode(raw: RawIoreq) -> abi.Ioreq:
    return abi.decode_ioreq(abi.pack_ioreq(raw))


def rejects(raw: RawIoreq, field: str) -> None:
    with pytest.raises(InvalidIoreq) as info:
        decode(raw)
    assert info.value.field == field


def test_good_requests_decode() -> None:
    assert decode(GOOD_MMIO) == abi.Ioreq(IoreqType.COPY, IoreqDir.READ, 0xFE000000, 0, 4, 1,
                                          False, False)
    assert decode(GOOD_PIO).addr == 0x1F0
    cfg = decode(GOOD_CFG)
    assert (cfg.sbdf, cfg.reg) == (0x28, 0x10)


@pytest.mark.parametrize("state", [0, 2, 3, 4, 9, 15])
def test_state_other_than_ready(state: int) -> None:
    rejects(dataclasses.replace(GOOD_MMIO, state=state), "state")


@pytest.mark.parametrize("typ", [3, 4, 5, 6, 9, 10, 0x7F, 0xFF])
def test_unknown_type(typ: int) -> None:
    rejects(dataclasses.replace(GOOD_MMIO, type=typ), "type")


@pytest.mark.parametrize("size", [0, 3, 5, 6, 7, 9, 16, 0x80000000, 0xFFFFFFFF])
def test_bad_size(size: int) -> None:
    rejects(dataclasses.replace(GOOD_MMIO, size=size), "size")


def test_port_io_has_no_8_byte_accesses_and_config_neither() -> None:
    rejects(dataclasses.replace(GOOD_PIO, size=8), "size")
    rejects(dataclasses.replace(GOOD_CFG, size=8), "size")
    assert decode(dataclasses.replace(GOOD_MMIO, size=8)).size == 8


@pytest.mark.parametrize("count", [0, abi.MAX_REP_COUNT + 1, 0x80000000, 0xFFFFFFFF])
def test_count_bounds(count: int) -> None:
    rejects(dataclasses.replace(GOOD_MMIO, count=count), "count")


def test_count_at_the_bound_is_accepted() -> None:
    assert decode(dataclasses.replace(GOOD_MMIO, count=abi.MAX_REP_COUNT)).count == 4096


@pytest.mark.parametrize(("port", "size"), [(0x10000, 1), (0xFFFF, 2), (0xFFFD, 4), (U64, 1),
                                            (1 << 32, 1)])
def test_port_beyond_64k(port: int, size: int) -> None:
    rejects(dataclasses.replace(GOOD_PIO, addr=port, size=size), "addr")


def test_last_ports_are_fine() -> None:
    assert decode(dataclasses.replace(GOOD_PIO, addr=0xFFFF, size=1)).addr == 0xFFFF
    assert decode(dataclasses.replace(GOOD_PIO, addr=0xFFFC, size=4)).addr == 0xFFFC


def test_mmio_string_wrapping_the_address_space() -> None:
    rejects(dataclasses.replace(GOOD_MMIO, addr=U64 - 3, size=8), "addr")
    rejects(dataclasses.replace(GOOD_MMIO, addr=U64 - 0x100, count=0x100, size=4), "addr")
    assert decode(dataclasses.replace(GOOD_MMIO, addr=U64 - 3, size=4)).addr == U64 - 3


def test_descending_mmio_string_below_zero() -> None:
    rejects(dataclasses.replace(GOOD_MMIO, addr=8, count=4, size=4, df=1), "addr")
    assert decode(dataclasses.replace(GOOD_MMIO, addr=12, count=4, size=4, df=1)).step == -4


def test_pointer_string_wrapping_or_below_zero() -> None:
    ptr = dataclasses.replace(GOOD_PIO, data_is_ptr=1, count=16)
    rejects(dataclasses.replace(ptr, data=U64 - 8), "data")
    rejects(dataclasses.replace(ptr, data=16, df=1), "data")
    ok = decode(dataclasses.replace(ptr, data=0x5000))
    assert ok.data_is_ptr and ok.data == 0x5000  # pointers are not masked to the size


def test_write_value_is_masked_to_the_access_size() -> None:
    req = decode(dataclasses.replace(GOOD_MMIO, dir=IoreqDir.WRITE, size=2, data=U64))
    assert req.data == 0xFFFF


def test_pci_config_rules() -> None:
    rejects(dataclasses.replace(GOOD_CFG, count=2), "count")
    rejects(dataclasses.replace(GOOD_CFG, data_is_ptr=1, data=0x1000), "count")
    rejects(dataclasses.replace(GOOD_CFG, df=1), "count")
    rejects(dataclasses.replace(GOOD_CFG, addr=(0x28 << 32) | 0xFFE, size=4), "addr")
    rejects(dataclasses.replace(GOOD_CFG, addr=(0x28 << 32) | 0xFFFFFFFF, size=1), "addr")
    assert decode(dataclasses.replace(GOOD_CFG, addr=(0x28 << 32) | 0xFFC)).reg == 0xFFC


def test_pci_config_address_decoding() -> None:
    addr = (0x1234 << 48) | (0xAB << 40) | (0x1F << 35) | (0x7 << 32) | 0x3FC
    req = decode(dataclasses.replace(GOOD_CFG, addr=addr))
    assert Sbdf.from_int(req.sbdf) == Sbdf(0x1234, 0xAB, 0x1F, 7)
    assert req.reg == 0x3FC
    assert str(Sbdf.from_int(req.sbdf)) == "1234:ab:1f.7"
    assert Sbdf(0x1234, 0xAB, 0x1F, 7).to_int() == req.sbdf
    with pytest.raises(ValueError):
        Sbdf(0, 0, 32, 0).to_int()


def test_invalidate_and_timeoffset_ignore_addressing_but_reject_pointers() -> None:
    inv = dataclasses.replace(GOOD_MMIO, type=IoreqType.INVALIDATE, size=0xFFFF, count=0,
                              addr=U64, data=U64)
    assert decode(inv).type is IoreqType.INVALIDATE
    rejects(dataclasses.replace(inv, data_is_ptr=1), "data_is_ptr")
    off = decode(dataclasses.replace(inv, type=IoreqType.TIMEOFFSET, data=U64))
    assert off.data == U64


def test_snapshot_must_be_one_slot() -> None:
    with pytest.raises(ValueError):
        abi.decode_ioreq(b"\0" * 31)


def test_state_byte_helpers_keep_the_other_bit_fields() -> None:
    bits = abi.pack_ioreq(dataclasses.replace(GOOD_MMIO, data_is_ptr=1, dir=1, df=1,
                                              pad1=1))[abi.IOREQ_STATE_OFFSET]
    new = abi.with_state(bits, IoreqState.IORESP_READY)
    assert abi.state_of(new) == IoreqState.IORESP_READY and new & 0xF0 == bits & 0xF0


@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_decode_to_a_bounded_request_or_a_typed_error(blob: bytes) -> None:
    try:
        req = abi.decode_ioreq(blob)
    except InvalidIoreq:
        return
    if req.type in (IoreqType.PIO, IoreqType.COPY, IoreqType.PCI_CONFIG):
        assert req.size in (1, 2, 4, 8) and 1 <= req.count <= abi.MAX_REP_COUNT
        if req.type is IoreqType.PIO:
            assert req.addr + req.size <= 0x10000
        if req.data_is_ptr:
            low = req.data - (req.count - 1) * req.size if req.df else req.data
            assert low >= 0 and low + req.count * req.size <= 1 << 64


@pytest.mark.parametrize(("size_log2", "size"), [(0, 1), (1, 2), (2, 4)])
def test_buffered_sizes(size_log2: int, size: int) -> None:
    raw = abi.RawBufIoreq(IoreqType.COPY, 0, 0, size_log2, 0xA1234, 0xFFFFFFFF)
    req = abi.decode_buf_ioreq(abi.pack_buf_ioreq(raw), None)
    assert (req.size, req.addr, req.data, req.count) == (size, 0xA1234, abi.size_mask(size), 1)


def test_buffered_qword_needs_its_second_slot() -> None:
    first = abi.pack_buf_ioreq(abi.RawBufIoreq(IoreqType.COPY, 0, 0, 3, 0xA0000, 1))
    assert abi.buf_ioreq_slots(first) == 2
    with pytest.raises(InvalidIoreq):
        abi.decode_buf_ioreq(first, None)
    second = abi.pack_buf_ioreq(abi.RawBufIoreq(0xFF, 1, 1, 3, 0xFFFFF, 2))
    assert abi.decode_buf_ioreq(first, second).data == (2 << 32) | 1


@pytest.mark.parametrize(("typ", "direction", "addr", "field"), [
    (IoreqType.COPY, 1, 0xA0000, "dir"),
    (IoreqType.PCI_CONFIG, 0, 0, "type"),
    (IoreqType.INVALIDATE, 0, 0, "type"),
    (0x42, 0, 0, "type"),
    (IoreqType.PIO, 0, 0x10000, "addr"),
])
def test_buffered_rejects(typ: int, direction: int, addr: int, field: str) -> None:
    raw = abi.RawBufIoreq(typ, 0, direction, 0, addr, 0)
    with pytest.raises(InvalidIoreq) as info:
        abi.decode_buf_ioreq(abi.pack_buf_ioreq(raw), None)
    assert info.value.field == field


@given(st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8))
def test_any_buffered_entry_decodes_to_a_write_or_a_typed_error(a: bytes, b: bytes) -> None:
    try:
        req = abi.decode_buf_ioreq(a, b)
    except InvalidIoreq:
        return
    assert req.dir is IoreqDir.WRITE and req.count == 1 and not req.data_is_ptr
