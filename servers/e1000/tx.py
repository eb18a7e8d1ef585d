"""The transmit engine (8254x SDM 3.3 "Packet Transmission", 3.5 TSO).

A TDT write (or TCTL.EN) processes every descriptor from TDH to TDT in one
batch: the descriptors are fetched with one read per contiguous stretch of
the ring, data buffers are gathered until EOP (joined only when a frame
spans several), offloads applied, the stretch's frames handed to the back
end together, and then status written back for RS descriptors.

Hostile rings are bounded: at most one ring's worth of descriptors per
kick, a head outside the ring restarts at 0 (CVE-2016-1981), a frame is
capped at :data:`MAX_TX_FRAME` bytes and dropped beyond it, TSO parameters
that cannot make progress drop the frame (CVE-2015-6815, CVE-2021-20257),
and loopback frames are delivered to the receiver after the batch rather
than from inside it (CVE-2021-3416).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from xdevproto.errors import VfioUserError

from . import packet
from . import regs as R
from .packet import OffloadError, TxContext

if TYPE_CHECKING:
    from .device import E1000Device

log = logging.getLogger(__name__)

DESC = 16
MAX_TX_FRAME = packet.MAX_TSO_PAYLOAD + 256  # TSO header + 64 KiB payload
MAX_LOOPBACK = 256  # frames looped back per batch; more are dropped

# Descriptor command bits (SDM 3.3.3 legacy CMD, 3.3.7.1 DCMD, 3.3.6 TUCMD)
CMD_EOP = 0x01
CMD_IC = 0x04  # legacy: insert checksum; data: TSE
CMD_TSE = 0x04
CMD_RS = 0x08
CMD_DEXT = 0x20
CMD_VLE = 0x40
CMD_IDE = 0x80
# Legacy (not DEXT), end of packet, no checksum to insert, no tag to insert.
_PLAIN_MASK = CMD_DEXT | CMD_EOP | CMD_IC | CMD_VLE
_TXD = struct.Struct("<QHBBBBH").unpack_from  # a legacy TX descriptor (SDM 3.3.3)
STA_DD = 0x01
DTYP_CONTEXT = 0
DTYP_DATA = 1
POPTS_IXSM = 0x01
POPTS_TXSM = 0x02


class Transmitter:
    def __init__(self, nic: E1000Device) -> None:
        self.nic = nic
        self.busy = False
        self.reset()

    def reset(self) -> None:
        self.ctx = TxContext()
        self.parts: list[bytes] = []  # the data buffers of the frame being gathered
        self.size = 0  # their length
        self.oversize = False
        self.bad_dma = False
        self.tse = False
        self.popts = 0
        self.loopback: list[bytes] = []
        # per batch (set by kick)
        self._psp = self._vlan = self._looped = False
        self._sent: list[bytes] = []
        self._wire: list[bytes] = []  # per stretch of the ring

    def kick(self) -> None:
        """Process the ring (called with the NIC lock held)."""
        nic = self.nic
        regs = nic.r
        if self.busy or not regs[R.TCTL] & R.TCTL_EN:
            return  # re-entry (never expected: DMA cannot reach our registers)
        n = regs[R.TDLEN] // DESC
        if n == 0:
            return
        self.busy = True
        # Registers that only a register write changes, and no write can come
        # while the lock is held: read once per batch, not per frame.
        self._psp = bool(regs[R.TCTL] & R.TCTL_PSP)
        self._vlan = bool(regs[R.CTRL] & R.CTRL_VME)
        self._looped = (regs[R.RCTL] & R.RCTL_LBM_MAC == R.RCTL_LBM_MAC
                        or nic.phy.loopback)
        sent: list[bytes] = []
        self._sent = sent
        try:
            head, tail = regs[R.TDH], regs[R.TDT]
            if head >= n:
                head = 0  # a head past the ring would never meet the tail
            base = regs[R.TDBAH] << 32 | regs[R.TDBAL]
            rs_seen = immediate = False
            done = 0
            while head != tail and done < n:
                count = min((tail - head) % n if tail < n else n - head, n - head, n - done)
                addr = base + head * DESC
                try:
                    raw = nic.dma.read(addr, count * DESC)
                except VfioUserError as exc:
                    log.warning("TX ring at %#x unreadable: %s", addr, exc)
                    break
                report = []
                wire: list[bytes] = []
                self._wire = wire
                # A legacy descriptor holding a whole frame, to go out as it
                # is, is the usual case and takes the short way; everything
                # else (and an unreadable buffer) goes through _descriptor.
                plain = not (self._psp or self._looped)
                dma_read, append_sent, append_wire = nic.dma.read, sent.append, wire.append
                for i in range(count):
                    buf, length, _cso, cmd, _sta, _css, _special = _TXD(raw, i * DESC)
                    if (plain and cmd & _PLAIN_MASK == CMD_EOP and not self.parts
                            and length > 0 and not self.oversize and not self.bad_dma):
                        try:
                            frame = dma_read(buf, length)
                        except VfioUserError:
                            cmd = self._descriptor(raw[i * DESC:(i + 1) * DESC])
                        else:
                            append_sent(frame)
                            append_wire(frame)
                    else:
                        cmd = self._descriptor(raw[i * DESC:(i + 1) * DESC])
                    if cmd & CMD_RS:
                        report.append(i)
                        immediate = immediate or not cmd & CMD_IDE
                # The stretch's frames leave before their descriptors say done.
                nic.backend.send_frames(self._wire)
                if report:
                    rs_seen = True
                    self._write_status(addr, raw, report)
                head = (head + count) % n
                done += count
                regs[R.TDH] = head
        finally:
            self.busy = False
            nic.count_frames(False, sent)
        if rs_seen:
            if immediate:
                nic.raise_cause(R.ICR_TXDW)
            else:  # every reporting descriptor asked for a delayed interrupt (IDE)
                nic.delayed_cause(R.ICR_TXDW, "tidv", "tadv", regs[R.TIDV], regs[R.TADV])
        if head == tail:
            nic.raise_cause(R.ICR_TXQE)
        self._deliver_loopback()

    def _write_status(self, addr: int, raw: bytes, report: list[int]) -> None:
        """Set DD in the status byte of each RS descriptor of a stretch, in
        one write from the first to the last of them. The other bytes go back
        as they were read: the guest does not own these descriptors until it
        sees DD, so nothing it wrote can be overwritten."""
        first, last = report[0], report[-1]
        out = bytearray(raw[first * DESC:(last + 1) * DESC])
        for i in report:
            out[(i - first) * DESC + 12] |= STA_DD
        try:
            self.nic.dma.write(addr + first * DESC, out)
        except VfioUserError as exc:
            log.warning("TX status write-back at %#x failed: %s", addr, exc)

    def _descriptor(self, desc: bytes) -> int:
        """Handle one descriptor; return its command byte."""
        addr, length, cso, cmd, _sta, css, special = struct.unpack("<QHBBBBH", desc)
        if not cmd & CMD_DEXT:
            self._gather(addr, length)
            if cmd & CMD_EOP:
                self._end_legacy(cmd, cso, css, special)
            return cmd
        dtyp = desc[10] >> 4
        if dtyp == DTYP_CONTEXT:
            self.ctx = TxContext.unpack(desc)
            return cmd
        if dtyp != DTYP_DATA:
            log.debug("TX descriptor type %d ignored", dtyp)
            return cmd
        self._gather(addr, struct.unpack_from("<I", desc, 8)[0] & 0xFFFFF)
        self.tse = bool(cmd & CMD_TSE)
        self.popts |= desc[13]
        if cmd & CMD_EOP:
            self._end_data(cmd, special)
        return cmd

    def _gather(self, addr: int, length: int) -> None:
        if length == 0 or self.oversize or self.bad_dma:
            return
        if self.size + length > MAX_TX_FRAME:
            self.oversize = True
            return
        try:
            self.parts.append(self.nic.dma.read(addr, length))
        except VfioUserError:
            self.bad_dma = True
            return
        self.size += length

    def _take(self) -> bytes | None:
        """The frame gathered, joined only when it came in several buffers."""
        parts, bad = self.parts, self.oversize or self.bad_dma
        self.parts, self.size = [], 0
        self.oversize = self.bad_dma = False
        self.popts = 0
        if bad or not parts:
            if self.tse:
                self.nic.count("TSCTFC")
            log.debug("TX frame dropped (oversize or unreadable)")
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _end_legacy(self, cmd: int, cso: int, css: int, special: int) -> None:
        frame: bytes | bytearray | None = self._take()
        if frame is None:
            return
        if cmd & CMD_IC:
            frame = bytearray(frame)
            packet.legacy_checksum(frame, css, cso)
        self._emit(frame, cmd, special)

    def _end_data(self, cmd: int, special: int) -> None:
        tse, popts = self.tse, self.popts
        frame: bytes | bytearray | None = self._take()
        self.tse = False
        if frame is None:
            return
        ixsm, txsm = bool(popts & POPTS_IXSM), bool(popts & POPTS_TXSM)
        if not tse:
            if ixsm or txsm:
                frame = bytearray(frame)
                packet.apply_checksums(frame, self.ctx, ixsm, txsm)
            self._emit(frame, cmd, special)
            return
        try:
            segments = packet.segment(frame, self.ctx, ixsm, txsm)
        except OffloadError as exc:
            log.debug("TSO frame dropped: %s", exc)
            self.nic.count("TSCTFC")
            return
        self.nic.count("TSCTC")
        for seg in segments:
            self._emit(seg, cmd, special)

    def _emit(self, frame: bytes | bytearray, cmd: int, special: int) -> None:
        nic = self.nic
        if cmd & CMD_VLE and self._vlan:
            frame = packet.insert_vlan(frame, nic.r[R.VET], special)
        out = bytes(packet.pad(frame)) if self._psp else bytes(frame)
        self._sent.append(out)  # counted after the batch
        if self._looped:
            if len(self.loopback) < MAX_LOOPBACK:
                self.loopback.append(out)
            return
        self._wire.append(out)

    def _deliver_loopback(self) -> None:
        frames, self.loopback = self.loopback, []
        if frames:
            self.nic.rx.receive(frames)

