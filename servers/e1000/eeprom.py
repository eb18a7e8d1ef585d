"""The 82540EM's EEPROM and PHY, as the driver reaches them through EECD/EERD
and MDIC (8254x SDM 5 "EEPROM Interface", 13.4.3-13.4.4, 13.4.7, and 13.5
"PHY Registers").

The EEPROM is a 64-word microwire part: bit-banged through EECD (SK, CS, DI
in; DO out) or read a word at a time through EERD. Writes from the guest are
accepted on the wire and ignored: the image is read-only.

The PHY is the internal M88E1011-compatible PHY at MDIO address 1.
Autonegotiation completes at once when the link partner (the back end) is
up; the negotiated result is 1000 Mb/s full duplex.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

EEPROM_WORDS = 64
EEPROM_SUM = 0xBABA  # words 0..0x3F sum to this (SDM 5.6.1; Linux e1000_validate_eeprom_checksum)
INTEL = 0x8086
DEVICE_ID = 0x100E
SUBSYSTEM_ID = 0x001E  # "PRO/1000 MT Desktop Adapter"


def eeprom_image(mac: bytes) -> list[int]:
    """The 64-word image (SDM table 5-2): MAC in words 0-2, IDs in 0x0B-0x0E,
    checksum in 0x3F. Unused words read as erased (0xFFFF)."""
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    words = [0xFFFF] * EEPROM_WORDS
    words[0:3] = struct.unpack("<3H", mac)
    words[3:10] = [0x0000] * 7  # compatibility, image version, PBA number: none
    words[0x0A] = 0x0000  # Initialization Control 1: no special loads
    words[0x0B] = SUBSYSTEM_ID
    words[0x0C] = INTEL  # subsystem vendor
    words[0x0D] = DEVICE_ID
    words[0x0E] = INTEL
    words[0x0F] = 0x3000  # Initialization Control 2: symmetric and asymmetric pause
    words[0x10:0x30] = [0x0000] * 0x20  # init control 3 (no APM wake-up) and reserved
    words[0x3F] = (EEPROM_SUM - sum(words[:0x3F])) & 0xFFFF
    return words


# EECD bits (SDM 13.4.3)
EECD_SK = 1 << 0
EECD_CS = 1 << 1
EECD_DI = 1 << 2
EECD_DO = 1 << 3
EECD_REQ = 1 << 6
EECD_GNT = 1 << 7
EECD_PRES = 1 << 8
#: writable by the driver; DO, GNT and PRES are the device's
EECD_WRITABLE = EECD_SK | EECD_CS | EECD_DI | 0x30 | EECD_REQ

# EERD fields on the 82540 (SDM 13.4.4): START bit 0, DONE bit 4, ADDR 15:8
EERD_START = 1 << 0
EERD_DONE = 1 << 4

MICROWIRE_READ = 0b110  # start bit + READ opcode (SDM 5.5)
ADDR_BITS = 6


class Eeprom:
    """Microwire state machine and EERD (SDM 5.5, 13.4.3-13.4.4)."""

    def __init__(self, words: Iterable[int]) -> None:
        self.words = [w & 0xFFFF for w in words]
        if len(self.words) != EEPROM_WORDS:
            raise ValueError(f"EEPROM image must be {EEPROM_WORDS} words")
        self.eecd = 0
        self._deselect()

    def _deselect(self) -> None:
        self._shift = 0
        self._nbits = 0
        self._reading = False
        self._addr = 0
        self._pos = -1  # bit index into the read stream; -1 = the dummy zero
        self._do = False

    def read_eecd(self) -> int:
        value = (self.eecd & EECD_WRITABLE) | EECD_PRES
        if self.eecd & EECD_REQ:
            value |= EECD_GNT
        if self._do:
            value |= EECD_DO
        return value

    def write_eecd(self, value: int) -> None:
        old = self.eecd
        self.eecd = value & EECD_WRITABLE
        if not value & EECD_CS:
            self._deselect()
            return
        if value & EECD_SK and not old & EECD_SK:
            self._clock(bool(value & EECD_DI))

    def _clock(self, di: bool) -> None:
        """One rising edge of SK with CS high."""
        if self._reading:
            # Sequential read: after bit 0 of a word comes bit 15 of the next.
            self._pos += 1
            word = self.words[(self._addr + self._pos // 16) % EEPROM_WORDS]
            self._do = bool(word >> (15 - self._pos % 16) & 1)
            return
        if self._nbits >= 3 + ADDR_BITS:
            return  # an opcode we ignore (write/erase/enable): wait for CS low
        if self._nbits == 0 and not di:
            return  # zeros before the start bit are idle clocks
        self._shift = self._shift << 1 | di
        self._nbits += 1
        if self._nbits == 3 + ADDR_BITS and self._shift >> ADDR_BITS == MICROWIRE_READ:
            self._reading = True
            self._addr = self._shift & (EEPROM_WORDS - 1)
            self._pos = -1
            self._do = False  # the dummy zero before the data

    def eerd(self, value: int) -> int:
        """EERD after a write of ``value``: a START reads at once."""
        addr = value >> 8 & 0xFF
        if not value & EERD_START:
            return value & 0xFF00
        data = self.words[addr] if addr < EEPROM_WORDS else 0
        return data << 16 | addr << 8 | EERD_DONE

    @staticmethod
    def checksum_ok(words: list[int]) -> bool:
        return sum(words[:EEPROM_WORDS]) & 0xFFFF == EEPROM_SUM


# -- PHY ----------------------------------------------------------------------

PHY_ADDR = 1
PHY_CTRL, PHY_STATUS, PHY_ID1, PHY_ID2, PHY_ANAR, PHY_ANLPAR, PHY_ANER = range(7)
PHY_1000T_CTRL, PHY_1000T_STATUS, PHY_EXT_STATUS = 9, 10, 15
M88_SPEC_CTRL, M88_SPEC_STATUS, M88_EXT_SPEC_CTRL = 16, 17, 20

CTRL_RESET = 1 << 15
CTRL_LOOPBACK = 1 << 14
CTRL_AN_ENABLE = 1 << 12
CTRL_AN_RESTART = 1 << 9
STATUS_LINK = 1 << 2
STATUS_AN_DONE = 1 << 5

# Reset values (SDM 13.5 and the M88E1011 data sheet the SDM follows).
_PHY_RESET = {
    PHY_CTRL: 0x1140,  # AN enabled, full duplex, 1000 Mb/s select
    PHY_STATUS: 0x7949,  # 10/100 capable, extended status, AN able, no link yet
    PHY_ID1: 0x0141,  # Marvell OUI
    PHY_ID2: 0x0C20,  # M88E1011 (Linux M88E1011_I_PHY_ID)
    PHY_ANAR: 0x0DE1,
    PHY_ANLPAR: 0x0000,
    PHY_ANER: 0x0000,
    PHY_1000T_CTRL: 0x0E00,
    PHY_1000T_STATUS: 0x0000,
    PHY_EXT_STATUS: 0x3000,
    M88_SPEC_CTRL: 0x0068,
    M88_SPEC_STATUS: 0x0000,
    M88_EXT_SPEC_CTRL: 0x0D60,
}
_PHY_READ_ONLY = {PHY_STATUS, PHY_ID1, PHY_ID2, PHY_ANLPAR, PHY_ANER, PHY_1000T_STATUS,
                  PHY_EXT_STATUS, M88_SPEC_STATUS}

# What an autonegotiated link partner that can do everything advertises.
_LP_ABILITY = 0x4000 | 0x0400 | 0x01E0 | 0x0001  # ACK, pause, 10/100 HD/FD, 802.3
_LP_1000T = 0x3C00  # local and remote receiver OK, partner 1000 FD and HD
_M88_LINKED = 0x8000 | 0x2000 | 0x0800 | 0x0400  # 1000 Mb/s, FD, resolved, link


class Phy:
    """The PHY register file and the link state it reports."""

    def __init__(self) -> None:
        self.partner_up = False
        self.regs = dict(_PHY_RESET)
        self.an_done = False

    def reset(self) -> None:
        self.regs = dict(_PHY_RESET)
        self._negotiate()

    @property
    def loopback(self) -> bool:
        return bool(self.regs[PHY_CTRL] & CTRL_LOOPBACK)

    @property
    def link_up(self) -> bool:
        return self.partner_up and (self.an_done or not self.regs[PHY_CTRL] & CTRL_AN_ENABLE)

    def set_partner(self, up: bool) -> None:
        self.partner_up = up
        self._negotiate()

    def _negotiate(self) -> None:
        """Autonegotiation completes at once with a capable partner."""
        up = self.partner_up
        self.an_done = up and bool(self.regs[PHY_CTRL] & CTRL_AN_ENABLE)
        status = _PHY_RESET[PHY_STATUS]
        if up:
            status |= STATUS_LINK
        if self.an_done:
            status |= STATUS_AN_DONE
        self.regs[PHY_STATUS] = status
        self.regs[PHY_ANLPAR] = _LP_ABILITY if self.an_done else 0
        self.regs[PHY_ANER] = 0x0001 if self.an_done else 0
        self.regs[PHY_1000T_STATUS] = _LP_1000T if self.an_done else 0
        self.regs[M88_SPEC_STATUS] = _M88_LINKED if up else 0

    def read(self, reg: int) -> int:
        """A register's value; unimplemented registers read 0."""
        return self.regs.get(reg, 0)

    def write(self, reg: int, value: int) -> None:
        value &= 0xFFFF
        if reg in _PHY_READ_ONLY or reg not in self.regs:
            return
        if reg == PHY_CTRL:
            if value & CTRL_RESET:
                self.reset()
                self.regs[PHY_CTRL] = (value & ~(CTRL_RESET | CTRL_AN_RESTART)) & 0xFFFF
                self._negotiate()
                return
            self.regs[PHY_CTRL] = value & ~CTRL_AN_RESTART  # self-clearing
            self._negotiate()
            return
        self.regs[reg] = value


# MDIC fields (SDM 13.4.7)
MDIC_OP_WRITE = 1 << 26
MDIC_OP_READ = 2 << 26
MDIC_READY = 1 << 28
MDIC_IE = 1 << 29
MDIC_ERROR = 1 << 30


def mdic_access(phy: Phy, value: int) -> int:
    """Carry out an MDIC write and return the register's new content: READY
    set, data filled for reads, ERROR for a PHY address other than 1 or an
    unknown opcode (as the 82540EM does: no PHY answers there)."""
    reg = value >> 16 & 0x1F
    addr = value >> 21 & 0x1F
    op = value & (3 << 26)
    result = (value & ~(MDIC_READY | MDIC_ERROR)) | MDIC_READY
    if addr != PHY_ADDR or op not in (MDIC_OP_READ, MDIC_OP_WRITE):
        return result | MDIC_ERROR
    if op == MDIC_OP_READ:
        return (result & ~0xFFFF) | phy.read(reg)
    phy.write(reg, value & 0xFFFF)
    return result
