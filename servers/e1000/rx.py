"""The receive engine (8254x SDM 3.2 "Packet Reception").

A frame from the wire is filtered (addresses, VLAN), its tag stripped when
CTRL.VME is set, checked for size (RCTL.LPE/SBP), given its CRC unless
RCTL.SECRC asks to strip it, then spread over as many
legacy descriptors as RCTL.BSIZE/BSEX buffers it needs, with status and
checksum written back and RXT0 raised through the delay timers.

Frames come in batches, as many as the back end found waiting. A batch is
stored under one acquisition of the NIC lock, during which no register can
change: registers are read once, descriptors are written back with one
write per contiguous stretch of the ring, and statistics, ICR causes and
the delay timers are updated once at the end, to the values frame-by-frame
reception would leave.

Nothing is ever queued: a frame that finds too few free descriptors is
dropped and counted (MPC, RNBC, ICR.RXO) before anything is computed for
it. A head outside the ring restarts at 0 (CVE-2016-1981); a descriptor
with a NULL buffer address is skipped and written back empty, as the SDM
says and without stalling the walk (CVE-2020-28916); an oversized frame
without LPE or SBP is discarded rather than spilt past the buffers
(CVE-2012-6075).
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from xdevproto.errors import VfioUserError

from . import packet
from . import regs as R
from .packet import RXD_STAT_DD, RXD_STAT_EOP, RXD_STAT_VP

if TYPE_CHECKING:
    from .device import E1000Device

log = logging.getLogger(__name__)

DESC = 16
MAX_STD = 1522  # largest frame without LPE, tag included, FCS excluded as we carry none
MAX_LONG = 16384  # largest frame with LPE (SDM 13.4.22)
RXD_ERR_RXE = 0x80

PREFETCH = 64  # descriptors read ahead in one DMA
# The buffer addresses of k descriptors, for each k up to PREFETCH.
_ADDRS = [struct.Struct("<" + "Q8x" * k) for k in range(PREFETCH + 1)]
# A legacy receive descriptor (SDM 3.2.3): buffer address, length, packet
# checksum, status, errors, special.
_DESC = struct.Struct("<QHHBBH")
# The frame check sequence stored after a frame without RCTL.SECRC: the
# IEEE 802.3 CRC-32, least significant byte first, as the wire carries it.
_FCS = struct.Struct("<I").pack

_BSIZE = {(0, 0): 2048, (0, 1): 1024, (0, 2): 512, (0, 3): 256,
          (1, 0): 2048, (1, 1): 16384, (1, 2): 8192, (1, 3): 4096}


class Receiver:
    """A NIC's receive engine: :meth:`receive` stores batches; the
    descriptor prefetch outlives them."""

    def __init__(self, nic: E1000Device) -> None:
        self.nic = nic
        self.ring_changed()

    def reset(self) -> None:
        self.ring_changed()

    def ring_changed(self) -> None:
        """RDBAL/RDBAH/RDLEN/RDH written or reset: forget prefetched descriptors."""
        self._prefetched: tuple[int, ...] = ()
        self._prefetch_start = self._prefetch_end = 0  # ring indexes in _prefetched
        self._next = -1  # the one of them to be consumed next, if any

    def buffer_addr(self, base: int, n: int, head: int, avail: int) -> int:
        """The buffer address of descriptor ``head``. Like the 82540's
        descriptor cache (SDM 3.2.7), up to PREFETCH of the descriptors the
        hardware owns are read at once; they stay valid until consumed,
        since the driver may not touch them before DD is set. They are
        consumed in ring order, so only the next one can be in the cache."""
        if head != self._next or head >= self._prefetch_end:
            k = max(1, min(avail, n - head, PREFETCH))
            self._next = -1
            self._prefetched = _ADDRS[k].unpack(self.nic.dma.read(base + head * DESC, k * DESC))
            self._prefetch_start, self._prefetch_end = head, head + k
        self._next = head + 1
        return self._prefetched[head - self._prefetch_start]

    def buffer_size(self) -> int:
        rctl = self.nic.r[R.RCTL]
        return _BSIZE[(rctl >> 25 & 1, rctl >> 16 & 3)]

    def receive(self, frames: Iterable[bytes]) -> int:
        """Place frames in the ring, in order (NIC lock held); the number stored."""
        nic = self.nic
        regs = nic.r
        rctl = regs[R.RCTL]
        if not rctl & R.RCTL_EN or not nic.link_up:
            return 0
        longest = MAX_LONG if rctl & (R.RCTL_LPE | R.RCTL_SBP) else MAX_STD
        accepts = nic.rx_filter().accepts
        vet = regs[R.VET] & 0xFFFF if regs[R.CTRL] & R.CTRL_VME else None
        rxcsum = regs[R.RXCSUM]
        # Without RCTL.SECRC the CRC is stored after the frame and counted in
        # its length (SDM 13.4.22); Linux's e1000 driver, which leaves SECRC
        # clear, takes 4 bytes off every length it reads back.
        crc = not rctl & R.RCTL_SECRC
        walk = _Walk(self)
        stored: list[bytes] = []
        oversize = missed = 0
        for frame in frames:
            size = len(frame)
            if size > longest:
                oversize += 1
                continue
            if not accepts(frame):
                continue
            special = status = 0
            if vet is not None:
                frame, tci = packet.strip_vlan(frame, vet)
                if tci is not None:
                    special, status = tci, RXD_STAT_VP
                    size -= packet.VLAN_HLEN
            if size < packet.ETH_ZLEN:
                frame = bytes(packet.pad(frame))
                size = packet.ETH_ZLEN
            if not walk.has_room(size + 4 * crc):
                missed += 1
                continue
            csum_status, errors, pkt_sum = packet.rx_checksum(frame, rxcsum)
            data = frame + _FCS(zlib.crc32(frame)) if crc else frame
            if walk.store(data, status | csum_status, errors, pkt_sum, special):
                stored.append(frame)
            else:
                missed += 1
        walk.finish()
        self._account(walk, stored, oversize, missed)
        return len(stored)

    def _account(self, walk: _Walk, stored: list[bytes], oversize: int, missed: int) -> None:
        """Statistics and interrupt causes of a batch (SDM 13.7, 3.4.3)."""
        nic = self.nic
        regs = nic.r
        causes = 0
        if oversize:
            nic.count("ROC", oversize)
        if missed:
            nic.count("MPC", missed)
            nic.count("RNBC", missed)
            causes |= R.ICR_RXO
        if walk.below_threshold(regs[R.RCTL]):
            causes |= R.ICR_RXDMT0
        if causes:
            nic.raise_cause(causes)
        if stored:
            nic.count_frames(True, stored)
            nic.delayed_cause(R.ICR_RXT0, "rdtr", "radv", regs[R.RDTR], regs[R.RADV])


class _Walk:
    """One batch's pass over the ring (SDM 3.2.6): RDBA/RDLEN/RDH/RDT read
    once, the head kept here and stored in RDH at the end, descriptors
    written back when the batch ends or the stretch they form breaks."""

    def __init__(self, rx: Receiver) -> None:
        regs = rx.nic.r
        self.rx = rx
        self.dma = rx.nic.dma
        self.n = regs[R.RDLEN] // DESC
        self.tail = regs[R.RDT]
        self.usable = self.n > 0 and self.tail < self.n
        self.head = regs[R.RDH]
        if self.head >= self.n:
            self.head = 0  # a head past the ring would never meet the tail
        self.moved = False  # whether RDH gets self.head
        self.filled: int | None = None  # the head after the last frame stored
        self.base = regs[R.RDBAH] << 32 | regs[R.RDBAL]
        self.bsize = rx.buffer_size()
        self.pending = bytearray()  # whole descriptors to write back ...
        self.pending_start = 0  # ... from this ring index on

    def has_room(self, size: int) -> bool:
        """Whether the descriptors the hardware owns have buffers for ``size`` bytes."""
        return self.usable and (self.tail - self.head) % self.n >= -(-size // self.bsize)

    def store(self, data: bytes, status: int, errors: int, pkt_sum: int,
              special: int) -> bool:
        """Spread ``data`` over buffers from the head (SDM 3.2.3); False if
        it did not all fit (NULL buffers took the room) or the ring could
        not be read."""
        size, n, bsize = len(data), self.n, self.bsize
        head = self.head
        rx = self.rx
        if size <= bsize and head == rx._next and head < rx._prefetch_end:
            # The usual case, written out: one buffer, its address prefetched.
            buf = rx._prefetched[head - rx._prefetch_start]
            if buf:
                rx._next = head + 1
                err = 0
                try:
                    self.dma.write(buf, data)
                except VfioUserError:
                    err = RXD_ERR_RXE
                desc = _DESC.pack(buf, size, pkt_sum, RXD_STAT_DD | RXD_STAT_EOP | status,
                                  errors | err, special)
                if head == self.pending_start + len(self.pending) // DESC:
                    self.pending += desc
                else:
                    self._write_back(head, desc)
                self.head = self.filled = head + 1 if head + 1 < n else 0
                self.moved = True
                return True
        free = (self.tail - head) % n
        pos = used = 0
        while pos < size:
            if used == free:
                # NULL descriptors used up the room: what was stored stays, EOP never comes.
                self.head, self.moved = head, True
                return False
            try:
                buf = self.rx.buffer_addr(self.base, n, head, free - used)
            except VfioUserError as exc:
                log.warning("RX ring at %#x unreadable: %s", self.base + head * DESC, exc)
                return False
            length = err = 0
            if buf:
                chunk = data[pos:pos + bsize]  # data itself, uncopied, when it fits
                length = len(chunk)
                try:
                    self.dma.write(buf, chunk)
                except VfioUserError:
                    err = RXD_ERR_RXE
                pos += length
            if pos < size:
                desc = _DESC.pack(buf, length, 0, RXD_STAT_DD, err, 0)
            else:
                desc = _DESC.pack(buf, length, pkt_sum, RXD_STAT_DD | RXD_STAT_EOP | status,
                                  errors | err, special)
            self._write_back(head, desc)
            head = head + 1 if head + 1 < n else 0
            used += 1
        self.head = self.filled = head
        self.moved = True
        return True

    def _write_back(self, index: int, desc: bytes) -> None:
        if index != self.pending_start + len(self.pending) // DESC:
            self._flush()
            self.pending_start = index
        self.pending += desc

    def _flush(self) -> None:
        """Write the pending descriptors back in one write. Their addresses
        go back as they were read: the driver does not touch a descriptor
        it handed over until it sees DD (SDM 3.2.3)."""
        if not self.pending:
            return
        addr = self.base + self.pending_start * DESC
        try:
            self.dma.write(addr, self.pending)
        except VfioUserError:
            # Part of the stretch may still be writable: status fields one by one.
            for off in range(0, len(self.pending), DESC):
                try:
                    self.dma.write(addr + off + 8, self.pending[off + 8:off + DESC])
                except VfioUserError as exc:
                    log.warning("RX write-back at %#x failed: %s", addr + off, exc)
        self.pending = bytearray()

    def finish(self) -> None:
        """The end of the batch: write back what is pending, move RDH."""
        self._flush()
        if self.moved:
            self.rx.nic.r[R.RDH] = self.head

    def below_threshold(self, rctl: int) -> bool:
        """RXDMT0: free descriptors at or below RCTL.RDMTS of the ring once a
        frame was stored (SDM 13.4.22); free only shrinks within a batch, so
        checking after its last frame stored equals checking after each."""
        rdmts = rctl >> 8 & 3
        return (self.filled is not None and rdmts != 3
                and (self.tail - self.filled) % self.n <= self.n >> (rdmts + 1))
