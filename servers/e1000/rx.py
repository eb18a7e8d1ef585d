"""The receive engine (8254x SDM 3.2 "Packet Reception").

A frame from the wire is filtered (addresses, VLAN), its tag stripped when
CTRL.VME is set, checked for size (RCTL.LPE/SBP), given its CRC unless
RCTL.SECRC asks to strip it, then spread over as many
legacy descriptors as RCTL.BSIZE/BSEX buffers it needs, with status and
checksum written back and RXT0 raised through the delay timers.

Nothing is ever queued: a frame that finds too few free descriptors is
dropped and counted (MPC, RNBC, ICR.RXO). A head outside the ring restarts
at 0 (CVE-2016-1981); a descriptor with a NULL buffer address is skipped
and written back empty, as the SDM says and without stalling the walk
(CVE-2020-28916); an oversized frame without LPE or SBP is discarded rather
than spilt past the buffers (CVE-2012-6075).
"""

from __future__ import annotations

import logging
import struct
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
_ADDR = struct.Struct("<Q")
_WB = struct.Struct("<HHBBH")

_BSIZE = {(0, 0): 2048, (0, 1): 1024, (0, 2): 512, (0, 3): 256,
          (1, 0): 2048, (1, 1): 16384, (1, 2): 8192, (1, 3): 4096}


class Receiver:
    def __init__(self, nic: E1000Device) -> None:
        self.nic = nic
        self._prefetched: dict[int, int] = {}

    def reset(self) -> None:
        self.ring_changed()

    def ring_changed(self) -> None:
        """RDBAL/RDBAH/RDLEN/RDH written or reset: forget prefetched descriptors."""
        self._prefetched = {}

    def _buffer_addr(self, base: int, n: int, head: int, avail: int) -> int:
        """The buffer address of descriptor ``head``. Like the 82540's
        descriptor cache (SDM 3.2.7), up to PREFETCH of the descriptors the
        hardware owns are read at once; they stay valid until consumed,
        since the driver may not touch them before DD is set."""
        cache = self._prefetched
        addr = cache.pop(head, None)
        if addr is not None:
            return addr
        k = max(1, min(avail, n - head, PREFETCH))
        raw = self.nic.dma.read(base + head * DESC, k * DESC)
        cache.clear()
        for i in range(1, k):
            cache[head + i] = _ADDR.unpack_from(raw, i * DESC)[0]
        return int(_ADDR.unpack_from(raw, 0)[0])

    def buffer_size(self) -> int:
        rctl = self.nic.r[R.RCTL]
        return _BSIZE[(rctl >> 25 & 1, rctl >> 16 & 3)]

    def receive(self, frame: bytes) -> bool:
        """Place one frame in the ring (NIC lock held); False when dropped."""
        nic = self.nic
        regs = nic.r
        rctl = regs[R.RCTL]
        if not rctl & R.RCTL_EN or not nic.link_up:
            return False
        if len(frame) > MAX_LONG or (
                len(frame) > MAX_STD and not rctl & (R.RCTL_LPE | R.RCTL_SBP)):
            nic.count("ROC")
            return False
        if not nic.rx_filter().accepts(frame):
            return False
        special = 0
        status = 0
        if regs[R.CTRL] & R.CTRL_VME:
            frame, tci = packet.strip_vlan(frame, regs[R.VET] & 0xFFFF)
            if tci is not None:
                special, status = tci, RXD_STAT_VP
        frame = bytes(packet.pad(frame))
        csum_status, errors, pkt_sum = packet.rx_checksum(frame, regs[R.RXCSUM])
        status |= csum_status
        # Without RCTL.SECRC the CRC is stored after the frame and counted in
        # its length (SDM 13.4.22); Linux's e1000 driver, which leaves SECRC
        # clear, takes 4 bytes off every length it reads back.
        stored = frame if rctl & R.RCTL_SECRC else frame + packet.fcs(frame)
        if not self._store(stored, status, errors, pkt_sum, special):
            nic.count("MPC")
            nic.count("RNBC")
            nic.raise_cause(R.ICR_RXO)
            return False
        nic.count_frame(True, frame)
        nic.delayed_cause(R.ICR_RXT0, "rdtr", "radv", regs[R.RDTR], regs[R.RADV])
        return True

    def _store(self, frame: bytes, status: int, errors: int, pkt_sum: int,
               special: int) -> bool:
        nic = self.nic
        regs = nic.r
        n = regs[R.RDLEN] // DESC
        head, tail = regs[R.RDH], regs[R.RDT]
        if n == 0 or tail >= n:
            return False
        if head >= n:
            head = 0
        free = (tail - head) % n
        bsize = self.buffer_size()
        need = -(-len(frame) // bsize)
        if free < need:
            return False
        base = regs[R.RDBAH] << 32 | regs[R.RDBAL]
        pos = 0
        used = 0
        while pos < len(frame):
            if used == free:
                # NULL descriptors used up the room: what was stored stays, EOP never comes.
                regs[R.RDH] = head
                return False
            addr = base + head * DESC
            try:
                buf = self._buffer_addr(base, n, head, free - used)
            except VfioUserError as exc:
                log.warning("RX ring at %#x unreadable: %s", addr, exc)
                return False
            chunk = frame[pos:pos + bsize] if buf else b""
            err = 0
            if buf:
                try:
                    nic.dma.write(buf, chunk)
                except VfioUserError:
                    err = RXD_ERR_RXE
                pos += len(chunk)
            last = pos >= len(frame)
            st = RXD_STAT_DD | (status | RXD_STAT_EOP if last else 0)
            wb = _WB.pack(len(chunk), pkt_sum if last else 0, st,
                             (errors if last else 0) | err, special if last else 0)
            try:
                nic.dma.write(addr + 8, wb)
            except VfioUserError as exc:
                log.warning("RX write-back at %#x failed: %s", addr, exc)
            head = (head + 1) % n
            used += 1
        regs[R.RDH] = head
        self._check_threshold(n, head, tail)
        return True

    def _check_threshold(self, n: int, head: int, tail: int) -> None:
        """RXDMT0 when free descriptors fall to RCTL.RDMTS of the ring (SDM 13.4.22)."""
        rdmts = self.nic.r[R.RCTL] >> 8 & 3
        if rdmts == 3:
            return
        if (tail - head) % n <= n >> (rdmts + 1):
            self.nic.raise_cause(R.ICR_RXDMT0)
