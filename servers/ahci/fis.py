"""Byte layouts of the structures an AHCI HBA shares with the guest.

* Command header (AHCI 1.3.1 4.2.2), command table and PRDT (4.2.3).
* Register Host-to-Device FIS (SATA 3.x 10.5.5), received-FIS area (4.2.1)
  with the D2H Register (10.5.6), PIO Setup (10.5.11) and Set Device Bits
  (10.5.7) FISes the HBA stores there.

Parsing checks what a hostile guest can get wrong and raises
:class:`BadCommand`, which the port reports as an interface error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xdevproto.pci.dma import SgEntry

from .ata import Outcome, TaskFile

CMD_HEADER_SIZE = 32
CMD_TABLE_PRDT = 0x80  # PRDT offset in the command table
CMD_TABLE_ACMD = 0x40
PRD_SIZE = 16
MAX_PRDTL = 0xFFFF

FIS_REG_H2D = 0x27
FIS_REG_D2H = 0x34
FIS_PIO_SETUP = 0x5F
FIS_SDB = 0xA1

# offsets inside the 256-byte received-FIS area (AHCI 4.2.1)
RFIS_PSFIS = 0x20
RFIS_RFIS = 0x40
RFIS_SDBFIS = 0x58

_HEADER = struct.Struct("<IIII")
_PRD = struct.Struct("<IIII")


class BadCommand(Exception):
    """A command list entry or command table the HBA cannot process."""


@dataclass(frozen=True, slots=True)
class CommandHeader:
    """One command list slot (AHCI 4.2.2)."""

    cfl: int  # command FIS length in dwords
    atapi: bool
    write: bool
    reset: bool
    prdtl: int
    ctba: int

    @classmethod
    def parse(cls, raw: bytes) -> CommandHeader:
        dw0, _prdbc, ctba, ctbau = _HEADER.unpack(raw)
        return cls(cfl=dw0 & 0x1F, atapi=bool(dw0 & 1 << 5), write=bool(dw0 & 1 << 6),
                   reset=bool(dw0 & 1 << 8), prdtl=dw0 >> 16,
                   ctba=(ctbau << 32 | ctba) & ~0x7F)


@dataclass(frozen=True, slots=True)
class H2D:
    """A Register Host-to-Device FIS: a command (``c``) or a device-control update."""

    c: bool
    tf: TaskFile

    @classmethod
    def parse(cls, raw: bytes) -> H2D:
        if len(raw) < 20 or raw[0] != FIS_REG_H2D:
            raise BadCommand(f"command FIS type {raw[0] if raw else -1:#x} is not H2D")
        lba = int.from_bytes(raw[4:7], "little") | int.from_bytes(raw[8:11], "little") << 24
        tf = TaskFile(command=raw[2], features=raw[3] | raw[11] << 8, lba=lba,
                      count=raw[12] | raw[13] << 8, device=raw[7], control=raw[15],
                      aux=int.from_bytes(raw[16:20], "little"))
        return cls(c=bool(raw[1] & 0x80), tf=tf)


def parse_prdt(raw: bytes) -> tuple[list[SgEntry], bool]:
    """The scatter-gather list of a PRDT and whether any entry asks for an interrupt.

    DBC is a 0-based byte count (AHCI 4.2.3.3), so no entry is empty and the
    list is bounded by PRDTL: no zero-length loop (CVE-2014-9718 pattern).
    Entries that continue each other in guest memory come back as one (the
    data phase is the same, and a driver's list of pages or 64 KiB pieces of
    one buffer becomes a single copy); this runs once per command.
    """
    sg: list[SgEntry] = []
    irq = 0
    start = end = -1
    for dba, dbau, _rsvd, dw3 in _PRD.iter_unpack(raw):
        addr = dbau << 32 | (dba & ~1)
        irq |= dw3
        if addr != end:
            if end >= 0:
                sg.append(SgEntry(start, end - start))
            start = end = addr
        end += (dw3 & 0x3FFFFF) + 1
    if end >= 0:
        sg.append(SgEntry(start, end - start))
    return sg, bool(irq >> 31)


def _taskfile_bytes(fis: bytearray, out: Outcome) -> None:
    fis[2], fis[3] = out.status, out.error
    fis[4:7] = (out.lba & 0xFFFFFF).to_bytes(3, "little")
    fis[7] = out.device
    fis[8:11] = (out.lba >> 24 & 0xFFFFFF).to_bytes(3, "little")
    fis[12], fis[13] = out.count & 0xFF, out.count >> 8 & 0xFF


def d2h_fis(out: Outcome, interrupt: bool = True) -> bytes:
    fis = bytearray(20)
    fis[0], fis[1] = FIS_REG_D2H, 0x40 if interrupt else 0
    _taskfile_bytes(fis, out)
    return bytes(fis)


def pio_setup_fis(out: Outcome, to_host: bool) -> bytes:
    fis = bytearray(20)
    fis[0], fis[1] = FIS_PIO_SETUP, 0x40 | (0x20 if to_host else 0)
    _taskfile_bytes(fis, out)
    fis[2] = (out.status | 0x08) & ~0x01 if not out.failed else out.status  # DRQ while data moves
    fis[15] = out.status  # E_Status: the status once the data phase ends
    fis[16:18] = min(out.transferred, 0xFFFF).to_bytes(2, "little")
    return bytes(fis)


def sdb_fis(status: int, error: int, done_tags: int) -> bytes:
    """Set Device Bits (SATA 10.5.7): status low/high bits, error, completed SActive bits."""
    return struct.pack("<BBBBI", FIS_SDB, 0x40, status & 0x77, error, done_tags)


def signature_outcome(signature: int, status: int) -> Outcome:
    """The D2H FIS a device sends after reset: count and LBA carry its signature."""
    return Outcome(status=status, error=0x01, count=signature & 0xFF,
                   lba=signature >> 8 & 0xFFFFFF)
