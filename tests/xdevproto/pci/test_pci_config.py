"""Config space against the PCI rules (PCI 3.0 ch. 6, PCIe 4.0 7.5), through
region reads and writes like a driver."""

from __future__ import annotations

import struct

import pytest
from pci_sample_device import SampleDevice

from xdevproto.errors import DeviceError
from xdevproto.pci import Bar, BarKind, Identity, MsiCap, PciDevice
from xdevproto.pci.config import STATUS
from xdevproto.wire import PciRegion, RegionFlags

CFG = PciRegion.CONFIG


def r(d: PciDevice, off: int, n: int = 4, region: int = CFG) -> int:
    return int.from_bytes(d.region_read(region, off, n), "little")


def w(d: PciDevice, off: int, v: int, n: int = 4, region: int = CFG) -> None:
    d.region_write(region, off, v.to_bytes(n, "little"))


@pytest.fixture
def dev() -> SampleDevice:
    return SampleDevice()


def caps(d: PciDevice) -> list[tuple[int, int]]:
    """Walk the capability list as an OS does, refusing loops."""
    out: list[tuple[int, int]] = []
    ptr = r(d, 0x34, 1)
    while ptr:
        assert ptr >= 0x40 and ptr & 3 == 0
        assert len(out) < 48, "capability list does not terminate"
        out.append((ptr, r(d, ptr, 1)))
        ptr = r(d, ptr + 1, 1)
    return out


def test_identity_and_read_only_header(dev: SampleDevice) -> None:
    assert r(dev, 0x00) == 0x0011_1B36
    assert r(dev, 0x08) == 0x0180_0002  # class 01 80 00, revision 2
    assert r(dev, 0x2C) == 0x1100_1AF4
    assert r(dev, 0x3D, 1) == 1  # INTA
    before = dev.region_read(CFG, 0, 64)
    for off in (0x00, 0x08, 0x2C, 0x34):
        w(dev, off, 0xFFFFFFFF)
    w(dev, 0x3C, 0xFFFF, 2)
    after = dev.region_read(CFG, 0, 64)
    for off in (0x00, 0x08, 0x2C, 0x34, 0x3D):
        assert after[off:off + 4 if off != 0x3D else off + 1] == \
            before[off:off + 4 if off != 0x3D else off + 1]
    assert r(dev, 0x3C, 1) == 0xFF  # interrupt line is RW


def test_command_writable_bits(dev: SampleDevice) -> None:
    w(dev, 0x04, 0xFFFF, 2)
    assert r(dev, 0x04, 2) == 0x0547


def test_status_rw1c_and_read_only_bits(dev: SampleDevice) -> None:
    dev.config.put(STATUS, 2, dev.config.u16(STATUS) | 0xF900)
    w(dev, 0x06, 0x0010 | 0x8000 | 0x0100, 2)  # clear bits 15 and 8 only
    status = r(dev, 0x06, 2)
    assert status & 0xF900 == 0x7800
    assert status & 0x0010  # capability list bit stays
    w(dev, 0x06, 0xFFFF, 2)
    assert r(dev, 0x06, 2) == 0x0010


@pytest.mark.parametrize("index,size,flags", [
    (0, 0x1000, 0x0),   # mem32
    (1, 32, 0x1),       # I/O
    (2, 0x4000, 0xC),   # mem64 prefetchable
])
def test_bar_sizing(dev: SampleDevice, index: int, size: int, flags: int) -> None:
    off = 0x10 + 4 * index
    w(dev, off, 0xFFFFFFFF)
    low_bits = 0x3 if flags & 1 else 0xF
    assert r(dev, off) == (~(size - 1) & 0xFFFFFFFF & ~low_bits) | flags
    if flags & 0x4:
        w(dev, off + 4, 0xFFFFFFFF)
        assert r(dev, off + 4) == 0xFFFFFFFF
    w(dev, off, 0x12345678)
    assert r(dev, off) == (0x12345678 & ~(size - 1) & ~low_bits) | flags


def test_mem64_bar_address(dev: SampleDevice) -> None:
    w(dev, 0x18, 0xFEB0_0000)
    w(dev, 0x1C, 0x0000_0001)
    assert dev.config.bar_address(2) == 0x1_FEB0_0000


def test_unused_bars_are_zero_and_read_only(dev: SampleDevice) -> None:
    for off in (0x20, 0x24):
        w(dev, off, 0xFFFFFFFF)
        assert r(dev, off) == 0


def test_large_mem64_bar_sizes_in_upper_dword() -> None:
    class Big(PciDevice):
        identity = Identity(0x1234, 0x5678, 0x020000)
        bars = (Bar(0, 1 << 33, BarKind.MEM64),)

    d = Big()
    w(d, 0x10, 0xFFFFFFFF)
    w(d, 0x14, 0xFFFFFFFF)
    assert r(d, 0x10) == 0x4 and r(d, 0x14) == 0xFFFFFFFE


def test_expansion_rom_sizing_and_region(dev: SampleDevice) -> None:
    w(dev, 0x30, 0xFFFFFFFF)
    assert r(dev, 0x30) == 0xFFFFF801  # 2 KiB ROM, enable bit writable
    desc = dev.region(PciRegion.ROM)
    assert desc.size == 2048 and desc.flags == RegionFlags.READ
    assert dev.region_read(PciRegion.ROM, 0, 2) == b"\x55\xaa"


def test_pcie_config_space_is_4k_and_extended_list_ends(dev: SampleDevice) -> None:
    assert dev.region(CFG).size == 4096
    assert r(dev, 0x100) == 0  # no extended capabilities: terminator


def test_conventional_device_has_256_bytes() -> None:
    class Small(PciDevice):
        identity = Identity(0x1234, 0x5678, 0x020000, interrupt_pin=0)

    d = Small()
    assert d.region(CFG).size == 256
    assert r(d, 0x34, 1) == 0 and r(d, 0x06, 2) & 0x10 == 0
    with pytest.raises(DeviceError):
        d.region_read(CFG, 0xFE, 4)


def test_capability_list_walks_and_terminates(dev: SampleDevice) -> None:
    assert [cid for _, cid in caps(dev)] == [0x01, 0x05, 0x11, 0x10]
    assert r(dev, 0x06, 2) & 0x10


def test_msi_capability_layout(dev: SampleDevice) -> None:
    off = dict((cid, p) for p, cid in caps(dev))[0x05]
    control = r(dev, off + 2, 2)
    assert control & 0x0E == 2 << 1  # MMC: 4 vectors
    assert control & 0x80 and control & 0x100  # 64-bit, per-vector mask
    w(dev, off + 2, 0x0071, 2)  # ask for 8 vectors: clamped to 4
    assert (r(dev, off + 2, 2) >> 4) & 7 == 2
    w(dev, off + 4, 0xFEE0_0003)
    assert r(dev, off + 4) == 0xFEE0_0000  # dword-aligned address
    w(dev, off + 0x10, 0xFFFFFFFF)  # mask bits: only 4 implemented
    assert r(dev, off + 0x10) == 0xF
    w(dev, off + 0x14, 0xFFFFFFFF)  # pending bits are read-only
    assert r(dev, off + 0x14) == 0


def test_msi_32bit_layout() -> None:
    class Msi32(PciDevice):
        identity = Identity(0x1234, 0x5678, 0x020000)
        capabilities = (MsiCap(1, addr64=False),)

    d = Msi32()
    assert r(d, 0x34, 1) == 0x40
    assert r(d, 0x42, 2) & 0x80 == 0
    w(d, 0x48, 0xABCD, 2)  # data right after the 32-bit address
    assert r(d, 0x48, 2) == 0xABCD


def test_msix_capability_and_table(dev: SampleDevice) -> None:
    off = dict((cid, p) for p, cid in caps(dev))[0x11]
    assert r(dev, off + 2, 2) & 0x7FF == 7  # 8 entries
    assert r(dev, off + 4) == 0x0000 | 2  # table at 0 in BAR2
    assert r(dev, off + 8) == 0x2000 | 2  # PBA at 0x2000 in BAR2
    w(dev, off + 2, 0xFFFF, 2)
    assert r(dev, off + 2, 2) == 0xC007  # enable + function mask writable only
    # every entry starts masked; address/data are RW; reserved control bits read 0
    assert r(dev, 12, 4, region=2) == 1
    w(dev, 16 + 0, 0xFEE0_1003, region=2)
    w(dev, 16 + 4, 0x1, region=2)
    w(dev, 16 + 8, 0x4041, region=2)
    w(dev, 16 + 12, 0xFFFF_FFFE, region=2)
    assert dev.region_read(2, 16, 16) == struct.pack("<IIII", 0xFEE0_1000, 1, 0x4041, 0)
    w(dev, 0x2000, 0xFF, 8, region=2)  # PBA is read-only
    assert r(dev, 0x2000, 8, region=2) == 0
    # outside table and PBA, BAR2 is ordinary (handler) space
    assert dev.region_read(2, 0x1000, 4) == bytes(4)


def test_pcie_capability_flr_resets_the_function(dev: SampleDevice) -> None:
    off = dict((cid, p) for p, cid in caps(dev))[0x10]
    assert r(dev, off + 2, 2) & 0xF == 2  # version 2
    assert (r(dev, off + 2, 2) >> 4) & 0xF == 0  # endpoint
    assert r(dev, off + 4) & (1 << 28)  # FLR capable
    w(dev, 0x10, 0xFEB00000)
    w(dev, 0x04, 0x0406, 2)
    w(dev, 0x24, 0x1234, region=0)  # a register
    w(dev, off + 8, r(dev, off + 8, 2) | 0x8000, 2)
    assert r(dev, off + 8, 2) & 0x8000 == 0
    assert r(dev, 0x10) == 0 and r(dev, 0x04, 2) == 0
    assert r(dev, 0x24, region=0) == 0


def test_pm_d3_to_d0_resets(dev: SampleDevice) -> None:
    off = dict((cid, p) for p, cid in caps(dev))[0x01]
    w(dev, 0x24, 0x1, region=0)
    w(dev, off + 4, 3, 2)  # D3hot
    assert r(dev, off + 4, 2) & 3 == 3
    assert r(dev, 0x24, region=0) == 1  # entering D3 keeps state
    w(dev, off + 4, 1, 2)  # D1 is not supported: ignored
    assert r(dev, off + 4, 2) & 3 == 3
    w(dev, off + 4, 0, 2)
    assert r(dev, 0x24, region=0) == 0
    assert r(dev, off + 4, 2) & 3 == 0


def test_device_reset_restores_config_and_registers(dev: SampleDevice) -> None:
    w(dev, 0x3C, 11, 1)
    w(dev, 0x04, 0x0100, 2, region=0)
    dev.reset()
    assert r(dev, 0x3C, 1) == 0
    assert r(dev, 0x04, region=0) == 0x0100


def test_bad_declarations_fail() -> None:
    with pytest.raises(ValueError):
        Bar(0, 3000).validate()
    with pytest.raises(ValueError):
        Bar(5, 4096, BarKind.MEM64).validate()

    class Clash(PciDevice):
        identity = Identity(0x1234, 0x5678, 0)
        bars = (Bar(0, 4096, BarKind.MEM64), Bar(1, 4096))

    with pytest.raises(ValueError):
        Clash()


def test_misspelt_hook_fails_at_class_creation() -> None:
    from xdevproto.pci import Reg, RegisterLayout

    layout = RegisterLayout("x", 16, [Reg(0, "A", on_write="missing")])
    with pytest.raises(TypeError):
        class Broken(PciDevice):
            identity = Identity(0x1234, 0x5678, 0)
            bars = (Bar(0, 16, regs=layout),)


def test_bus_master_follows_the_command_register(dev: SampleDevice) -> None:
    assert not dev.config.bus_master
    w(dev, 0x04, 0x0004, 2)
    assert dev.config.bus_master
