"""A small e1000 driver for tests: programs the device through region reads
and writes the way Linux's e1000 does, with guest RAM in a memfd mapped
into the device as a DMA region. Checksums here are computed by this file's
own code, independent of servers.e1000.packet."""

from __future__ import annotations

import os
import struct
import zlib

from servers.e1000 import regs as R
from servers.e1000.backends import Backend
from servers.e1000.device import E1000Device
from servers.e1000.regs import STATS
from servers.e1000.timers import ManualTimers
from xdevproto.device import DmaRegion
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags

MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("5254000abcde")
RAM_SIZE = 4 << 20
TX_RING, RX_RING = 0x1000, 0x3000
TX_BUF, RX_BUF = 0x10000, 0x100000


class CaptureBackend(Backend):
    """Frames sent are kept in ``sent``; :meth:`inject` plays the wire."""

    name = "capture"

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def _receive(self, timeout: float) -> bytes | None:
        self._stop.wait(timeout)
        return None

    def _send(self, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def inject(self, frame: bytes) -> bool:
        """One frame from the wire; whether the NIC stored it."""
        return bool(self.on_frames([frame]))

    def inject_batch(self, frames: list[bytes]) -> object:
        """Frames arriving together, as a back end hands them over; the
        NIC's answer (how many it stored)."""
        return self.on_frames(frames)


class Driver:
    def __init__(self, backend: Backend | None = None, mac: bytes = MAC) -> None:
        self.ram = MemfdRam(RAM_SIZE)
        self.backend = backend if backend is not None else CaptureBackend()
        self.timers = ManualTimers()
        self.dev = E1000Device(mac, self.backend, timers=self.timers)
        self.dev.dma_map(DmaRegion(0, RAM_SIZE, True, True, fd=os.dup(self.ram.fd)))
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.dev.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER,
                          0, 1, [os.dup(self.irq_fd)], None)
        self.tx_tail = 0
        self.rx_n = 0

    def close(self) -> None:
        self.dev.close()
        os.close(self.irq_fd)
        self.ram.close()

    # -- registers ------------------------------------------------------------------
    def rd(self, off: int) -> int:
        return int.from_bytes(self.dev.region_read(PciRegion.BAR0, off, 4), "little")

    def wr(self, off: int, value: int) -> None:
        self.dev.region_write(PciRegion.BAR0, off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def irq_signalled(self) -> int:
        try:
            return os.eventfd_read(self.irq_fd)
        except BlockingIOError:
            return 0

    @property
    def irq_level(self) -> bool:
        return self.dev.irq_level

    # -- rings ------------------------------------------------------------------------
    def setup_tx(self, n: int = 16) -> None:
        self.tx_n = n
        self.wr(R.TDBAL, TX_RING)
        self.wr(R.TDBAH, 0)
        self.wr(R.TDLEN, n * 16)
        self.wr(R.TDH, 0)
        self.wr(R.TDT, 0)
        self.tx_tail = 0
        self.tx_buf = TX_BUF
        self.wr(R.TCTL, R.TCTL_EN | R.TCTL_PSP)

    def put_tx(self, desc: bytes) -> int:
        """Write one descriptor at the tail (not yet handed over); return its index."""
        i = self.tx_tail
        self.ram.write(TX_RING + 16 * i, desc)
        self.tx_tail = (i + 1) % self.tx_n
        return i

    def buffer(self, data: bytes) -> int:
        addr = self.tx_buf
        self.ram.write(addr, data)
        self.tx_buf += (len(data) + 15) & ~15
        return addr

    def legacy(self, data: bytes, cmd: int = 0x0B, cso: int = 0, css: int = 0,
               special: int = 0) -> int:
        """Legacy descriptor: EOP|IFCS|RS by default."""
        return self.put_tx(struct.pack("<QHBBBBH", self.buffer(data), len(data), cso, cmd, 0,
                                       css, special))

    def context(self, ipcss: int, ipcso: int, ipcse: int, tucss: int, tucso: int, tucse: int,
                paylen: int = 0, tucmd: int = 0, hdr_len: int = 0, mss: int = 0) -> int:
        cmd_len = (tucmd | 0x20) << 24 | paylen & 0xFFFFF  # DEXT, DTYP 0
        return self.put_tx(struct.pack("<BBHBBHIBBH", ipcss, ipcso, ipcse, tucss, tucso, tucse,
                                       cmd_len, 0, hdr_len, mss))

    def data(self, data: bytes, dcmd: int = 0x29, popts: int = 0, special: int = 0) -> int:
        """Data descriptor: DEXT|RS|EOP by default."""
        cmd_len = (dcmd | 0x20) << 24 | 1 << 20 | len(data)
        return self.put_tx(struct.pack("<QIBBH", self.buffer(data), cmd_len, 0, popts, special))

    def kick(self) -> None:
        self.wr(R.TDT, self.tx_tail)

    def tx_status(self, i: int) -> int:
        return self.ram.read(TX_RING + 16 * i + 12, 1)[0]

    def setup_rx(self, n: int = 16, rctl: int = R.RCTL_EN | (1 << 15), bsize: int = 2048,
                 fill: int | None = None) -> None:
        self.rx_n, self.bsize = n, bsize
        for i in range(n):
            self.ram.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + i * bsize, 0))
        self.wr(R.RDBAL, RX_RING)
        self.wr(R.RDBAH, 0)
        self.wr(R.RDLEN, n * 16)
        self.wr(R.RDH, 0)
        self.wr(R.RDT, n - 1 if fill is None else fill)
        self.wr(R.RCTL, rctl)

    def rx_desc(self, i: int) -> tuple[int, int, int, int, int, int]:
        """(addr, length, csum, status, errors, special) of RX descriptor i."""
        return struct.unpack("<QHHBBH", self.ram.read(RX_RING + 16 * i, 16))

    def rx_frame(self, i: int) -> bytes:
        """The frame in RX descriptor i. Without RCTL.SECRC the NIC stores the
        CRC after it: checked here and removed, as Linux's e1000 removes it."""
        addr, length, *_ = self.rx_desc(i)
        return self.strip_fcs(self.ram.read(addr, length))

    def rx_state(self) -> tuple[object, ...]:
        """Everything reception can change: ring, buffers, RDH, ICR, IRQ
        line, statistics (read without clearing them)."""
        return (self.ram.read(RX_RING, 16 * self.rx_n),
                self.ram.read(RX_BUF, self.bsize * self.rx_n),
                self.rd(R.RDH), self.dev.r[R.ICR], self.irq_level,
                {name: self.dev.stat(name) for name in STATS})

    def strip_fcs(self, data: bytes) -> bytes:
        if self.rd(R.RCTL) & R.RCTL_SECRC:
            return data
        assert len(data) >= 4 and data[-4:] == struct.pack("<I", zlib.crc32(data[:-4])), \
            "received frame lacks its CRC"
        return data[:-4]


# -- independent packet helpers ---------------------------------------------------------


def ones(data: bytes, acc: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    for i in range(0, len(data), 2):
        acc += data[i] << 8 | data[i + 1]
    while acc > 0xFFFF:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def ipv4_ok(ip: bytes) -> bool:
    ihl = (ip[0] & 15) * 4
    return ones(ip[:ihl]) == 0xFFFF


def l4_ok(ip: bytes) -> bool:
    """TCP/UDP checksum of an IPv4 packet verifies."""
    ihl = (ip[0] & 15) * 4
    total = struct.unpack_from(">H", ip, 2)[0]
    seg = ip[ihl:total]
    pseudo = ip[12:20] + struct.pack(">BBH", 0, ip[9], len(seg))
    return ones(seg, ones(pseudo)) == 0xFFFF


def tcp_frame(payload: bytes, dst: bytes = PEER, src: bytes = MAC, seq: int = 1000,
              flags: int = 0x18, ip_id: int = 7, csum: bool = True) -> bytes:
    """An Ethernet/IPv4/TCP frame, checksums filled (or zero)."""
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ip_id, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    if csum:
        ip = ip[:10] + struct.pack(">H", ~ones(ip) & 0xFFFF) + ip[12:]
        pseudo = ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack(">H", ~ones(tcp, ones(pseudo)) & 0xFFFF) + tcp[18:]
    return dst + src + b"\x08\x00" + ip + tcp


def udp_frame(payload: bytes, dst: bytes = PEER, src: bytes = MAC) -> bytes:
    udp = struct.pack(">HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    ip = ip[:10] + struct.pack(">H", ~ones(ip) & 0xFFFF) + ip[12:]
    pseudo = ip[12:20] + struct.pack(">BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack(">H", ~ones(udp, ones(pseudo)) & 0xFFFF) + udp[8:]
    return dst + src + b"\x08\x00" + ip + udp


def padded(frame: bytes) -> bytes:
    """What a receiver stores for a short frame: padded to 60 bytes."""
    return frame + bytes(max(0, 60 - len(frame)))
