"""Properties under arbitrary guest accesses: answers have the asked length,
read-only identity and the capability chain survive any write sequence,
and nothing but DeviceError ever escapes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pci_sample_device import SampleDevice

from xdevproto.errors import DeviceError
from xdevproto.wire import PciRegion

CFG = PciRegion.CONFIG
SIZES = {CFG: 4096, 0: 0x1000, 1: 32, 2: 0x4000}

access = st.tuples(
    st.sampled_from(sorted(SIZES)),
    st.integers(0, 0x3FFF),
    st.sampled_from([1, 2, 4, 8, 3, 16]),
    st.binary(min_size=16, max_size=16),
)


def walk(dev: SampleDevice) -> list[int]:
    ids: list[int] = []
    ptr = dev.region_read(CFG, 0x34, 1)[0]
    while ptr and len(ids) < 48:
        ids.append(dev.region_read(CFG, ptr, 1)[0])
        ptr = dev.region_read(CFG, ptr + 1, 1)[0]
    return ids


@settings(max_examples=150, deadline=None)
@given(st.lists(access, max_size=40))
def test_any_access_sequence_keeps_the_rules(ops: list[tuple[int, int, int, bytes]]) -> None:
    dev = SampleDevice()
    ident = dev.region_read(CFG, 0, 0x10)
    for region, off, n, data in ops:
        off %= SIZES[region] - n + 1
        try:
            dev.region_write(region, off, data[:n])
            assert len(dev.region_read(region, off, n)) == n
        except DeviceError:
            pass
    after = dev.region_read(CFG, 0, 0x10)
    assert after[0:4] == ident[0:4]  # vendor/device
    assert after[8:12] == ident[8:12]  # revision/class
    assert after[0x0E] == ident[0x0E]  # header type
    assert dev.region_read(CFG, 0x2C, 4) == bytes.fromhex("f41a0011")
    assert walk(dev) == [0x01, 0x05, 0x11, 0x10]
    assert dev.region_read(0, 0, 4) == (0x5A4D0001).to_bytes(4, "little")
    dev.reset()
    assert dev.region_read(CFG, 0, 0x40) == SampleDevice().region_read(CFG, 0, 0x40)
    dev.close()


int_access = st.tuples(
    st.sampled_from(sorted(SIZES)),
    # Mostly the first registers, where an aligned access is a register's.
    st.one_of(st.integers(0, 0x3FFF), st.integers(0, 0x47)),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, (1 << 64) - 1),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(int_access, max_size=40))
def test_number_accesses_match_byte_accesses(ops: list[tuple[int, int, int, int, bool]]) -> None:
    """region_read_int/region_write_int (the direct ioreq path) do what
    region_read/region_write do with the same bytes, on every region:
    registers, plain BAR, MSI-X table and PBA, config space."""
    by_bytes, by_int = SampleDevice(), SampleDevice()
    try:
        for region, off, n, value, write in ops:
            off = (off * n if off < 0x48 else off) % (SIZES[region] - n + 1)
            value &= (1 << (8 * n)) - 1
            outcomes = []
            for dev, as_int in ((by_bytes, False), (by_int, True)):
                try:
                    if write and as_int:
                        dev.region_write_int(region, off, n, value)
                    elif write:
                        dev.region_write(region, off, value.to_bytes(n, "little"))
                    got = (dev.region_read_int(region, off, n) if as_int else
                           int.from_bytes(dev.region_read(region, off, n), "little"))
                    outcomes.append(got)
                except DeviceError as exc:
                    outcomes.append(type(exc))
            assert outcomes[0] == outcomes[1], (region, hex(off), n, write)
        assert by_bytes.region_read(0, 0, 0x100) == by_int.region_read(0, 0, 0x100)
    finally:
        by_bytes.close()
        by_int.close()
