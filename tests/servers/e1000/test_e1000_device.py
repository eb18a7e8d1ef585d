"""The 82540EM through region reads and writes, like a driver: identity,
EEPROM, PHY, interrupts, TX, RX, reset."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import pytest
from e1000_driver import (
    MAC,
    PEER,
    RX_BUF,
    RX_RING,
    CaptureBackend,
    Driver,
    ipv4_ok,
    l4_ok,
    padded,
    tcp_frame,
    udp_frame,
)

from servers.e1000 import regs as R
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags


@pytest.fixture
def drv() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


def backend(d: Driver) -> CaptureBackend:
    assert isinstance(d.backend, CaptureBackend)
    return d.backend


# -- identity ---------------------------------------------------------------------------


def test_pci_identity_and_bars(drv: Driver) -> None:
    cfg = drv.dev.region_read(PciRegion.CONFIG, 0, 64)
    assert struct.unpack_from("<HH", cfg, 0) == (0x8086, 0x100E)
    assert cfg[0x0B] == 0x02 and cfg[0x0A] == 0x00  # network, Ethernet
    assert cfg[0x3D] == 1  # INTA
    assert drv.dev.region(PciRegion.BAR0).size == 128 * 1024
    assert drv.dev.region(PciRegion.BAR1).size == 0x40
    # BAR sizing: all ones reads back the size mask with the type bits.
    drv.dev.region_write(PciRegion.CONFIG, 0x10, b"\xff\xff\xff\xff")
    drv.dev.region_write(PciRegion.CONFIG, 0x14, b"\xff\xff\xff\xff")
    bar0, bar1 = struct.unpack("<II", drv.dev.region_read(PciRegion.CONFIG, 0x10, 8))
    assert bar0 == 0xFFFE0000 and bar1 == 0xFFFFFFC1
    assert drv.dev.irq(IrqIndex.INTX).count == 1


def test_io_window_reaches_registers(drv: Driver) -> None:
    io = PciRegion.BAR1
    drv.dev.region_write(io, 0, struct.pack("<I", R.RDBAL))
    drv.dev.region_write(io, 4, struct.pack("<I", 0x12345670))
    assert drv.rd(R.RDBAL) == 0x12345670
    drv.dev.region_write(io, 0, struct.pack("<I", R.STATUS))
    assert struct.unpack("<I", drv.dev.region_read(io, 4, 4))[0] & R.STATUS_LU


# -- EEPROM -----------------------------------------------------------------------------


def eerd_read(d: Driver, word: int) -> int:
    d.wr(R.EERD, word << 8 | 1)
    value = d.rd(R.EERD)
    assert value & 0x10, "EERD.DONE at bit 4 on the 82540"
    assert not value & 0x2
    return value >> 16


def microwire_read(d: Driver, word: int) -> int:
    """Linux e1000_read_eeprom for a microwire part, bit by bit."""
    d.wr(R.EECD, 0x40)  # EE_REQ
    assert d.rd(R.EECD) & 0x80, "grant"
    eecd = 0x40 | 0x2  # CS

    def clock(bit: int) -> None:
        nonlocal eecd
        eecd = (eecd & ~0x4) | (0x4 if bit else 0)
        d.wr(R.EECD, eecd)
        d.wr(R.EECD, eecd | 1)
        d.wr(R.EECD, eecd)

    d.wr(R.EECD, eecd)
    for bit in (1, 1, 0):
        clock(bit)
    for i in range(5, -1, -1):
        clock(word >> i & 1)
    value = 0
    for _ in range(16):
        d.wr(R.EECD, eecd | 1)
        value = value << 1 | bool(d.rd(R.EECD) & 0x8)
        d.wr(R.EECD, eecd)
    d.wr(R.EECD, 0x40)  # CS low
    d.wr(R.EECD, 0)
    return value


def test_eeprom_eerd_mac_and_checksum(drv: Driver) -> None:
    words = [eerd_read(drv, w) for w in range(64)]
    assert struct.pack("<3H", *words[:3]) == MAC
    assert sum(words) & 0xFFFF == 0xBABA
    assert words[0x0D] == 0x100E and words[0x0E] == 0x8086


def test_eeprom_microwire_matches_eerd(drv: Driver) -> None:
    for w in (0, 1, 2, 0x0D, 0x3F):
        assert microwire_read(drv, w) == eerd_read(drv, w)


def test_mac_in_receive_address_0(drv: Driver) -> None:
    ral, rah = drv.rd(R.RAL), drv.rd(R.RAL + 4)
    assert struct.pack("<IH", ral, rah & 0xFFFF) == MAC and rah & R.RAH_AV


# -- PHY --------------------------------------------------------------------------------


def mdic(d: Driver, op: int, reg: int, data: int = 0, phy: int = 1) -> int:
    d.wr(R.MDIC, op << 26 | phy << 21 | reg << 16 | data)
    value = d.rd(R.MDIC)
    assert value & (1 << 28), "ready"
    return value


def test_phy_identity_and_autoneg(drv: Driver) -> None:
    assert mdic(drv, 2, 2) & 0xFFFF == 0x0141
    assert mdic(drv, 2, 3) & 0xFFF0 == 0x0C20
    mdic(drv, 1, 0, 0x1000 | 0x0200 | 0x8000)  # reset + restart AN
    assert mdic(drv, 2, 0) & 0x8200 == 0, "reset and restart self-clear"
    bmsr = mdic(drv, 2, 1) & 0xFFFF
    assert bmsr & 0x20 and bmsr & 0x04  # AN complete, link
    assert mdic(drv, 2, 5) & 0x4000  # partner acknowledged
    assert drv.rd(R.STATUS) & R.STATUS_LU


def test_phy_other_address_errors(drv: Driver) -> None:
    assert mdic(drv, 2, 1, phy=2) & (1 << 30)
    assert not mdic(drv, 2, 1) & (1 << 30)


def test_link_follows_backend_with_lsc(drv: Driver) -> None:
    drv.wr(R.IMS, R.ICR_LSC)
    drv.rd(R.ICR)
    drv.dev.set_partner(False)
    assert not drv.rd(R.STATUS) & R.STATUS_LU
    assert not mdic(drv, 2, 1) & 0x4
    assert drv.irq_level
    assert drv.rd(R.ICR) & R.ICR_LSC
    drv.dev.set_partner(True)
    assert drv.rd(R.STATUS) & R.STATUS_LU
    assert drv.rd(R.ICR) & R.ICR_LSC


# -- interrupts -------------------------------------------------------------------------


def test_icr_read_to_clear_and_masks(drv: Driver) -> None:
    drv.rd(R.ICR)
    drv.irq_signalled()
    drv.wr(R.ICS, R.ICR_RXT0)
    assert not drv.irq_level, "masked"
    assert drv.rd(R.ICS) == R.ICR_RXT0, "ICS reads as ICR"
    drv.wr(R.IMS, R.ICR_RXT0 | R.ICR_TXDW)
    assert drv.rd(R.IMS) == R.ICR_RXT0 | R.ICR_TXDW
    assert drv.irq_level and drv.irq_signalled() == 1
    icr = drv.rd(R.ICR)
    assert icr == R.ICR_RXT0 | R.ICR_INT_ASSERTED
    assert drv.rd(R.ICR) == 0 and not drv.irq_level
    drv.wr(R.IMC, R.ICR_RXT0)
    assert drv.rd(R.IMS) == R.ICR_TXDW
    drv.wr(R.ICS, R.ICR_RXT0)
    assert not drv.irq_level


def test_intx_mask_unmask_resignals(drv: Driver) -> None:
    drv.rd(R.ICR)
    drv.wr(R.IMS, R.ICR_TXDW)
    drv.dev.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_MASK, 0, 1, None, None)
    drv.wr(R.ICS, R.ICR_TXDW)
    assert drv.irq_signalled() == 0
    drv.dev.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_UNMASK, 0, 1, None, None)
    assert drv.irq_signalled() == 1


def test_itr_throttles(drv: Driver) -> None:
    drv.rd(R.ICR)
    drv.wr(R.ITR, 1000)  # 256 us
    drv.wr(R.IMS, R.ICR_TXDW)
    drv.wr(R.ICS, R.ICR_TXDW)
    assert drv.irq_level
    drv.rd(R.ICR)
    drv.wr(R.ICS, R.ICR_TXDW)
    assert not drv.irq_level, "held back within the interval"
    drv.timers.advance(100e-6)
    assert not drv.irq_level
    drv.timers.advance(200e-6)
    assert drv.irq_level


def test_rx_delay_timer_and_fpd(drv: Driver) -> None:
    drv.setup_rx()
    drv.rd(R.ICR)
    drv.wr(R.IMS, R.ICR_RXT0)
    drv.wr(R.RDTR, 100)
    drv.wr(R.RADV, 300)
    for _ in range(3):
        backend(drv).inject(tcp_frame(b"x", dst=MAC))
        drv.timers.advance(80e-6)
    assert not drv.irq_level, "each frame re-arms RDTR"
    drv.timers.advance(100e-6)
    assert drv.irq_level and drv.rd(R.ICR) & R.ICR_RXT0
    # RADV caps the delay under a steady stream.
    for _ in range(5):
        backend(drv).inject(tcp_frame(b"x", dst=MAC))
        drv.timers.advance(90e-6)
    assert drv.irq_level
    drv.rd(R.ICR)
    backend(drv).inject(tcp_frame(b"x", dst=MAC))
    drv.wr(R.RDTR, 100 | R.RDTR_FPD)
    assert drv.rd(R.ICR) & R.ICR_RXT0


def test_tx_delay_with_ide(drv: Driver) -> None:
    drv.setup_tx()
    drv.rd(R.ICR)
    drv.wr(R.IMS, R.ICR_TXDW)
    drv.wr(R.TIDV, 50)
    drv.legacy(tcp_frame(b"a"), cmd=0x0B | 0x80)
    drv.kick()
    assert not drv.irq_level
    drv.timers.advance(60e-6)
    assert drv.rd(R.ICR) & R.ICR_TXDW


# -- transmit ---------------------------------------------------------------------------


def test_tx_legacy_batch_and_status(drv: Driver) -> None:
    drv.setup_tx()
    drv.rd(R.ICR)
    frames = [tcp_frame(bytes([i]) * (100 + i)) for i in range(10)]
    idx = [drv.legacy(f) for f in frames]
    drv.kick()
    assert backend(drv).sent == frames
    assert all(drv.tx_status(i) & 1 for i in idx)
    assert drv.rd(R.TDH) == 10
    assert drv.rd(R.ICR) & (R.ICR_TXDW | R.ICR_TXQE) == R.ICR_TXDW | R.ICR_TXQE
    assert drv.rd(0x4080) == 10  # GPTC, cleared by the read
    assert drv.rd(0x4080) == 0


class StatusWatcher(CaptureBackend):
    """Notes, as each frame goes out, whether its descriptor already says done."""

    def __init__(self) -> None:
        super().__init__()
        self.done_when_sent: list[bool] = []
        self.driver: Driver | None = None

    def _send(self, frame: bytes) -> bool:
        assert self.driver is not None
        self.done_when_sent.append(bool(self.driver.tx_status(len(self.sent)) & 1))
        return super()._send(frame)


def test_tx_frames_leave_before_their_status() -> None:
    """A batch's frames reach the back end in order, each before DD is
    written back for it (SDM 3.3.3.2: DD means the frame is gone)."""
    watcher = StatusWatcher()
    d = Driver(backend=watcher)
    watcher.driver = d
    try:
        d.setup_tx(n=16)
        frames = [tcp_frame(bytes([i]) * 50) for i in range(12)]
        for f in frames:
            d.legacy(f)
        d.kick()
        assert watcher.sent == frames
        assert watcher.done_when_sent == [False] * 12
        assert all(d.tx_status(i) & 1 for i in range(12))
    finally:
        d.close()


def test_tx_multi_descriptor_frame_and_padding(drv: Driver) -> None:
    drv.setup_tx()
    frame = tcp_frame(b"p" * 300)
    drv.legacy(frame[:14], cmd=0x02)
    drv.legacy(frame[14:100], cmd=0x02)
    drv.legacy(frame[100:], cmd=0x0B)
    short = PEER + MAC + b"\x88\xb5" + b"hi"
    drv.legacy(short)
    drv.kick()
    assert backend(drv).sent == [frame, short + bytes(60 - len(short))]


def test_tx_legacy_checksum_insert(drv: Driver) -> None:
    drv.setup_tx()
    frame = bytearray(udp_frame(b"payload!!"))
    # Let the device compute the UDP checksum over the pseudo-header-seeded field.
    ip = frame[14:34]
    udp_len = len(frame) - 34
    seed = sum(struct.unpack(">4H", ip[12:20])) + 17 + udp_len
    while seed > 0xFFFF:
        seed = (seed & 0xFFFF) + (seed >> 16)
    struct.pack_into(">H", frame, 40, seed)
    drv.legacy(bytes(frame), cmd=0x0B | 0x04, css=34, cso=40)
    drv.kick()
    assert l4_ok(backend(drv).sent[0][14:])


def test_tx_context_checksum_offload(drv: Driver) -> None:
    drv.setup_tx()
    frame = bytearray(tcp_frame(b"data" * 50, csum=False))
    ip = frame[14:34]
    tcp_len = len(frame) - 34
    seed = sum(struct.unpack(">4H", ip[12:20])) + 6 + tcp_len
    while seed > 0xFFFF:
        seed = (seed & 0xFFFF) + (seed >> 16)
    struct.pack_into(">H", frame, 34 + 16, seed)
    drv.context(14, 24, 33, 34, 50, 0, tucmd=0x03)
    drv.data(bytes(frame), popts=0x03)
    drv.kick()
    out = backend(drv).sent[0][14:]
    assert ipv4_ok(out) and l4_ok(out)


def test_tso_segments(drv: Driver) -> None:
    drv.setup_tx()
    payload = bytes(range(256)) * 20  # 5120 bytes
    frame = bytearray(tcp_frame(payload, seq=5000, flags=0x19, csum=False))  # FIN|PSH|ACK
    # Linux e1000_tso: IP checksum 0, TCP seeded with the pseudo header without length.
    seed = sum(struct.unpack(">4H", frame[26:34])) + 6
    while seed > 0xFFFF:
        seed = (seed & 0xFFFF) + (seed >> 16)
    struct.pack_into(">H", frame, 50, seed)
    mss = 1448
    drv.context(14, 24, 33, 34, 50, 0, paylen=len(payload), tucmd=0x07, hdr_len=54, mss=mss)
    drv.data(bytes(frame[:54]), dcmd=0x24 | 0x08, popts=0x03)  # TSE, no EOP
    drv.data(bytes(frame[54:]), dcmd=0x25 | 0x08, popts=0x03)
    drv.kick()
    segs = backend(drv).sent
    assert len(segs) == 4
    got = b""
    for i, seg in enumerate(segs):
        ip = seg[14:]
        assert ipv4_ok(ip) and l4_ok(ip)
        total, ip_id = struct.unpack_from(">HH", ip, 2)
        assert total == len(seg) - 14 and ip_id == 7 + i
        seq = struct.unpack_from(">I", ip, 24)[0]
        assert seq == 5000 + i * mss
        flags = ip[33]
        last = i == len(segs) - 1
        assert flags == (0x19 if last else 0x10)
        body = ip[40:]
        assert len(body) == (mss if not last else len(payload) - 3 * mss)
        got += body
    assert got == payload
    assert drv.rd(0x40F8) == 1  # TSCTC


def test_vlan_insertion(drv: Driver) -> None:
    drv.setup_tx()
    drv.wr(R.CTRL, drv.rd(R.CTRL) | R.CTRL_VME)
    frame = tcp_frame(b"v" * 64)
    drv.legacy(frame, cmd=0x0B | 0x40, special=0x2064)
    drv.kick()
    out = backend(drv).sent[0]
    assert out[12:16] == b"\x81\x00\x20\x64" and out[:12] + out[16:] == frame


def test_tx_disabled_does_nothing_until_enabled(drv: Driver) -> None:
    drv.setup_tx()
    drv.wr(R.TCTL, 0)
    drv.legacy(tcp_frame(b"z"))
    drv.kick()
    assert backend(drv).sent == []
    drv.wr(R.TCTL, R.TCTL_EN)
    assert len(backend(drv).sent) == 1


# -- receive ----------------------------------------------------------------------------


def test_rx_unicast_broadcast_and_filtering(drv: Driver) -> None:
    drv.setup_rx(rctl=R.RCTL_EN)
    b = backend(drv)
    assert b.inject(tcp_frame(b"mine", dst=MAC))
    assert not b.inject(tcp_frame(b"other", dst=PEER)), "not our address"
    assert not b.inject(tcp_frame(b"bc", dst=b"\xff" * 6)), "BAM clear"
    drv.wr(R.RCTL, R.RCTL_EN | (1 << 15))
    assert b.inject(tcp_frame(b"bc", dst=b"\xff" * 6))
    drv.wr(R.RCTL, R.RCTL_EN | (1 << 3))  # UPE
    assert b.inject(tcp_frame(b"other", dst=PEER))
    assert drv.rd(R.RDH) == 3
    addr, length, _, status, errors, _ = drv.rx_desc(0)
    assert status & 0x03 == 0x03 and errors == 0
    assert drv.rx_frame(0) == padded(tcp_frame(b"mine", dst=MAC))
    assert drv.rd(0x4074) == 3  # GPRC


def test_rx_multicast_hash_and_mpe(drv: Driver) -> None:
    drv.setup_rx(rctl=R.RCTL_EN)
    mc = bytes.fromhex("01005e0000fb")  # 224.0.0.251
    # Linux e1000_hash_mc_addr, MO=0: bits 47:36 of the address.
    h = ((mc[4] >> 4) | (mc[5] << 4)) & 0xFFF
    b = backend(drv)
    assert not b.inject(tcp_frame(b"m", dst=mc))
    drv.wr(R.MTA + 4 * (h >> 5), 1 << (h & 31))
    assert b.inject(tcp_frame(b"m", dst=mc))
    assert not b.inject(tcp_frame(b"m", dst=bytes.fromhex("01005e000001")))
    drv.wr(R.RCTL, R.RCTL_EN | (1 << 4))
    assert b.inject(tcp_frame(b"m", dst=bytes.fromhex("01005e000001")))
    # RAL[1] exact match
    drv.wr(R.RCTL, R.RCTL_EN)
    other = bytes.fromhex("020000000001")
    assert not b.inject(tcp_frame(b"e", dst=other))
    ral, rah = struct.unpack("<IH", other)
    drv.wr(R.RAL + 8, ral)
    drv.wr(R.RAL + 12, rah)
    assert not b.inject(tcp_frame(b"e", dst=other)), "AV clear"
    drv.wr(R.RAL + 12, rah | R.RAH_AV)
    assert b.inject(tcp_frame(b"e", dst=other))


def vlan_frame(tci: int, payload: bytes = b"vlan") -> bytes:
    f = tcp_frame(payload, dst=MAC)
    return f[:12] + struct.pack(">HH", 0x8100, tci) + f[12:]


def test_rx_vlan_filter_and_strip(drv: Driver) -> None:
    drv.setup_rx(rctl=R.RCTL_EN | (1 << 18))  # VFE
    b = backend(drv)
    assert not b.inject(vlan_frame(0x0064))
    drv.wr(R.VFTA + 4 * (100 >> 5), 1 << (100 & 31))
    assert b.inject(vlan_frame(0x2064))
    assert drv.rx_frame(0) == vlan_frame(0x2064), "tag kept without CTRL.VME"
    drv.wr(R.CTRL, drv.rd(R.CTRL) | R.CTRL_VME)
    assert b.inject(vlan_frame(0x2064))
    _, _, _, status, _, special = drv.rx_desc(1)
    assert status & 0x08 and special == 0x2064
    assert drv.rx_frame(1) == padded(tcp_frame(b"vlan", dst=MAC))


def test_rx_checksum_status(drv: Driver) -> None:
    drv.setup_rx()
    b = backend(drv)
    drv.wr(R.RXCSUM, 0)
    b.inject(tcp_frame(b"c", dst=MAC))
    assert drv.rx_desc(0)[3] & 0x04  # IXSM
    drv.wr(R.RXCSUM, 0x300)
    b.inject(tcp_frame(b"c", dst=MAC))
    _, _, _, status, errors, _ = drv.rx_desc(1)
    assert status & 0x60 == 0x60 and errors == 0
    bad = bytearray(tcp_frame(b"c", dst=MAC))
    bad[-1] ^= 0xFF
    b.inject(bytes(bad))
    _, _, _, status, errors, _ = drv.rx_desc(2)
    assert status & 0x20 and errors & 0x20 and not errors & 0x40


def test_rx_buffer_sizes_and_long_packets(drv: Driver) -> None:
    drv.setup_rx(rctl=R.RCTL_EN | (3 << 16), bsize=256)  # BSIZE 256
    big = tcp_frame(b"L" * 1000, dst=MAC)
    b = backend(drv)
    assert b.inject(big)
    assert drv.rd(R.RDH) == 5
    parts = [drv.rx_desc(i) for i in range(5)]
    assert [p[3] & 2 for p in parts] == [0, 0, 0, 0, 2]
    # 1054 bytes and the CRC: four full buffers and 34 bytes in the fifth.
    assert [p[1] for p in parts] == [256] * 4 + [1054 + 4 - 1024]
    assert drv.strip_fcs(b"".join(drv.ram.read(p[0], p[1]) for p in parts)) == big
    huge = tcp_frame(b"H" * 2000, dst=MAC)
    assert not b.inject(huge), "over 1522 without LPE/SBP"
    assert drv.rd(0x40AC) == 1  # ROC
    drv.wr(R.RCTL, R.RCTL_EN | R.RCTL_LPE | R.RCTL_BSEX | (3 << 16))  # 4096
    assert b.inject(huge)
    assert drv.rx_frame(5) == huge


def test_rx_crc_is_stored_unless_secrc(drv: Driver) -> None:
    # Linux's e1000 leaves RCTL.SECRC clear and takes 4 bytes off every
    # length: without the CRC in memory, every frame would lose its tail.
    frame = tcp_frame(b"crc" * 10, dst=MAC)  # past the 60-byte minimum: no padding
    drv.setup_rx()
    assert backend(drv).inject(frame)
    addr, length, *_ = drv.rx_desc(0)
    data = drv.ram.read(addr, length)
    assert length == len(frame) + 4
    assert data == frame + zlib.crc32(frame).to_bytes(4, "little")
    drv.wr(R.RCTL, drv.rd(R.RCTL) | R.RCTL_SECRC)
    assert backend(drv).inject(frame)
    assert drv.rx_desc(1)[1] == len(frame)
    assert drv.rx_frame(1) == frame
    assert drv.rd(0x4088) == 2 * (len(frame) + 4)  # GORCL counts the CRC either way


def test_rx_full_ring_drops_and_counts(drv: Driver) -> None:
    drv.setup_rx(n=8, fill=3)
    drv.rd(R.ICR)
    b = backend(drv)
    got = [b.inject(tcp_frame(bytes([i]), dst=MAC)) for i in range(6)]
    assert got == [True, True, True, False, False, False]
    assert drv.rd(R.ICR) & R.ICR_RXO
    assert drv.rd(0x4010) == 3  # MPC
    drv.wr(R.RDT, 7)  # the driver refills: reception resumes
    assert b.inject(tcp_frame(b"again", dst=MAC))
    assert drv.rx_frame(3) == padded(tcp_frame(b"again", dst=MAC))


def test_rx_empty_ring_and_disabled(drv: Driver) -> None:
    drv.setup_rx(fill=0)
    assert not backend(drv).inject(tcp_frame(b"e", dst=MAC))
    drv.setup_rx(rctl=0)
    assert not backend(drv).inject(tcp_frame(b"e", dst=MAC))


# -- receive batches: one lock, one write-back per stretch, the same result --------------


def test_rx_batch_ring_full_drops_and_counts_the_rest(drv: Driver) -> None:
    drv.setup_rx(n=8, fill=3)
    drv.rd(R.ICR)
    frames = [tcp_frame(bytes([i]) * 40, dst=MAC) for i in range(6)]
    assert backend(drv).inject_batch(frames) == 3
    assert [drv.rx_frame(i) for i in range(3)] == frames[:3]
    assert drv.rd(R.RDH) == 3
    assert drv.rd(0x4010) == 3 and drv.rd(0x40A0) == 3  # MPC, RNBC: the three that found no room
    assert drv.rd(0x4074) == 3  # GPRC
    assert drv.rd(R.ICR) & (R.ICR_RXO | R.ICR_RXT0) == R.ICR_RXO | R.ICR_RXT0


def test_rx_batch_wraps_the_ring(drv: Driver) -> None:
    drv.setup_rx(n=8)
    drv.wr(R.RDH, 6)
    drv.wr(R.RDT, 5)  # seven free, from descriptor 6 on
    frames = [tcp_frame(bytes([i]) * 40, dst=MAC) for i in range(4)]
    assert backend(drv).inject_batch(frames) == 4
    assert drv.rd(R.RDH) == 2
    for i, frame in zip((6, 7, 0, 1), frames, strict=True):
        addr, length, _, status, errors, _ = drv.rx_desc(i)
        assert addr == RX_BUF + i * 2048, "the address is written back as it was"
        assert (length, status & 3, errors) == (len(frame) + 4, 3, 0)
        assert drv.rx_frame(i) == frame
    assert drv.rx_desc(2)[3] == 0, "nothing past the last frame"


def test_rx_batch_statistics(drv: Driver) -> None:
    """Counters after a batch are those of its frames one by one: sizes with
    the FCS in their buckets, broadcast and multicast, 64-bit octets."""
    drv.setup_rx(n=16, rctl=R.RCTL_EN | (1 << 15) | (1 << 4))  # BAM, MPE
    group = bytes.fromhex("01005e000001")
    frames = [tcp_frame(b"b", dst=b"\xff" * 6), tcp_frame(b"m" * 50, dst=group),
              tcp_frame(b"u" * 1400, dst=MAC), tcp_frame(b"v" * 1400, dst=MAC),
              tcp_frame(b"w" * 200, dst=MAC)]
    assert backend(drv).inject_batch(frames) == 5
    sizes = [max(len(f), 60) + 4 for f in frames]
    assert sizes == [64, 108, 1458, 1458, 258]
    expect = {"GPRC": 5, "TPR": 5, "BPRC": 1, "MPRC": 1, "PRC64": 1, "PRC127": 1, "PRC255": 0,
              "PRC511": 1, "PRC1023": 0, "PRC1522": 2, "GORCL": sum(sizes), "TORL": sum(sizes),
              "GORCH": 0}
    assert {name: drv.dev.stat(name) for name in expect} == expect


@pytest.mark.parametrize("rctl", [
    R.RCTL_EN | (1 << 15) | (3 << 16),  # broadcast, 256-byte buffers, CRC stored
    R.RCTL_EN | (1 << 15) | (3 << 16) | R.RCTL_SECRC | (1 << 8),  # RDMTS 1/4
    R.RCTL_EN | (1 << 3) | R.RCTL_LPE | (2 << 8),  # promiscuous, 2048, long, RDMTS 1/8
])
def test_rx_batch_equals_frame_by_frame(rctl: int) -> None:
    """The same frames, one at a time and as one batch, from a head near the
    end of the ring with a NULL descriptor on the way: filtered, oversize,
    tagged, short, multi-buffer, ring-full and wrapping frames leave the
    same ring, buffers, statistics and interrupt causes."""
    frames = [
        tcp_frame(b"a" * 100, dst=MAC),
        tcp_frame(b"x", dst=PEER),  # not ours (unless promiscuous)
        tcp_frame(b"L" * 1600, dst=MAC),  # long: ROC unless LPE
        vlan_frame(0x2064),  # stripped: CTRL.VME is set
        tcp_frame(b"s", dst=b"\xff" * 6),  # broadcast, padded
        tcp_frame(b"m" * 700, dst=MAC),  # several 256-byte buffers
        udp_frame(b"u" * 301, dst=MAC),  # odd-sized
        *[tcp_frame(bytes([i]) * 500, dst=MAC) for i in range(6)],  # the ring runs out
        tcp_frame(b"t", dst=MAC),  # small enough for what is left
    ]
    single, batch = Driver(), Driver()
    try:
        for d in (single, batch):
            d.setup_rx(n=16, rctl=rctl, bsize=2048 if rctl >> 16 & 3 == 0 else 256)
            d.wr(R.CTRL, d.rd(R.CTRL) | R.CTRL_VME)
            d.ram.write(RX_RING + 16 * 14, bytes(16))  # a NULL buffer
            d.wr(R.RDH, 11)
            d.wr(R.RDT, 9)
            d.wr(R.IMS, R.ICR_RXT0 | R.ICR_RXO | R.ICR_RXDMT0)
        stored = [backend(single).inject(f) for f in frames]
        assert backend(batch).inject_batch(frames) == sum(stored)
        assert 0 < sum(stored) < len(frames)
        assert batch.rx_state() == single.rx_state()
        # The driver hands buffers back; a second batch continues from there.
        for d in (single, batch):
            d.wr(R.RDT, (d.rd(R.RDH) - 1) % 16)
        stored = [backend(single).inject(f) for f in frames[:8]]
        assert backend(batch).inject_batch(frames[:8]) == sum(stored)
        assert batch.rx_state() == single.rx_state()
    finally:
        single.close()
        batch.close()


@pytest.mark.parametrize("batch", [False, True])
def test_rx_descriptor_minimum_threshold(drv: Driver, batch: bool) -> None:
    """RXDMT0 once free descriptors fall to half the ring (RDMTS 0, SDM 13.4.22)."""
    drv.setup_rx(n=16)  # 15 free
    drv.rd(R.ICR)
    frames = [tcp_frame(bytes([i]), dst=MAC) for i in range(7)]
    if batch:
        assert backend(drv).inject_batch(frames[:6]) == 6
    else:
        assert all(backend(drv).inject(f) for f in frames[:6])
    assert not drv.rd(R.ICR) & R.ICR_RXDMT0, "9 free"
    assert backend(drv).inject_batch(frames[6:]) == 1
    assert drv.rd(R.ICR) & R.ICR_RXDMT0, "8 free"


def test_rx_batch_arms_the_delay_timer_once(drv: Driver) -> None:
    drv.setup_rx()
    drv.rd(R.ICR)
    drv.wr(R.IMS, R.ICR_RXT0)
    drv.wr(R.RDTR, 100)
    assert backend(drv).inject_batch([tcp_frame(bytes([i]), dst=MAC) for i in range(5)]) == 5
    drv.timers.advance(90e-6)
    assert not drv.irq_level, "RDTR runs from the batch"
    drv.timers.advance(20e-6)
    assert drv.irq_level and drv.rd(R.ICR) & R.ICR_RXT0


def test_mac_loopback(drv: Driver) -> None:
    drv.setup_rx(rctl=R.RCTL_EN | R.RCTL_LBM_MAC)
    drv.setup_tx()
    frame = tcp_frame(b"loop" * 10, dst=MAC)
    drv.legacy(frame)
    drv.kick()
    assert backend(drv).sent == []
    assert drv.rx_frame(0) == frame


def test_reset_mid_traffic(drv: Driver) -> None:
    drv.setup_tx()
    drv.setup_rx()
    drv.legacy(tcp_frame(b"1"))
    drv.kick()
    backend(drv).inject(tcp_frame(b"r", dst=MAC))
    drv.wr(R.IMS, R.ICR_TXDW)
    drv.wr(R.CTRL, drv.rd(R.CTRL) | R.CTRL_RST)
    assert drv.rd(R.CTRL) & R.CTRL_RST == 0
    assert drv.rd(R.TDH) == drv.rd(R.RDH) == drv.rd(R.TDLEN) == 0
    assert drv.rd(R.IMS) == 0 and drv.rd(R.RCTL) == 0
    assert not backend(drv).inject(tcp_frame(b"r", dst=MAC)), "RX disabled after reset"
    assert struct.pack("<IH", drv.rd(R.RAL), drv.rd(R.RAL + 4) & 0xFFFF) == MAC
    # The driver brings it back up and traffic flows again.
    sent_before = len(backend(drv).sent)
    drv.setup_tx()
    drv.setup_rx()
    drv.legacy(tcp_frame(b"2"))
    drv.kick()
    assert len(backend(drv).sent) == sent_before + 1
    assert backend(drv).inject(tcp_frame(b"r", dst=MAC))


def test_device_reset_from_client(drv: Driver) -> None:
    drv.setup_tx()
    drv.dev.reset()
    assert drv.rd(R.TDLEN) == 0 and drv.rd(R.STATUS) & R.STATUS_LU


def test_statistics_64bit_clear_on_high_read(drv: Driver) -> None:
    drv.setup_tx()
    drv.legacy(tcp_frame(b"x" * 100))
    drv.kick()
    low = drv.rd(0x4090)
    assert low == len(backend(drv).sent[0]) + 4
    assert drv.rd(0x4090) == low, "low half is not cleared alone"
    assert drv.rd(0x4094) == 0
    assert drv.rd(0x4090) == 0


def test_migration_round_trip() -> None:
    from xdevproto.wire import MigState

    src, dst = Driver(), Driver()
    try:
        src.setup_rx()
        src.wr(R.IMS, R.ICR_RXT0)
        mdic(src, 1, 4, 0x01E1)  # PHY advertisement: PHY state beyond the registers
        src.dev.set_mig_state(MigState.STOP)
        src.dev.set_mig_state(MigState.STOP_COPY)
        blob = b""
        while chunk := src.dev.mig_data_read(65536):
            blob += chunk
        dst.dev.set_mig_state(MigState.STOP)
        dst.dev.set_mig_state(MigState.RESUMING)
        dst.dev.mig_data_write(blob)
        dst.dev.set_mig_state(MigState.STOP)
        dst.dev.set_mig_state(MigState.RUNNING)
        dst.ram.write(0, src.ram.read(0, src.ram.size))  # guest RAM moves separately
        assert dst.rd(R.RDLEN) == 16 * 16 and dst.rd(R.IMS) == R.ICR_RXT0
        assert mdic(dst, 2, 4) & 0xFFFF == 0x01E1
        # The destination's ring works with the migrated registers.
        assert isinstance(dst.backend, CaptureBackend)
        assert dst.backend.inject(tcp_frame(b"moved", dst=MAC))
        assert dst.rd(R.RDH) == 1
    finally:
        src.close()
        dst.close()


def test_linux_probe_sequence(drv: Driver) -> None:
    """The register traffic of Linux e1000_probe/e1000_reset_hw/e1000_init_hw
    and e1000_setup_copper_link on an 82540, in order, ending with link up."""
    # e1000_reset_hw
    drv.wr(R.IMC, 0xFFFFFFFF)
    drv.wr(R.RCTL, 0)
    drv.wr(R.TCTL, R.TCTL_PSP)
    drv.rd(R.STATUS)
    drv.wr(R.CTRL, drv.rd(R.CTRL) | R.CTRL_RST)
    drv.wr(R.MANC, drv.rd(R.MANC) & ~(1 << 13))
    drv.wr(R.IMC, 0xFFFFFFFF)
    drv.rd(R.ICR)
    # EEPROM: checksum and MAC (e1000_validate_eeprom_checksum, e1000_read_mac_addr)
    words = [microwire_read(drv, w) for w in range(64)]
    assert sum(words) & 0xFFFF == 0xBABA
    mac = struct.pack("<3H", *words[:3])
    assert mac == MAC
    # e1000_init_hw: VET, VFTA, receive addresses, MTA, statistics
    drv.wr(R.VET, 0)
    for i in range(128):
        drv.wr(R.VFTA + 4 * i, 0)
    ral, rah = struct.unpack("<IH", mac)
    drv.wr(R.RAL, ral)
    drv.wr(R.RAL + 4, rah | R.RAH_AV)
    for i in range(1, 16):
        drv.wr(R.RAL + 8 * i, 0)
        drv.wr(R.RAL + 8 * i + 4, 0)
    for i in range(128):
        drv.wr(R.MTA + 4 * i, 0)
    # e1000_setup_link / e1000_setup_copper_link
    assert words[0x0F] & 0x3000, "pause bits in Initialization Control 2"
    drv.wr(R.FCAL, 0x00C28001)
    drv.wr(R.FCAH, 0x0100)
    drv.wr(R.FCT, 0x8808)
    drv.wr(R.CTRL, (drv.rd(R.CTRL) | R.CTRL_SLU) & ~(0x1800))
    ctrl = drv.rd(R.CTRL)
    drv.wr(R.CTRL, ctrl | R.CTRL_PHY_RST)  # e1000_phy_hw_reset
    assert not drv.rd(R.STATUS) & R.STATUS_LU, "link down while the PHY is in reset"
    drv.wr(R.CTRL, ctrl)
    phy_id = (mdic(drv, 2, 2) & 0xFFFF) << 16 | (mdic(drv, 2, 3) & 0xFFF0)
    assert phy_id == 0x01410C20  # M88E1011_I_PHY_ID
    mdic(drv, 1, 16, 0x0068 | 0x0060)  # M88 PSCR: auto MDI-X
    mdic(drv, 1, 20, 0x0C60)
    mdic(drv, 1, 0, mdic(drv, 2, 0) & 0xFFFF | 0x8000)  # commit with a PHY reset
    mdic(drv, 1, 4, 0x0DE1)  # e1000_phy_setup_autoneg
    mdic(drv, 1, 9, 0x0300)
    mdic(drv, 1, 0, 0x1000 | 0x0200)
    for _ in range(2):  # e1000_wait_autoneg reads twice
        bmsr = mdic(drv, 2, 1) & 0xFFFF
    assert bmsr & 0x0020 and bmsr & 0x0004
    assert mdic(drv, 2, 17) & 0xAC00 == 0xAC00, "M88 PSSR: 1000 FD, resolved, link"
    status = drv.rd(R.STATUS)
    assert status & R.STATUS_LU and status & R.STATUS_FD and status & 0xC0 == 0x80
    # e1000_clear_hw_cntrs reads every counter; reading again finds zeros
    for off in range(0x4000, 0x4100, 4):
        drv.rd(off)
    assert all(drv.rd(off) == 0 for off in range(0x4000, 0x4100, 4))
    # e1000_configure_tx/rx and traffic
    drv.setup_tx()
    drv.setup_rx(rctl=R.RCTL_EN | (1 << 15) | (1 << 26))  # SECRC as Linux sets it
    drv.wr(R.IMS, R.ICR_TXDW | R.ICR_RXT0 | R.ICR_LSC | R.ICR_RXO | R.ICR_RXDMT0)
    drv.legacy(tcp_frame(b"hello" * 20))
    drv.kick()
    assert backend(drv).sent == [tcp_frame(b"hello" * 20)]
    assert drv.irq_level
