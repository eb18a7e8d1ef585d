"""A hostile guest, generated: random command tables, FISes, PRDTs and register
writes against the controller. Whatever it does, no exception escapes a region
access, all work finishes, and after an HBA reset the controller reads the
image correctly."""

from __future__ import annotations

import struct
from pathlib import Path

from ahci_driver import DATA_BASE, PORT, TFES, AhciDriver, h2d
from ahci_phase import pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers.ahci.ata import AtaDisk
from servers.ahci.atapi import AtapiCdrom
from servers.ahci.disk import SECTOR, DiskImage, DiskSpec

SECTORS = 256
COMMANDS = [0x06, 0x20, 0x25, 0x27, 0x2F, 0x35, 0x40, 0x60, 0x61, 0x90, 0xA0, 0xA1, 0xC8,
            0xCA, 0xE5, 0xE7, 0xEA, 0xEC, 0xEF, 0xF8, 0x00, 0xFF]
PORT_REGS = [0x00, 0x08, 0x10, 0x14, 0x18, 0x2C, 0x30, 0x34, 0x38]

command = st.tuples(
    st.integers(0, 1), st.integers(0, 31), st.sampled_from(COMMANDS),
    st.integers(0, SECTORS + 8), st.integers(0, 0x1FF), st.integers(0, 0x1FF),
    st.lists(st.tuples(st.integers(0, 0x3FFFFF), st.integers(0, 0x7FFFF)), max_size=6),
    st.integers(0, 20), st.booleans(), st.binary(min_size=12, max_size=12),
    st.integers(0, 0x5F))
register = st.tuples(st.integers(0, 2), st.sampled_from(PORT_REGS),
                     st.integers(0, 0xFFFFFFFF))
hba_register = st.tuples(st.sampled_from([0x04, 0x08]), st.integers(0, 0xFFFFFFFF))
op = st.one_of(command.map(lambda c: ("cmd", c)), register.map(lambda r: ("reg", r)),
               hba_register.map(lambda r: ("hba", r)))


def play(d: AhciDriver, ops: list[tuple[str, tuple]]) -> None:
    for kind, args in ops:
        if kind == "cmd":
            port, slot, cmd, lba, count, features, prds, cfl, atapi, cdb, fistype = args
            fis = bytearray(h2d(cmd, lba=lba, count=count, features=features))
            if fistype < 0x27:
                fis[0] = fistype
            prdt = [(DATA_BASE + addr, n + 1, False) for addr, n in prds]
            d.build(port, slot, bytes(fis), prdt, write=cmd in (0x06, 0x35, 0x61, 0xCA),
                    cdb=cdb if atapi else None, cfl=cfl)
            d.issue(port, 1 << slot, ncq=cmd in (0x60, 0x61))
        elif kind == "reg":
            port, reg, value = args
            if reg in (0x00, 0x08):  # keep structures inside guest RAM most of the time
                value &= 0x3FFFFFF
            d.pwr(port, reg, value)
        else:
            off, value = args
            d.wr(off, value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=25))
def test_hostile_guest_never_breaks_the_controller(tmp_path: Path,
                                                   ops: list[tuple[str, tuple]]) -> None:
    img = tmp_path / "fuzz.img"
    img.write_bytes(pattern(0, SECTORS))
    iso = tmp_path / "fuzz.iso"
    iso.write_bytes(pattern(0, 64))
    d = AhciDriver([AtaDisk(DiskImage(DiskSpec(str(img)))),
                    AtapiCdrom(DiskImage(DiskSpec(str(iso), readonly=True))), None])
    try:
        d.hba_reset()
        d.port_start(0)
        d.port_start(1)
        play(d, ops)
        d.dev.work.drain()  # everything a guest started finishes
        d.hba_reset()
        d.port_start(0)
        d.port_start(1)
        pis, data = d.run(0, h2d(0x25, lba=SECTORS - 4, count=4), 4 * SECTOR)
        assert not pis & TFES
        assert data == img.read_bytes()[(SECTORS - 4) * SECTOR:]
        pis, data = d.run(1, h2d(0xA0, features=1), 2048,
                          cdb=bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0]))
        assert not pis & TFES and data == pattern(4, 4)
        assert struct.unpack("<I", d.dev.region_read(5, PORT + 0x28, 4))[0] & 0xF == 3
    finally:
        d.close()
