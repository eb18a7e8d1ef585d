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
