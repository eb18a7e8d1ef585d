"""A small AHCI driver for tests: programs the controller through region reads and
writes the way Linux's libahci does (HBA reset, port start, command slots,
PRDTs), with guest RAM in a memfd mapped into the device as a DMA region.

The FIS and command-header bytes are built here from AHCI 1.3.1 / SATA 3.x
tables, independently of servers.ahci.fis.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence

from servers.ahci.device import AhciDevice
from servers.ahci.port import Drive
from xdevproto.device import DmaRegion
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import IrqIndex, PciRegion, SetIrqsFlags

RAM_SIZE = 48 << 20
ABAR = PciRegion.BAR5
PORT = 0x100
# per-port guest memory: command list, received FIS, 32 command tables
PORT_AREA = 0x40000
CLB_OFF, FB_OFF, CT_OFF = 0x0, 0x1000, 0x2000
CT_SIZE = 0x1000  # 128-byte header + up to 248 PRDs
DATA_BASE = 8 << 20

PxCLB, PxCLBU, PxFB, PxFBU, PxIS, PxIE, PxCMD = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18
PxTFD, PxSIG, PxSSTS, PxSCTL, PxSERR, PxSACT, PxCI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38
TFES, HBFS, IFS = 1 << 30, 1 << 29, 1 << 27
ERRORS = TFES | HBFS | IFS | (1 << 28)


def h2d(command: int, lba: int = 0, count: int = 0, features: int = 0, device: int = 0x40,
        c: bool = True, control: int = 0) -> bytes:
    """Register H2D FIS (SATA 3.x 10.5.5)."""
    return bytes((0x27, 0x80 if c else 0, command, features & 0xFF,
                  lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device,
                  lba >> 24 & 0xFF, lba >> 32 & 0xFF, lba >> 40 & 0xFF, features >> 8 & 0xFF,
                  count & 0xFF, count >> 8 & 0xFF, 0, control, 0, 0, 0, 0))


class AhciDriver:
    def __init__(self, drives: Sequence[Drive | None]) -> None:
        self.ram = MemfdRam(RAM_SIZE)
        self.dev = AhciDevice(drives)
        self.dev.dma_map(DmaRegion(0, RAM_SIZE, True, True, fd=os.dup(self.ram.fd)))
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.dev.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_TRIGGER, 0, 1,
                          [os.dup(self.irq_fd)], None)

    def close(self) -> None:
        self.dev.work.drain()
        self.dev.close()
        os.close(self.irq_fd)
        self.ram.close()

    # -- registers ----------------------------------------------------------------------
    def rd(self, off: int) -> int:
        return int.from_bytes(self.dev.region_read(ABAR, off, 4), "little")

    def wr(self, off: int, value: int) -> None:
        self.dev.region_write(ABAR, off, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def prd(self, port: int, reg: int) -> int:
        return self.rd(PORT + port * 0x80 + reg)

    def pwr(self, port: int, reg: int, value: int) -> None:
        self.wr(PORT + port * 0x80 + reg, value)

    def cfg(self, off: int, n: int = 4) -> int:
        return int.from_bytes(self.dev.region_read(PciRegion.CONFIG, off, n), "little")

    def irq_count(self) -> int:
        try:
            return os.eventfd_read(self.irq_fd)
        except BlockingIOError:
            return 0

    # -- bring-up like libahci ---------------------------------------------------------
    def hba_reset(self) -> None:
        self.wr(0x04, 1 << 31)
        self.wr(0x04, 1 << 31 | 1)
        deadline = time.monotonic() + 1  # libahci: "or the hardware should be considered fried"
        while self.rd(0x04) & 1:
            if time.monotonic() > deadline:
                raise AssertionError("GHC.HR never cleared")
        self.wr(0x04, 1 << 31 | 2)  # AE, IE

    def area(self, port: int) -> int:
        return 0x100000 + port * PORT_AREA

    def port_start(self, port: int) -> None:
        base = self.area(port)
        self.pwr(port, PxCMD, self.prd(port, PxCMD) & ~0x11)
        self.pwr(port, PxCLB, base + CLB_OFF)
        self.pwr(port, PxCLBU, 0)
        self.pwr(port, PxFB, base + FB_OFF)
        self.pwr(port, PxFBU, 0)
        self.pwr(port, PxSERR, 0xFFFFFFFF)
        self.pwr(port, PxIS, 0xFFFFFFFF)
        self.wr(0x08, 1 << port)
        self.pwr(port, PxIE, 0xFDC000FF)
        self.pwr(port, PxCMD, self.prd(port, PxCMD) | 0x10)  # FRE
        self.pwr(port, PxCMD, self.prd(port, PxCMD) | 0x01)  # ST

    def port_stop(self, port: int) -> None:
        self.pwr(port, PxCMD, self.prd(port, PxCMD) & ~0x01)
        self.wait(lambda: not self.prd(port, PxCMD) & (1 << 15), "CR never cleared")

    def wait(self, cond: object, what: str, timeout: float = 10.0) -> None:
        """Poll like a driver; the timeout only turns a hang into a failure."""
        deadline = time.monotonic() + timeout
        while not cond():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(what)
            time.sleep(0.0005)

    # -- commands ----------------------------------------------------------------------
    def table(self, port: int, slot: int) -> int:
        return self.area(port) + CT_OFF + slot * CT_SIZE

    def build(self, port: int, slot: int, fis: bytes, prdt: Sequence[tuple[int, int, bool]] = (),
              write: bool = False, cdb: bytes | None = None, cfl: int = 5,
              prdtl: int | None = None, ctba: int | None = None) -> None:
        """Command header (AHCI 4.2.2) and table (4.2.3) for ``slot``."""
        ct = self.table(port, slot) if ctba is None else ctba
        dw0 = cfl | (1 << 5 if cdb is not None else 0) | (1 << 6 if write else 0)
        dw0 |= (len(prdt) if prdtl is None else prdtl) << 16
        header = struct.pack("<IIII", dw0, 0xDEADBEEF, ct & 0xFFFFFFFF, ct >> 32).ljust(32, b"\0")
        self.ram.write(self.area(port) + CLB_OFF + slot * 32, header)
        if ctba is None:
            self.ram.write(ct, fis.ljust(64, b"\0") + (cdb or b"").ljust(16, b"\0") + bytes(48))
            prds = b"".join(struct.pack("<IIII", a & 0xFFFFFFFF, a >> 32, 0,
                                        (n - 1) | (1 << 31 if i else 0)) for a, n, i in prdt)
            self.ram.write(ct + 0x80, prds)

    def issue(self, port: int, slots: int, ncq: bool = False) -> None:
        if ncq:
            self.pwr(port, PxSACT, slots)
        self.pwr(port, PxCI, slots)

    def wait_done(self, port: int, slots: int) -> int:
        """Wait until the slots complete or the port reports an error; PxIS."""
        self.wait(lambda: not (self.prd(port, PxCI) | self.prd(port, PxSACT)) & slots
                  or self.prd(port, PxIS) & ERRORS, "command never completed")
        return self.prd(port, PxIS)

    def prdbc(self, port: int, slot: int) -> int:
        return struct.unpack("<I", self.ram.read(self.area(port) + CLB_OFF + slot * 32 + 4, 4))[0]

    def rfis(self, port: int, offset: int, n: int = 20) -> bytes:
        return self.ram.read(self.area(port) + FB_OFF + offset, n)

    def run(self, port: int, fis: bytes, nbytes: int = 0, data: bytes | None = None,
            cdb: bytes | None = None, slot: int = 0, chunk: int = 0) -> tuple[int, bytes]:
        """One non-queued command; returns (PxIS, data read)."""
        buf = DATA_BASE + slot * 0x100000
        if data is not None:
            self.ram.write(buf, data)
            nbytes = len(data)
        step = chunk or max(nbytes, 2)
        prdt = [(buf + o, min(step, nbytes - o), False) for o in range(0, nbytes, step)]
        self.build(port, slot, fis, prdt, write=data is not None, cdb=cdb)
        self.pwr(port, PxIS, 0xFFFFFFFF)
        self.issue(port, 1 << slot)
        pis = self.wait_done(port, 1 << slot)
        return pis, self.ram.read(buf, nbytes)
