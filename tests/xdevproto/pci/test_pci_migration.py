"""Migration v2: the state machine, the stream's validation, save -> load."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pci_sample_device import SampleDevice

from xdevproto.errors import DeviceError
from xdevproto.pci import migration as mig
from xdevproto.wire import MigState, PciRegion

S = MigState


@pytest.mark.parametrize("cur,target,steps", [
    (S.RUNNING, S.STOP, [S.STOP]),
    (S.RUNNING, S.STOP_COPY, [S.STOP, S.STOP_COPY]),
    (S.RUNNING, S.RESUMING, [S.STOP, S.RESUMING]),
    (S.RUNNING, S.PRE_COPY, [S.PRE_COPY]),
    (S.PRE_COPY, S.STOP_COPY, [S.STOP_COPY]),
    (S.PRE_COPY, S.STOP, [S.RUNNING, S.STOP]),  # not through STOP_COPY
    (S.STOP_COPY, S.RUNNING, [S.STOP, S.RUNNING]),
    (S.RESUMING, S.RUNNING, [S.STOP, S.RUNNING]),
    (S.RESUMING, S.STOP_COPY, [S.STOP, S.STOP_COPY]),
    (S.STOP, S.PRE_COPY, [S.RUNNING, S.PRE_COPY]),
    (S.STOP, S.STOP, []),
])
def test_shortest_paths(cur: MigState, target: MigState, steps: list[MigState]) -> None:
    assert mig.path(cur, target) == steps


@pytest.mark.parametrize("cur,target", [
    (S.STOP_COPY, S.PRE_COPY), (S.RUNNING, S.ERROR), (S.RUNNING, S.RUNNING_P2P),
    (S.ERROR, S.RUNNING), (S.ERROR, S.STOP),
])
def test_forbidden_transitions(cur: MigState, target: MigState) -> None:
    with pytest.raises(DeviceError):
        mig.path(cur, target)


def test_no_path_passes_through_a_saving_state() -> None:
    states = sorted(mig.SUPPORTED)
    for a in states:
        for b in states:
            try:
                steps = mig.path(a, b)
            except DeviceError:
                continue
            assert not set(steps[:-1]) & mig.SAVING, (a, b, steps)
            prev = a
            for s in steps:
                assert (prev, s) in mig.ARCS
                prev = s


def test_error_is_left_only_by_reset() -> None:
    dev = SampleDevice()
    dev.set_mig_state(S.RESUMING)
    dev.mig_data_write(b"garbage")
    with pytest.raises(DeviceError):
        dev.set_mig_state(S.STOP)
    assert dev.mig_state() is S.ERROR
    with pytest.raises(DeviceError):
        dev.set_mig_state(S.RUNNING)
    dev.reset()
    assert dev.mig_state() is S.RUNNING


def test_stop_copy_stream_reads_out_then_ends() -> None:
    dev = SampleDevice()
    dev.set_mig_state(S.PRE_COPY)
    assert dev.mig_data_read(4096) == b""
    dev.set_mig_state(S.STOP_COPY)
    blob = b""
    while chunk := dev.mig_data_read(1000):
        assert len(chunk) <= 1000
        blob += chunk
    assert blob.startswith(mig.MAGIC)
    dev.set_mig_state(S.STOP)
    assert dev.mig_data_read(10) == b""


# -- the stream -------------------------------------------------------------------------
def saved(dev: SampleDevice) -> bytes:
    dev.set_mig_state(S.STOP_COPY)
    out = b""
    while chunk := dev.mig_data_read(65536):
        out += chunk
    dev.set_mig_state(S.RUNNING)
    return out


def load(dev: SampleDevice, blob: bytes) -> None:
    dev.set_mig_state(S.RESUMING)
    dev.mig_data_write(blob)
    dev.set_mig_state(S.RUNNING)


def test_truncated_and_trailing_streams_are_refused() -> None:
    blob = saved(SampleDevice())
    for bad in (blob[:-1], blob + b"\0", blob[:20], b""):
        dev = SampleDevice()
        with pytest.raises(DeviceError):
            load(dev, bad)
        assert dev.mig_state() is S.ERROR


def test_wrong_version_and_wrong_device_are_refused() -> None:
    blob = saved(SampleDevice())
    bumped = blob[:8] + struct.pack("<H", mig.VERSION + 1) + blob[10:]
    with pytest.raises(DeviceError):
        load(SampleDevice(), bumped)
    other = mig.encode({"config": bytes(4096)})
    with pytest.raises(DeviceError):
        load(SampleDevice(), other)


def test_out_of_range_register_value_is_refused() -> None:
    sections = mig.decode(saved(SampleDevice()))
    values = mig.unpack_u64s(sections["regs0"])
    values[0] = 1 << 40  # a 32-bit register
    sections["regs0"] = mig.pack_u64s(values)
    with pytest.raises(DeviceError):
        load(SampleDevice(), mig.encode(sections))


def test_hostile_config_cannot_change_read_only_bits() -> None:
    sections = mig.decode(saved(SampleDevice()))
    cfg = bytearray(sections["config"])
    cfg[0:4] = b"\xff\xff\xff\xff"  # vendor/device ids
    cfg[0x34] = 0xFC  # capability pointer
    sections["config"] = bytes(cfg)
    dev = SampleDevice()
    load(dev, mig.encode(sections))
    assert dev.region_read(PciRegion.CONFIG, 0, 4) == bytes.fromhex("361b1100")
    assert dev.region_read(PciRegion.CONFIG, 0x34, 1) == b"\x40"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5000))
def test_fuzzed_streams_never_crash(noise: bytes, pos: int) -> None:
    blob = bytearray(_BLOB)
    pos %= len(blob)
    blob[pos:pos + len(noise)] = noise
    dev = SampleDevice()
    dev.set_mig_state(S.RESUMING)
    dev.mig_data_write(bytes(blob))
    try:
        dev.set_mig_state(S.STOP)
    except DeviceError:
        assert dev.mig_state() is S.ERROR
    else:
        dev.region_read(PciRegion.CONFIG, 0, 256)


_BLOB = saved(SampleDevice())


# -- round trip ---------------------------------------------------------------------------
def make_busy(dev: SampleDevice) -> None:
    """Non-trivial state everywhere the framework saves something."""
    w = dev.region_write
    cfg = PciRegion.CONFIG
    w(cfg, 0x04, struct.pack("<H", 0x0407))
    w(cfg, 0x10, struct.pack("<I", 0xFEB00000))
    w(cfg, 0x14, struct.pack("<I", 0xC040))
    w(cfg, 0x18, struct.pack("<II", 0xFE000000, 0x1))
    w(cfg, 0x3C, b"\x0b")
    w(0, 0x04, struct.pack("<I", 0x1234_5600))
    w(0, 0x18, struct.pack("<Q", 0x1_0000_2000))
    w(0, 0x0C, b"")  # nothing
    w(0, 0x10, struct.pack("<I", 0x6))  # DOORBELL: ISR |= 6, INTx source 6
    w(0, 0x24, struct.pack("<I", 0x8000_0001))
    w(0, 0x2C, struct.pack("<H", 0x33))
    for i in range(16):
        w(0, 0x100 + 8 * i, struct.pack("<I", 0xA0000000 + i))
    dev.region_read(0, 0x14, 4)  # COUNTER read hook state
    w(1, 4, b"io-state")
    w(2, 16 * 3, struct.pack("<IIII", 0xFEE00000, 0, 0x4023, 0))  # MSI-X entry 3 unmasked
    msix = dev.msix
    assert msix is not None
    w(cfg, msix.offset + 2, struct.pack("<H", 0xC000))  # enabled, function-masked
    dev.intr.raise_(3)  # pending in the PBA
    pm = dev.pm
    assert pm is not None
    w(cfg, pm.offset + 4, struct.pack("<H", 0x0100))  # PME_En


def read_everything(dev: SampleDevice) -> list[bytes]:
    out = [dev.region_read(PciRegion.CONFIG, off, 4) for off in range(0, 4096, 4)]
    out += [dev.region_read(0, off, 4) for off in range(0, 0x1000, 4)]
    out += [dev.region_read(1, off, 4) for off in range(0, 32, 4)]
    out += [dev.region_read(2, off, 8) for off in range(0, 0x4000, 8)]
    out.append(dev.region_read(PciRegion.ROM, 0, 2048))
    return out


def test_save_load_round_trip_answers_every_read_identically() -> None:
    src = SampleDevice()
    make_busy(src)
    blob = saved(src)
    dst = SampleDevice()
    load(dst, blob)
    assert read_everything(dst) == read_everything(src)
    assert dst.intr.levels == src.intr.levels != 0
    assert read_everything(SampleDevice()) != read_everything(dst)
