"""Packet logic of the 82540EM as pure functions: no registers, no I/O.

Transmit offloads (8254x SDM 3.3.5-3.3.7, 3.5 "TCP Segmentation"): checksum
insertion at the offsets a context descriptor gives, TCP segmentation, VLAN
tag insertion. Receive (SDM 3.2.1, 3.2.5, 3.2.9, 13.4.22): address and VLAN
filtering, VLAN stripping, checksum verification status bits.

Every offset here comes from a guest descriptor, so every one is checked:
an offset outside the frame skips that offload instead of raising, and a
segmentation request that cannot make progress (mss or header length 0,
CVE-2015-6815) is refused with :class:`OffloadError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame without FCS; shorter frames are padded
VLAN_HLEN = 4
#: the largest TSO payload we accept (Linux sends at most 64 KiB per GSO frame)
MAX_TSO_PAYLOAD = 0x10000
#: no more than this many segments from one TSO frame
MAX_TSO_SEGMENTS = 4096


Buf = bytes | bytearray | memoryview


class OffloadError(ValueError):
    """A transmit offload request the device refuses (the frame is dropped)."""


def inet_sum(data: Buf, start: int = 0) -> int:
    """A running ones'-complement sum of 16-bit big-endian words (RFC 1071),
    odd final byte padded with zero; fold with :func:`fold`.

    Since 2**16 is 1 modulo 0xFFFF, the words' end-around-carry sum is the
    whole buffer read as one big number modulo 0xFFFF (RFC 1071 section 2),
    which int.from_bytes computes in C; only 0 versus 0xFFFF needs care."""
    n = _residue(data)
    folded = (n << 8 if len(data) & 1 else n) % 0xFFFF  # the pad byte
    if folded == 0 and any(data):
        folded = 0xFFFF
    return start + folded


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: Buf, start: int = 0) -> int:
    """The ones'-complement checksum to store in a header."""
    return ~fold(inet_sum(data, start)) & 0xFFFF


# -- transmit -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TxContext:
    """The fields of a TCP/IP context descriptor (SDM 3.3.6).

    ``*cse`` are inclusive end offsets; 0 means "to the end of the frame".
    """

    ipcss: int = 0
    ipcso: int = 0
    ipcse: int = 0
    tucss: int = 0
    tucso: int = 0
    tucse: int = 0
    paylen: int = 0
    is_ipv4: bool = False  # TUCMD.IP
    is_tcp: bool = False  # TUCMD.TCP
    tse: bool = False  # TUCMD.TSE
    hdr_len: int = 0
    mss: int = 0

    @classmethod
    def unpack(cls, desc: bytes) -> TxContext:
        ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd_len, _sta, hdr_len, mss = struct.unpack(
            "<BBHBBHIBBH", desc)
        tucmd = cmd_len >> 24
        return cls(ipcss, ipcso, ipcse, tucss, tucso, tucse, cmd_len & 0xFFFFF,
                   bool(tucmd & 0x02), bool(tucmd & 0x01), bool(tucmd & 0x04), hdr_len, mss)


def insert_checksum(frame: bytearray, css: int, cso: int, cse: int) -> bool:
    """Sum ``frame[css..cse]`` (cse inclusive, 0 = end) and store the
    complement at ``cso`` (SDM 3.3.5). The field's current content is part
    of the sum: drivers seed it with the pseudo-header sum (TCP/UDP) or zero
    it (IPv4). Returns False (frame untouched) when the offsets do not fit."""
    end = len(frame) if cse == 0 or cse >= len(frame) else cse + 1
    if css >= end or cso + 2 > len(frame) or cso < css:
        return False
    struct.pack_into(">H", frame, cso, inet_checksum(frame[css:end]))
    return True


def add_to_field(frame: bytearray, off: int, value: int) -> None:
    """Add ``value`` into the 16-bit ones'-complement field at ``off``."""
    (old,) = struct.unpack_from(">H", frame, off)
    struct.pack_into(">H", frame, off, fold(old + value))


def apply_checksums(frame: bytearray, ctx: TxContext, ixsm: bool, txsm: bool) -> None:
    """Checksum insertion for a frame sent without segmentation (SDM 3.3.5)."""
    if ixsm:
        insert_checksum(frame, ctx.ipcss, ctx.ipcso, ctx.ipcse)
    if txsm:
        insert_checksum(frame, ctx.tucss, ctx.tucso, ctx.tucse)


def legacy_checksum(frame: bytearray, css: int, cso: int) -> None:
    """Legacy descriptor CMD.IC: sum from CSS to the end, store at CSO (SDM 3.3.3)."""
    insert_checksum(frame, css, cso, 0)


def segment(frame: Buf, ctx: TxContext, ixsm: bool, txsm: bool) -> list[bytearray]:
    """TCP segmentation (SDM 3.5): the header ``frame[:hdr_len]`` is
    repeated before each ``mss``-byte slice of the payload, with per-segment
    IPv4 total length / identification, IPv6 payload length, TCP sequence
    number and flags (FIN and PSH only on the last segment), UDP length and
    checksums fixed. The driver seeds the TCP/UDP checksum with a
    pseudo-header sum *without* the length (Linux ``e1000_tso``); the length
    of each segment is added here."""
    hdr_len, mss = ctx.hdr_len, ctx.mss
    if mss == 0 or hdr_len == 0:
        raise OffloadError(f"TSO with mss={mss} hdr_len={hdr_len}")
    if hdr_len > len(frame) or (ctx.tucss + 20 > hdr_len and ctx.is_tcp):
        raise OffloadError(f"TSO header {hdr_len} does not fit a {len(frame)}-byte frame")
    if ctx.ipcss + (20 if ctx.is_ipv4 else 40) > hdr_len or ctx.tucss + 8 > hdr_len:
        raise OffloadError("TSO header offsets outside the header")
    payload = memoryview(frame)[hdr_len:]
    if len(payload) > MAX_TSO_PAYLOAD:
        raise OffloadError(f"TSO payload {len(payload)} too large")
    count = max(1, -(-len(payload) // mss))
    if count > MAX_TSO_SEGMENTS:
        raise OffloadError(f"TSO would make {count} segments")
    header = bytes(frame[:hdr_len])
    (ip_id,) = struct.unpack_from(">H", header, ctx.ipcss + 4)
    seq = struct.unpack_from(">I", header, ctx.tucss + 4)[0] if ctx.is_tcp else 0
    out = []
    for i in range(count):
        chunk = payload[i * mss:(i + 1) * mss]
        seg = bytearray(header)
        seg += chunk
        last = i == count - 1
        if ctx.is_ipv4:
            struct.pack_into(">HH", seg, ctx.ipcss + 2, len(seg) - ctx.ipcss, (ip_id + i) & 0xFFFF)
        else:
            struct.pack_into(">H", seg, ctx.ipcss + 4, len(seg) - ctx.ipcss - 40)
        l4_len = len(seg) - ctx.tucss
        if ctx.is_tcp:
            struct.pack_into(">I", seg, ctx.tucss + 4, (seq + i * mss) & 0xFFFFFFFF)
            if not last:
                seg[ctx.tucss + 13] &= ~0x09 & 0xFF  # FIN, PSH
        else:
            struct.pack_into(">H", seg, ctx.tucss + 4, l4_len)
        if ixsm and ctx.ipcso + 2 <= len(seg):
            # Drivers zero it (Linux e1000_tso); a stale value would be wrong
            # for every segment since length and ID changed, so start from 0.
            struct.pack_into(">H", seg, ctx.ipcso, 0)
            insert_checksum(seg, ctx.ipcss, ctx.ipcso, ctx.ipcse)
        if txsm and ctx.tucso + 2 <= len(seg):
            add_to_field(seg, ctx.tucso, l4_len)
            insert_checksum(seg, ctx.tucss, ctx.tucso, 0)
        out.append(seg)
    return out


def insert_vlan(frame: bytes | bytearray, tpid: int, tci: int) -> bytearray:
    """Insert an 802.1Q tag after the two MAC addresses (SDM 3.3.7.2, VLE)."""
    out = bytearray(frame[:12])
    out += struct.pack(">HH", tpid & 0xFFFF, tci & 0xFFFF)
    out += frame[12:]
    return out


def pad(frame: bytes | bytearray) -> bytes | bytearray:
    """Pad a short frame to the Ethernet minimum (TCTL.PSP, and on receive)."""
    if len(frame) < ETH_ZLEN:
        return bytes(frame) + bytes(ETH_ZLEN - len(frame))
    return frame


# -- receive ------------------------------------------------------------------

# RCTL fields used for filtering (SDM 13.4.22)
RCTL_UPE = 1 << 3
RCTL_MPE = 1 << 4
RCTL_BAM = 1 << 15
RCTL_VFE = 1 << 18
RCTL_MO_SHIFT = 12

BROADCAST = b"\xff" * 6


def mta_hash(addr: bytes, mo: int) -> int:
    """The 12-bit multicast table index of a destination address (SDM
    13.5.1, RCTL.MO selects which 12 of the top 16 bits)."""
    shift = (4, 3, 2, 0)[mo & 3]
    return ((addr[4] | addr[5] << 8) >> shift) & 0xFFF


def vlan_tci(frame: Buf, vet: int) -> int | None:
    """The tag control field if the frame carries a tag of type ``vet``."""
    if len(frame) >= ETH_HLEN + VLAN_HLEN and struct.unpack_from(">H", frame, 12)[0] == vet:
        return int(struct.unpack_from(">H", frame, 14)[0])
    return None


@dataclass(frozen=True, slots=True)
class RxFilter:
    """The receive filter state: exact addresses (RAL/RAH with AV set),
    MTA and VFTA tables, RCTL and VET (SDM 3.2.1, 13.4.22)."""

    exact: frozenset[bytes]
    mta: tuple[int, ...]  # 128 words
    vfta: tuple[int, ...]  # 128 words
    rctl: int
    vet: int = 0x8100

    def accepts(self, frame: bytes) -> bool:
        if len(frame) < ETH_HLEN:
            return False
        tci = vlan_tci(frame, self.vet) if self.rctl & RCTL_VFE else None
        if tci is not None:
            vid = tci & 0xFFF
            if not self.vfta[vid >> 5] >> (vid & 31) & 1:
                return False
        dst = frame[:6]
        if dst in self.exact:
            return True
        if dst == BROADCAST:
            return bool(self.rctl & RCTL_BAM)
        if dst[0] & 1:
            if self.rctl & RCTL_MPE:
                return True
            h = mta_hash(dst, self.rctl >> RCTL_MO_SHIFT)
            return bool(self.mta[h >> 5] >> (h & 31) & 1)
        return bool(self.rctl & RCTL_UPE)


def strip_vlan(frame: bytes, vet: int) -> tuple[bytes, int | None]:
    """Remove the tag of type ``vet`` (CTRL.VME), returning it for the
    descriptor's special field (SDM 3.2.9)."""
    tci = vlan_tci(frame, vet)
    if tci is None:
        return frame, None
    return frame[:12] + frame[16:], tci


# RX descriptor status / error bits (SDM 3.2.3.1, 3.2.3.2)
RXD_STAT_DD = 0x01
RXD_STAT_EOP = 0x02
RXD_STAT_IXSM = 0x04
RXD_STAT_VP = 0x08
RXD_STAT_TCPCS = 0x20
RXD_STAT_IPCS = 0x40
RXD_ERR_TCPE = 0x20
RXD_ERR_IPE = 0x40

RXCSUM_IPOFL = 1 << 8
RXCSUM_TUOFL = 1 << 9
# IPv4 total length, identification, flags/fragment offset, TTL, protocol.
_IP_FIELDS = struct.Struct(">HHHBB").unpack_from


def rx_checksum(frame: bytes, rxcsum: int) -> tuple[int, int, int]:
    """(status bits, error bits, packet checksum) for a received frame
    (SDM 3.2.9 and 13.4.41 RXCSUM). Without IPOFL/TUOFL the device says
    "ignore checksum" (IXSM). ``frame`` is untagged.

    Summing a frame is the costly part, so the frame is summed once: the
    bytes from PCSS to the end, read as one big-endian number modulo
    0xFFFF (see :func:`inet_sum`). The TCP/UDP segment's residue follows
    from it by taking off the bytes before and after the segment, which
    are few: placing ``k`` bytes after a number multiplies it by 2**(8k),
    which is 1 modulo 0xFFFF for even ``k`` and 256 for odd ``k``, and 256
    is its own inverse (256 * 256 = 65536 = 1). This runs for every frame
    received, so the IPv4 checks are written out here rather than spread
    over helpers."""
    pcss = rxcsum & 0xFF
    size = len(frame)
    whole = _residue(frame[pcss:] if pcss else frame)
    # The packet checksum: an odd count is padded with a zero byte; a sum
    # that is 0 modulo 0xFFFF is 0xFFFF unless every byte is zero.
    pkt_sum = (whole << 8 if (size - pcss) & 1 else whole) % 0xFFFF if pcss < size else 0
    if pkt_sum == 0 and any(frame[pcss:]):
        pkt_sum = 0xFFFF
    if not rxcsum & (RXCSUM_IPOFL | RXCSUM_TUOFL):
        return RXD_STAT_IXSM, 0, pkt_sum
    if size < ETH_HLEN + 20 or frame[12] != 0x08 or frame[13] != 0x00:
        return 0, 0, pkt_sum  # not IPv4: nothing to check
    ihl = (frame[ETH_HLEN] & 0x0F) * 4
    if frame[ETH_HLEN] >> 4 != 4 or ihl < 20 or ETH_HLEN + ihl > size:
        return 0, 0, pkt_sum
    # Each sum checked below includes a nonzero word (the IP version, the
    # protocol), so it folds to 0xFFFF, the good value, exactly when it is
    # 0 modulo 0xFFFF.
    status = errors = 0
    if rxcsum & RXCSUM_IPOFL:
        status = RXD_STAT_IPCS
        if int.from_bytes(frame[ETH_HLEN:ETH_HLEN + ihl], "big") % 0xFFFF:
            errors = RXD_ERR_IPE
    total, _, fragment, _, proto = _IP_FIELDS(frame, ETH_HLEN + 2)
    start, end = ETH_HLEN + ihl, ETH_HLEN + total
    if not (rxcsum & RXCSUM_TUOFL and proto in (6, 17) and not fragment & 0x3FFF
            and start + 8 <= end <= size):
        return status, errors, pkt_sum
    if proto == 6 or frame[start + 6] or frame[start + 7]:  # UDP may carry no checksum
        if pcss <= start:
            # whole = before * 2**(8 (size - start)) + segment * 2**(8 (size - end)) + after
            before = int.from_bytes(frame[pcss:start], "big")
            rest = whole - (before << 8 if (size - start) & 1 else before)
            if end < size:
                rest -= _residue(frame[end:])
            segment = rest << 8 if (size - end) & 1 else rest
        else:
            segment = _residue(frame[start:end])
        # The pseudo header: source and destination address, protocol, length.
        pseudo = int.from_bytes(frame[ETH_HLEN + 12:ETH_HLEN + 20], "big") + proto + end - start
        status |= RXD_STAT_TCPCS
        if ((segment << 8 if (end - start) & 1 else segment) + pseudo) % 0xFFFF:  # odd: padded
            errors |= RXD_ERR_TCPE
    return status, errors, pkt_sum


# Where _residue folds: multiples of 16 bits, so the parts add up to the
# same residue, and of 30 bits, CPython's digit, so the shifts move whole
# digits. The first halves a 1500-byte frame, the second halves that.
_FOLD1, _FOLD2 = 5760, 2880
_MASK1, _MASK2 = (1 << _FOLD1) - 1, (1 << _FOLD2) - 1


def _residue(data: Buf) -> int:
    """A number congruent to ``data`` read as one big-endian number, modulo
    0xFFFF, and much shorter than it. As 2**16 is 1 modulo 0xFFFF, the part
    above a multiple of 16 bits plus the part below is congruent to the
    whole; two such folds, a shift and a mask each, leave the remainder a
    quarter of the digits to divide, one by one."""
    n = int.from_bytes(data, "big")
    n = (n >> _FOLD1) + (n & _MASK1)
    return (n >> _FOLD2) + (n & _MASK2)

