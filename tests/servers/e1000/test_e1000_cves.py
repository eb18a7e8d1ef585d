"""Every e1000 pattern of the reference device notes against the device: no
crash, no hang (each test finishes in well under a second of work), bounded
memory, and the device still works afterwards."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from e1000_driver import (
    MAC,
    RAM_SIZE,
    RX_RING,
    TX_RING,
    CaptureBackend,
    Driver,
    padded,
    tcp_frame,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from servers.e1000 import regs as R
from servers.e1000.tx import MAX_LOOPBACK, MAX_TX_FRAME


@pytest.fixture
def drv() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


def sent(d: Driver) -> list[bytes]:
    assert isinstance(d.backend, CaptureBackend)
    return d.backend.sent


def still_works(d: Driver) -> None:
    """A fresh ring set-up sends and receives one frame each way."""
    before = len(sent(d))
    d.wr(R.TCTL, 0)
    d.setup_tx()
    d.legacy(tcp_frame(b"alive" * 20))
    d.kick()
    assert len(sent(d)) == before + 1 and sent(d)[-1] == tcp_frame(b"alive" * 20)
    d.setup_rx()
    assert isinstance(d.backend, CaptureBackend)
    assert d.backend.inject(tcp_frame(b"ok", dst=MAC))
    assert d.rx_frame(0) == padded(tcp_frame(b"ok", dst=MAC))


def test_cve_2015_6815_tso_zero_mss_and_hdr_len(drv: Driver) -> None:
    drv.setup_tx()
    frame = tcp_frame(b"x" * 3000, csum=False)
    for hdr_len, mss in ((0, 0), (54, 0), (0, 1448)):
        drv.context(14, 24, 33, 34, 50, 0, paylen=3000, tucmd=0x07, hdr_len=hdr_len, mss=mss)
        drv.data(frame, dcmd=0x2D, popts=0x03)
        drv.kick()
    assert sent(drv) == []
    assert drv.rd(0x40FC) == 3  # TSCTFC: failed TSO contexts
    still_works(drv)


def test_cve_2015_6815_tiny_mss_is_bounded(drv: Driver) -> None:
    drv.setup_tx()
    frame = tcp_frame(b"y" * 20000, csum=False)
    drv.context(14, 24, 33, 34, 50, 0, paylen=20000, tucmd=0x07, hdr_len=54, mss=1)
    drv.data(frame, dcmd=0x2D, popts=0x03)
    drv.kick()
    assert sent(drv) == [], "20000 one-byte segments refused"
    still_works(drv)


def test_cve_2016_1981_tx_head_past_tiny_ring(drv: Driver) -> None:
    drv.setup_tx(n=8)
    drv.wr(R.TDLEN, 0)  # no ring at all
    drv.wr(R.TDT, 5)
    drv.wr(R.TDLEN, 128)  # 8 descriptors
    drv.wr(R.TDH, 0xFFFF)  # head far past the ring
    drv.wr(R.TDT, 3)
    assert drv.rd(R.TDH) == 3, "head restarted at 0 and met the tail"
    drv.wr(R.TDT, 0xFFF0)  # tail past the ring: one lap at most
    assert drv.rd(R.TDH) < 8
    still_works(drv)


def test_cve_2016_1981_rx_head_past_ring(drv: Driver) -> None:
    drv.setup_rx(n=8)
    drv.wr(R.RDH, 0x1234)
    assert isinstance(drv.backend, CaptureBackend)
    assert drv.backend.inject(tcp_frame(b"h", dst=MAC))
    assert drv.rd(R.RDH) == 1
    drv.wr(R.RDT, 0x4000)  # tail past the ring: nothing is available
    assert not drv.backend.inject(tcp_frame(b"h", dst=MAC))
    drv.wr(R.RDLEN, 0)
    assert not drv.backend.inject(tcp_frame(b"h", dst=MAC))
    still_works(drv)


def test_cve_2020_28916_null_rx_buffers(drv: Driver) -> None:
    drv.setup_rx(n=8)
    for i in range(8):
        drv.ram.write(RX_RING + 16 * i, bytes(16))  # every buffer address NULL
    assert isinstance(drv.backend, CaptureBackend)
    for _ in range(4):
        assert not drv.backend.inject(tcp_frame(b"n", dst=MAC))
    assert drv.rd(R.RDH) == 7, "null descriptors consumed, never looped on"
    # Mixed: one NULL then a real buffer gets the frame.
    drv.setup_rx(n=8)
    drv.ram.write(RX_RING, bytes(16))
    assert drv.backend.inject(tcp_frame(b"m" * 60, dst=MAC))
    assert drv.rx_desc(0)[3] & 1 and drv.rx_desc(0)[1] == 0
    assert drv.rx_frame(1) == tcp_frame(b"m" * 60, dst=MAC)
    still_works(drv)


RING_PLACES = ("in memory", "in memory", "in memory", "half past the end of memory", "unmapped")
FRAME_SIZES = st.one_of(st.integers(14, 1522), st.integers(0, 1700))  # mostly acceptable


@settings(max_examples=100, deadline=None)
@given(head=st.integers(0, 18), tail=st.integers(0, 18), small_buffers=st.booleans(),
       secrc=st.booleans(), nulls=st.sets(st.integers(0, 15), max_size=4),
       unmapped=st.sets(st.integers(0, 15), max_size=3), ring=st.sampled_from(RING_PLACES),
       sizes=st.lists(FRAME_SIZES, min_size=1, max_size=24))
@example(head=11, tail=9, small_buffers=False, secrc=False, nulls={14}, unmapped={1},
         ring="in memory", sizes=[100] * 8)  # wraps, past a NULL and a bad buffer
@example(head=13, tail=12, small_buffers=True, secrc=False, nulls={15}, unmapped=set(),
         ring="in memory", sizes=[700, 1500, 60, 1000, 200, 900])  # multi-buffer, ring runs out
@example(head=5, tail=4, small_buffers=True, secrc=True, nulls=set(), unmapped=set(),
         ring="half past the end of memory", sizes=[1000, 60, 1000])  # unreadable mid-frame
def test_hostile_rx_ring_batch_equals_frame_by_frame(
        head: int, tail: int, small_buffers: bool, secrc: bool, nulls: set[int],
        unmapped: set[int], ring: str, sizes: list[int]) -> None:
    """Heads and tails past the ring, NULL buffers, buffers outside guest
    memory, a ring partly or wholly unreadable, runts and oversized frames:
    one batch leaves what the same frames leave one by one."""
    frames = [(MAC + bytes.fromhex("5254000abcde") + b"\x08\x00" + bytes(range(256)) * 7)[:size]
              for size in sizes]
    base = {"in memory": RX_RING, "half past the end of memory": RAM_SIZE - 8 * 16,
            "unmapped": 0x7_0000_0000}[ring]
    single, batch = Driver(), Driver()
    try:
        for d in (single, batch):
            d.setup_rx(n=16, bsize=256 if small_buffers else 2048,
                       rctl=R.RCTL_EN | (3 << 16 if small_buffers else 0)
                       | (R.RCTL_SECRC if secrc else 0))
            for i in nulls:
                d.ram.write(RX_RING + 16 * i, bytes(16))
            for i in unmapped:
                d.ram.write(RX_RING + 16 * i, struct.pack("<QQ", 0xFFFF_0000_0000, 0))
            if base != RX_RING:
                d.ram.write(RAM_SIZE - 8 * 16, d.ram.read(RX_RING, 8 * 16))
                d.wr(R.RDBAL, base & 0xFFFFFFFF)
                d.wr(R.RDBAH, base >> 32)
            d.wr(R.RDH, head)
            d.wr(R.RDT, tail)
        assert isinstance(single.backend, CaptureBackend)
        assert isinstance(batch.backend, CaptureBackend)
        stored = sum(single.backend.inject(f) for f in frames)
        assert batch.backend.inject_batch(frames) == stored
        assert batch.rx_state() == single.rx_state()
        assert batch.ram.read(RAM_SIZE - 128, 128) == single.ram.read(RAM_SIZE - 128, 128)
    finally:
        single.close()
        batch.close()


def test_cve_2021_3416_loopback_cannot_recurse(drv: Driver) -> None:
    drv.setup_rx(n=64, rctl=R.RCTL_EN | R.RCTL_LBM_MAC | (1 << 3))
    drv.setup_tx(n=64)
    for _ in range(63):
        drv.legacy(tcp_frame(b"L" * 100, dst=MAC))
    drv.kick()
    assert sent(drv) == []
    assert drv.rd(R.RDH) == 63, "every looped-back frame received"
    assert len(drv.dev.tx.loopback) == 0 and MAX_LOOPBACK >= 63
    # PHY loopback too.
    drv.wr(R.RCTL, R.RCTL_EN)
    drv.wr(R.MDIC, 1 << 26 | 1 << 21 | 0 << 16 | 0x4140)
    drv.setup_rx()
    drv.legacy(tcp_frame(b"P" * 100, dst=MAC))
    drv.kick()
    assert drv.rx_frame(0) == tcp_frame(b"P" * 100, dst=MAC)
    drv.wr(R.MDIC, 1 << 26 | 1 << 21 | 0 << 16 | 0x1140)
    drv.wr(R.RCTL, 0)
    still_works(drv)


def test_cve_2021_20257_evil_descriptors(drv: Driver) -> None:
    drv.setup_tx(n=256)
    # Zero-length data descriptors without EOP all round the ring, then huge
    # lengths pointing at memory that does not exist, then unknown types.
    for _ in range(100):
        drv.put_tx(struct.pack("<QIBBH", 0, (0x20 | 0x08) << 24 | 1 << 20 | 0, 0, 0, 0))
    for _ in range(100):
        drv.put_tx(struct.pack("<QIBBH", 0xFFFF_FFFF_0000, (0x20) << 24 | 1 << 20 | 0xFFFFF,
                               0, 0, 0))
    for _ in range(50):
        drv.put_tx(struct.pack("<QIBBH", 0, (0x20 | 0x01) << 24 | 0xF << 20 | 100, 0, 0, 0))
    drv.kick()
    assert sent(drv) == []
    assert drv.rd(R.TDH) == 250
    assert sum(map(len, drv.dev.tx.parts)) == drv.dev.tx.size <= MAX_TX_FRAME
    # A frame that grows past the cap is dropped, not buffered.
    drv.setup_tx(n=256)
    chunk = b"G" * 0xF000
    for _ in range(6):
        drv.data(chunk, dcmd=0x28)  # no EOP
    drv.data(b"end", dcmd=0x29)
    drv.kick()
    assert sent(drv) == [] and drv.dev.tx.parts == [] and drv.dev.tx.size == 0
    still_works(drv)


def test_tx_ring_unreadable(drv: Driver) -> None:
    drv.setup_tx()
    drv.wr(R.TDBAL, 0xFFFF0000)
    drv.wr(R.TDBAH, 0x7)
    drv.legacy(tcp_frame(b"u"))
    drv.kick()
    assert sent(drv) == []
    still_works(drv)


def test_rx_buffer_outside_memory(drv: Driver) -> None:
    drv.setup_rx(n=8)
    drv.ram.write(RX_RING, struct.pack("<Q", 0xDEAD_0000_0000))
    assert isinstance(drv.backend, CaptureBackend)
    drv.backend.inject(tcp_frame(b"o", dst=MAC))
    assert drv.rx_desc(0)[4] & 0x80, "RXE reported for an unreachable buffer"
    still_works(drv)


def test_cve_2023_3019_reentrancy_guard(drv: Driver) -> None:
    """DMA cannot reach our registers, but a nested kick (as a DMA into
    MMIO would cause) must be refused rather than corrupt the ring walk."""
    drv.setup_tx()
    nic = drv.dev
    calls = []
    real = nic.dma
    real_read = real.read

    def reentrant_read(addr: int, length: int) -> bytes:
        if not calls:
            calls.append(addr)
            # a nested TDT write during the walk
            nic.region_write(0, R.TDT, drv.tx_tail.to_bytes(4, "little"))
        return real_read(addr, length)

    nic.dma = type("D", (), {"read": staticmethod(reentrant_read),
                             "write": staticmethod(real.write)})()
    for _ in range(3):
        drv.legacy(tcp_frame(b"r" * 50))
    drv.kick()
    assert len(sent(drv)) == 3 and drv.rd(R.TDH) == 3
    nic.dma = real
    still_works(drv)


def test_tx_descriptor_ring_status_writes_only_status(drv: Driver) -> None:
    drv.setup_tx()
    i = drv.legacy(tcp_frame(b"s" * 80))
    before = drv.ram.read(TX_RING + 16 * i, 12)
    drv.kick()
    assert drv.ram.read(TX_RING + 16 * i, 12) == before
