"""Register files: every access kind, width, alignment, arrays, hooks, tracing."""

from __future__ import annotations

import logging
import threading

import pytest

from tests.xdevproto.pci.pci_sample_device import CTRL, ID, ISR, SampleDevice
from xdevproto.errors import DeviceError
from xdevproto.pci.regs import Access, Reg, RegisterFile, RegisterLayout


class Owner:
    def __init__(self) -> None:
        self.writes: list[tuple[str, int, int, int]] = []
        self.counter = 0

    def on_w(self, index: int, value: int, old: int) -> None:
        self.writes.append(("w", index, value, old))

    def on_r(self, index: int, value: int) -> int:
        self.counter += 1
        return value + self.counter


LAYOUT = RegisterLayout("t", 0x100, [
    Reg(0x00, "RO", Access.RO, reset=0x11223344),
    Reg(0x04, "RW", reset=0xAABBCCDD, mask=0x0000FFFF, on_write="on_w"),
    Reg(0x08, "W1C", Access.RW1C, reset=0xFF, mask=0x0F),
    Reg(0x0C, "W1S", Access.RW1S, reset=0x01, on_write="on_w"),
    Reg(0x10, "RC", Access.RC, reset=0x55),
    Reg(0x14, "WO", Access.WO, on_write="on_w"),
    Reg(0x18, "RSVD", Access.RSVD, reset=0x77),
    Reg(0x1C, "HOOKED", Access.RO, reset=0x10, on_read="on_r"),
    Reg(0x20, "Q", width=8, reset=0x0102030405060708),
    Reg(0x28, "B", width=1, reset=0x5A),
    Reg(0x2A, "H", width=2, reset=0xBEEF),
    Reg(0x2C, "MIX", reset=0xF0, mask=0xFF, w1c=0xF0),
    Reg(0x30, "STRICT", partial=False),
    Reg(0x40, "ARR", count=4, stride=8, on_write="on_w"),
    Reg(0x44, "ARRH", width=2, count=4, stride=8),
])


@pytest.fixture
def rf() -> tuple[RegisterFile, Owner]:
    owner = Owner()
    return RegisterFile(LAYOUT, owner), owner


def rd(f: RegisterFile, off: int, n: int = 4) -> int:
    return int.from_bytes(f.read(off, n), "little")


def wr(f: RegisterFile, off: int, value: int, n: int = 4) -> None:
    f.write(off, value.to_bytes(n, "little"))


def test_reset_values_read_back(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    assert rd(f, 0x00) == 0x11223344
    assert rd(f, 0x20, 8) == 0x0102030405060708
    assert rd(f, 0x28, 1) == 0x5A
    assert rd(f, 0x2A, 2) == 0xBEEF


def test_ro_ignores_writes(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x00, 0)
    assert rd(f, 0x00) == 0x11223344


def test_rw_honours_mask_and_calls_hook(rf: tuple[RegisterFile, Owner]) -> None:
    f, owner = rf
    wr(f, 0x04, 0x12345678)
    assert rd(f, 0x04) == 0xAABB5678
    assert owner.writes == [("w", 0, 0x12345678, 0xAABBCCDD)]


def test_rw1c_clears_only_written_ones_under_mask(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x08, 0xF3)
    assert rd(f, 0x08) == 0xFC  # bits 0,1 cleared; 4-7 outside the mask stay


def test_rw1s_sets_and_zero_does_nothing(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x0C, 0x6)
    wr(f, 0x0C, 0x0)
    assert rd(f, 0x0C) == 0x7


def test_rc_clears_on_read(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    assert rd(f, 0x10) == 0x55
    assert rd(f, 0x10) == 0
    wr(f, 0x10, 0x99)
    assert rd(f, 0x10) == 0


def test_wo_reads_zero_but_hook_sees_value(rf: tuple[RegisterFile, Owner]) -> None:
    f, owner = rf
    wr(f, 0x14, 0xCAFE)
    assert rd(f, 0x14) == 0
    assert owner.writes[-1] == ("w", 0, 0xCAFE, 0)
    assert f["WO"] == 0xCAFE


def test_reserved_reads_zero_and_ignores_writes(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x18, 0xFFFFFFFF)
    assert rd(f, 0x18) == 0


def test_read_hook(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    assert rd(f, 0x1C) == 0x11
    assert rd(f, 0x1C) == 0x12


def test_mixed_rw_and_w1c(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x2C, 0x1A)  # RW low nibble becomes 0xA; 0x10 clears bit 4
    assert rd(f, 0x2C) == 0xEA


def test_partial_writes_merge_per_kind(rf: tuple[RegisterFile, Owner]) -> None:
    f, owner = rf
    wr(f, 0x05, 0x12, 1)  # byte 1 of RW
    assert rd(f, 0x04) == 0xAABB12DD
    assert owner.writes[-1] == ("w", 0, 0xAABB12DD, 0xAABBCCDD)
    wr(f, 0x08, 0x01, 1)  # RW1C: other bytes count as 0
    assert rd(f, 0x08) == 0xFE
    wr(f, 0x22, 0xFFFF, 2)  # middle of a qword
    assert rd(f, 0x20, 8) == 0x01020304FFFF0708


def test_partial_write_ignored_when_declared(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x30, 0xFF, 1)
    assert rd(f, 0x30) == 0
    wr(f, 0x30, 0x12345678)
    assert rd(f, 0x30) == 0x12345678


def test_unaligned_access_spans_registers(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    # bytes 2..5: top half of RO, bottom half of RW
    assert f.read(0x02, 4) == bytes.fromhex("2211ddcc")
    wr(f, 0x02, 0x5566_7788)  # RO half ignored, RW low half written
    assert rd(f, 0x00) == 0x11223344
    assert rd(f, 0x04) == 0xAABB5566


def test_qword_access_over_two_dword_registers(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    assert rd(f, 0x00, 8) == 0xAABBCCDD_11223344


def test_undeclared_bytes(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x80, 0xFFFFFFFF)
    assert rd(f, 0x80) == 0
    assert f.read(0x29, 1) == b"\0"  # hole between B and H


def test_arrays(rf: tuple[RegisterFile, Owner]) -> None:
    f, owner = rf
    wr(f, 0x40 + 2 * 8, 0xDEAD)
    wr(f, 0x44 + 3 * 8, 0xBEEF, 2)
    assert f["ARR", 2] == 0xDEAD
    assert f["ARRH", 3] == 0xBEEF
    assert owner.writes[-1] == ("w", 2, 0xDEAD, 0)
    assert LAYOUT.slots[LAYOUT.slot("ARR", 2)].name == "ARR[2]"
    with pytest.raises(IndexError):
        LAYOUT.slot("ARR", 4)
    # The device side's lookups: by name (element 0) or (name, index), and
    # the same refusals for an index or name the layout lacks.
    f["ARR"] = 7
    assert f["ARR", 0] == 7 and f.values[LAYOUT.slot("ARR", 0)] == 7
    f["ARR", 3] = 1 << 40
    assert f["ARR", 3] == (1 << 40) & LAYOUT.slots[LAYOUT.slot("ARR", 3)].full
    with pytest.raises(IndexError):
        f["ARR", 4]
    with pytest.raises(IndexError):
        f["ARR", 4] = 1
    with pytest.raises(KeyError):
        f["NOPE"]


def test_reset_restores_declared_values(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    wr(f, 0x04, 0)
    f["ARR", 1] = 5
    f.reset()
    assert rd(f, 0x04) == 0xAABBCCDD
    assert f["ARR", 1] == 0


def test_beyond_the_layout_reads_zero(rf: tuple[RegisterFile, Owner]) -> None:
    """A BAR may be larger than its register layout (the runtime checked the BAR)."""
    f, _ = rf
    assert f.read(0xFE, 4) == bytes(4)
    f.write(0x100, b"\xff" * 8)
    assert f.read(0x100, 8) == bytes(8)
    with pytest.raises(DeviceError):
        f.read(-1, 4)


def test_trace_names_the_register(rf: tuple[RegisterFile, Owner],
                                  caplog: pytest.LogCaptureFixture) -> None:
    f, _ = rf
    with caplog.at_level(logging.DEBUG, logger="xdevproto.pci.regs"):
        wr(f, 0x48, 7)
        rd(f, 0x04)
    text = caplog.text
    assert "write ARR[1] = 0x7" in text
    assert "read RW = 0xaabbccdd" in text


def test_load_validates_values(rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    saved = f.save()
    with pytest.raises(DeviceError):
        f.load(saved[:-1])
    bad = list(saved)
    bad[LAYOUT.slot("B")] = 0x100  # wider than the 1-byte register
    with pytest.raises(DeviceError):
        f.load(bad)
    f.load(saved)


@pytest.mark.parametrize("regs", [
    [Reg(0, "A"), Reg(2, "B")],                     # overlap
    [Reg(0, "A"), Reg(4, "A")],                     # same name
    [Reg(0xFE, "A")],                               # beyond the size
    [Reg(0, "A", width=3)],                         # width
])
def test_bad_layouts_fail_at_declaration(regs: list[Reg]) -> None:
    with pytest.raises(ValueError):
        RegisterLayout("bad", 0x100, regs)


def test_missing_hook_fails_at_binding() -> None:
    layout = RegisterLayout("h", 0x10, [Reg(0, "A", on_write="nope")])
    with pytest.raises(TypeError):
        RegisterFile(layout, Owner())


def test_long_access_is_not_mistaken_for_a_register_access(
        rf: tuple[RegisterFile, Owner]) -> None:
    f, _ = rf
    # offset << 4 | 17 == (offset + 1) << 4 | 1: must not hit the 1-byte register at 0x28
    data = f.read(0x27, 17)
    assert len(data) == 17
    assert data[1] == 0x5A
    f.write(0x27, bytes(17))
    assert f["B"] == 0  # B is RW: the long write reached it


def test_register_blocks_at_a_stride() -> None:
    from xdevproto.pci.regs import block

    class Ports:
        def __init__(self) -> None:
            self.cmd: list[tuple[int, int]] = []

        def write_cmd(self, index: int, value: int, old: int) -> None:
            self.cmd.append((index, value))

    layout = RegisterLayout("ahci-like", 0x1100, [
        Reg(0x00, "CAP", Access.RO, reset=0x1F),
        *block(0x100, 0x80, 32, [
            Reg(0x00, "PxCLB", mask=0xFFFFFC00),
            Reg(0x10, "PxIS", Access.RW1C),
            Reg(0x18, "PxCMD", on_write="write_cmd"),
        ]),
    ])
    owner = Ports()
    f = RegisterFile(layout, owner)
    wr(f, 0x100 + 0x80 * 5 + 0x18, 0x11)
    wr(f, 0x100 + 0x80 * 31, 0xFFFFFFFF)
    assert owner.cmd == [(5, 0x11)]
    assert f["PxCLB", 31] == 0xFFFFFC00
    assert layout.slots[layout.slot("PxIS", 7)].offset == 0x100 + 0x80 * 7 + 0x10
    with pytest.raises(ValueError):
        block(0, 0x10, 2, [Reg(0x0E, "TOO_WIDE")])


def test_peek_answers_only_reads_that_are_just_the_value(rf: tuple[RegisterFile, Owner]) -> None:
    """peek_int (reads without the device lock) answers a whole register
    with no read hook and no read effect, exactly as read_int would; any
    other access gets None and nothing changes."""
    f, owner = rf
    wr(f, 0x04, 0x1234)
    assert f.peek_int(0x00, 4) == f.read_int(0x00, 4) == 0x11223344
    assert f.peek_int(0x04, 4) == f.read_int(0x04, 4) == 0xAABB1234
    assert f.peek_int(0x20, 8) == 0x0102030405060708
    assert f.peek_int(0x2A, 2) == 0xBEEF and f.peek_int(0x28, 1) == 0x5A
    assert f.peek_int(0x44 + 8, 2) == f.read_int(0x44 + 8, 2)
    for offset, size in ((0x10, 4),   # RC: reading clears it
                         (0x14, 4),   # WO: reads as 0, whatever it holds
                         (0x18, 4),   # reserved
                         (0x1C, 4),   # read hook
                         (0x00, 2), (0x02, 4), (0x20, 4),  # part of a register, or two
                         (0x34, 4),   # nothing declared there
                         (0x01, 20)):  # longer than a register (its key would alias)
        assert f.peek_int(offset, size) is None, (offset, size)
    assert owner.counter == 0 and f["RC"] == 0x55  # nothing was read for real


def test_quiet_register_reads_do_not_wait_for_the_device_lock() -> None:
    """The direct ioreq path's accessors: a register read that is just its
    value goes without the device lock; anything with an effect waits for
    it (here a worker holds it), then happens under it."""
    dev = SampleDevice()
    read, write = dev.region_int_access(0)
    done: list[int] = []
    with dev.lock:
        def side_effect_read() -> None:
            done.append(read(ISR, 4))
        held = threading.Thread(target=lambda: done.append(read(ID, 4)))
        held.start()
        held.join(5)
        assert done == [0x5A4D0001]  # answered while the lock is held elsewhere
        waiting = threading.Thread(target=side_effect_read)
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive() and done == [0x5A4D0001]  # the RC read waits
    waiting.join(5)
    assert done == [0x5A4D0001, 0]
    write(CTRL, 4, 0x0000_1234)
    assert read(CTRL, 4) == 0x0000_1234 == dev.region_read_int(0, CTRL, 4)
