"""Pure packet logic and the EEPROM/PHY models, against independent code."""

from __future__ import annotations

import struct

import pytest
from e1000_driver import MAC, ipv4_ok, l4_ok, ones, tcp_frame, udp_frame
from hypothesis import assume, given
from hypothesis import strategies as st

from servers.e1000 import packet
from servers.e1000.eeprom import Eeprom, Phy, eeprom_image, mdic_access
from servers.e1000.packet import OffloadError, RxFilter, TxContext


@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    assert packet.inet_checksum(data) == ~ones(data) & 0xFFFF


@given(st.binary(min_size=6, max_size=6), st.integers(0, 3))
def test_mta_hash_matches_linux_formula(addr: bytes, mo: int) -> None:
    shifts = {0: (4, 4), 1: (3, 5), 2: (2, 6), 3: (0, 8)}
    right, left = shifts[mo]
    expect = ((addr[4] >> right) | (addr[5] << left)) & 0xFFF
    assert packet.mta_hash(addr, mo) == expect


def test_insert_checksum_refuses_offsets_outside_frame() -> None:
    frame = bytearray(60)
    assert not packet.insert_checksum(frame, 100, 10, 0)
    assert not packet.insert_checksum(frame, 0, 59, 0)
    assert not packet.insert_checksum(frame, 20, 10, 0), "CSO before CSS"
    assert frame == bytearray(60)


@pytest.mark.parametrize("hdr_len,mss", [(0, 0), (54, 0), (0, 100), (20, 100), (54, 1)])
def test_segment_refuses_impossible_requests(hdr_len: int, mss: int) -> None:
    frame = tcp_frame(b"x" * 10000, csum=False)
    ctx = TxContext(14, 24, 33, 34, 50, 0, 10000, True, True, True, hdr_len, mss)
    with pytest.raises(OffloadError):
        packet.segment(frame, ctx, True, True)


@given(st.integers(1, 3000), st.integers(536, 9000))
def test_segment_covers_payload(size: int, mss: int) -> None:
    payload = bytes(i & 0xFF for i in range(size))
    frame = bytearray(tcp_frame(payload, csum=False))
    seed = sum(struct.unpack(">4H", frame[26:34])) + 6
    struct.pack_into(">H", frame, 50, packet.fold(seed))
    ctx = TxContext(14, 24, 33, 34, 50, 0, size, True, True, True, 54, mss)
    segs = packet.segment(frame, ctx, True, True)
    assert b"".join(s[54:] for s in segs) == payload
    assert all(ipv4_ok(s[14:]) and l4_ok(s[14:]) for s in segs)


def test_segment_header_longer_than_frame() -> None:
    ctx = TxContext(14, 24, 33, 34, 50, 0, 0, True, True, True, 200, 100)
    with pytest.raises(OffloadError):
        packet.segment(tcp_frame(b"x" * 40), ctx, True, True)


def test_udp_tso_sets_length() -> None:
    frame = bytearray(udp_frame(b"u" * 3000))  # IP checksum left filled in: recomputed
    struct.pack_into(">H", frame, 40, 0)
    seed = sum(struct.unpack(">4H", frame[26:34])) + 17
    struct.pack_into(">H", frame, 40, packet.fold(seed))
    ctx = TxContext(14, 24, 33, 34, 40, 0, 3000, True, False, True, 42, 1000)
    segs = packet.segment(frame, ctx, True, True)
    assert len(segs) == 3
    for s in segs:
        assert struct.unpack_from(">H", s, 38)[0] == len(s) - 34
        assert ipv4_ok(s[14:]) and l4_ok(s[14:])


def test_rx_filter_exact_multicast_broadcast_promisc() -> None:
    mta = [0] * 128
    f = RxFilter(frozenset({MAC}), tuple(mta), tuple([0] * 128), 0)
    assert f.accepts(MAC + bytes(10))
    assert not f.accepts(b"\xff" * 6 + bytes(10))
    assert not f.accepts(bytes(6))
    assert not f.accepts(MAC[:5]), "runt"
    f2 = RxFilter(frozenset(), tuple(mta), tuple([0] * 128), packet.RCTL_UPE | packet.RCTL_BAM)
    assert f2.accepts(bytes(6) + bytes(10)) and f2.accepts(b"\xff" * 6 + bytes(8))
    assert not f2.accepts(b"\x01" + bytes(5) + bytes(8)), "UPE does not take multicast"


def test_rx_checksum_ipv4_bad_header() -> None:
    frame = bytearray(tcp_frame(b"abc", dst=MAC))
    frame[24] ^= 1
    status, errors, _ = packet.rx_checksum(bytes(frame), 0x300)
    assert status & packet.RXD_STAT_IPCS and errors & packet.RXD_ERR_IPE
    status, errors, _ = packet.rx_checksum(b"\x00" * 60, 0x300)
    assert status == 0 and errors == 0, "not IP: no claims either way"


def test_vlan_insert_strip_roundtrip() -> None:
    f = tcp_frame(b"v")
    tagged = packet.insert_vlan(f, 0x8100, 0x0123)
    assert packet.vlan_tci(tagged, 0x8100) == 0x0123
    assert packet.strip_vlan(bytes(tagged), 0x8100) == (f, 0x0123)


# -- EEPROM / PHY -----------------------------------------------------------------------


def test_eeprom_image_checksum() -> None:
    words = eeprom_image(MAC)
    assert Eeprom.checksum_ok(words) and struct.pack("<3H", *words[:3]) == MAC


def test_microwire_idle_clocks_and_deselect() -> None:
    e = Eeprom(eeprom_image(MAC))

    def clock(di: int, cs: int = 2) -> None:
        e.write_eecd(cs | (4 if di else 0))
        e.write_eecd(cs | (4 if di else 0) | 1)

    for _ in range(3):
        clock(0)  # idle clocks before the start bit are ignored
    for b in (1, 1, 0, 0, 0, 0, 0, 0, 1):  # READ word 1
        clock(b)
    bits = []
    for _ in range(32):  # sequential read runs into word 2
        clock(0)
        bits.append(bool(e.read_eecd() & 8))
    value = int("".join("1" if b else "0" for b in bits), 2)
    assert value == e.words[1] << 16 | e.words[2]
    e.write_eecd(0)  # CS low ends the read
    assert not e.read_eecd() & 8


def test_write_opcode_is_ignored() -> None:
    e = Eeprom(eeprom_image(MAC))
    before = list(e.words)
    for b in (1, 0, 1, 0, 0, 0, 0, 0, 0) + (1,) * 16:  # WRITE word 0 = 0xFFFF
        e.write_eecd(2 | (4 if b else 0))
        e.write_eecd(3 | (4 if b else 0))
    assert e.words == before


def test_phy_link_down_clears_status() -> None:
    p = Phy()
    p.set_partner(True)
    assert p.read(1) & 0x24 == 0x24 and p.link_up
    p.set_partner(False)
    assert p.read(1) & 0x24 == 0 and not p.link_up
    assert mdic_access(p, 2 << 26 | 1 << 21 | 1 << 16) & 0xFFFF == p.read(1)
    assert mdic_access(p, 3 << 26 | 1 << 21) & (1 << 30), "opcode 3 is an error"


@given(st.binary(max_size=1500), st.sampled_from([0, 14, 15, 34]), st.booleans())
def test_packet_checksum_field_is_sum_from_pcss(payload: bytes, pcss: int, tcp: bool) -> None:
    frame = tcp_frame(payload, dst=MAC) if tcp else udp_frame(payload, dst=MAC)
    frame += b"\x07" * (len(payload) % 3)  # trailing bytes beyond the IP datagram
    _, _, pkt_sum = packet.rx_checksum(frame, 0x300 | pcss)
    assert pkt_sum == ones(frame[pcss:])


@given(st.binary(max_size=1500), st.booleans(), st.integers(0, 1600), st.sampled_from([0, 15, 40]))
def test_rx_checksum_verdicts_match_reference(payload: bytes, tcp: bool, flip: int,
                                              pcss: int) -> None:
    """Odd and even segments, a bit flipped anywhere (or nowhere), PCSS
    before, inside or after the headers: the status, error and packet sum
    agree with the independent word-by-word sums."""
    assume(flip not in (12, 13, 14, 20, 21))  # type, version, fragment: another path
    frame = bytearray(tcp_frame(payload, dst=MAC) if tcp else udp_frame(payload, dst=MAC))
    if flip < len(frame):
        frame[flip] ^= 0x10
    status, errors, pkt_sum = packet.rx_checksum(bytes(frame), 0x300 | pcss)
    ip = bytes(frame[14:])
    assert status & packet.RXD_STAT_IPCS
    assert bool(errors & packet.RXD_ERR_IPE) == (not ipv4_ok(ip))
    assert pkt_sum == ones(bytes(frame[pcss:]))
    total = struct.unpack_from(">H", ip, 2)[0]
    if ip[9] not in (6, 17) or not 28 <= total <= len(ip):
        return  # a flipped length or protocol: the segment is not checked
    if ip[9] == 17 and ip[20 + 6:20 + 8] == b"\0\0":
        assert not status & packet.RXD_STAT_TCPCS, "UDP without checksum"
        return
    assert status & packet.RXD_STAT_TCPCS
    assert bool(errors & packet.RXD_ERR_TCPE) == (not l4_ok(ip))
