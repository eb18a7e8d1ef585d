"""AHCI 1.3.1 register file of the ABAR (BAR5), each register declared once.

Generic host control (AHCI 3.1) at 0x00, port registers (3.3) at
0x100 + 0x80 * port, declared as 6-element arrays so a register's element
index is its port number.
"""

from __future__ import annotations

from xdevproto.pci import Access, Reg, RegisterLayout

MAX_PORTS = 6
ABAR_SIZE = 0x1000
PORT_BASE, PORT_STRIDE = 0x100, 0x80

# CAP (3.1.1): 64-bit addressing, NCQ, command list override, 3 Gb/s,
# AHCI-only, 32 command slots; NP is filled in per device.
CAP_S64A, CAP_SNCQ, CAP_SCLO, CAP_SAM = 1 << 31, 1 << 30, 1 << 24, 1 << 18
CAP_ISS_GEN2 = 2 << 20
NUM_SLOTS = 32
CAP_BASE = CAP_S64A | CAP_SNCQ | CAP_SCLO | CAP_SAM | CAP_ISS_GEN2 | (NUM_SLOTS - 1) << 8

GHC_HR, GHC_IE, GHC_AE = 1 << 0, 1 << 1, 1 << 31
AHCI_VERSION = 0x00010301

# PxIS bits (3.3.5)
IS_DHRS, IS_PSS, IS_DSS, IS_SDBS, IS_UFS, IS_DPS, IS_PCS = 1, 2, 4, 8, 16, 32, 64
IS_PRCS, IS_IFS, IS_HBDS, IS_HBFS, IS_TFES = 1 << 22, 1 << 27, 1 << 28, 1 << 29, 1 << 30
IS_RW1C = 0xFD8000AF  # PCS, PRCS and UFS are read-only reflections of PxSERR
IS_ERRORS = IS_TFES | IS_HBFS | IS_HBDS | IS_IFS

# PxCMD bits (3.3.7)
CMD_ST, CMD_SUD, CMD_POD, CMD_CLO, CMD_FRE = 1, 2, 4, 8, 16
CMD_FR, CMD_CR, CMD_ATAPI = 1 << 14, 1 << 15, 1 << 24
CMD_ICC_SHIFT = 28
CMD_WRITABLE = 0xF300001F & ~(CMD_SUD | CMD_POD)  # SUD/POD read 1: no staggered spin-up
CMD_CCS_SHIFT = 8

# PxSERR (3.3.12)
SERR_ERR_P = 1 << 10  # protocol error
SERR_DIAG_N, SERR_DIAG_H, SERR_DIAG_F, SERR_DIAG_X = 1 << 16, 1 << 22, 1 << 25, 1 << 26

SSTS_UP = 0x123  # DET 3 (device, phy up), SPD 2 (3 Gb/s), IPM 1 (active)
SSTS_DEVICE_NO_PHY = 0x001
SSTS_OFFLINE = 0x004

TFD_BSY, TFD_DRQ, TFD_ERR = 0x80, 0x08, 0x01


def _port(off: int, name: str, access: Access = Access.RW, **kw: object) -> Reg:
    return Reg(PORT_BASE + off, name, access, count=MAX_PORTS, stride=PORT_STRIDE,
               **kw)  # type: ignore[arg-type]


ABAR = RegisterLayout("ahci", ABAR_SIZE, [
    Reg(0x00, "CAP", Access.RO, reset=CAP_BASE, spec="AHCI 3.1.1"),  # + NP at reset
    Reg(0x04, "GHC", Access.RW, reset=GHC_AE, mask=GHC_HR | GHC_IE, spec="AHCI 3.1.2",
        on_write="write_ghc"),
    Reg(0x08, "IS", Access.RW1C, spec="AHCI 3.1.3", on_write="write_is"),
    Reg(0x0C, "PI", Access.RO, spec="AHCI 3.1.4"),  # set at reset
    Reg(0x10, "VS", Access.RO, reset=AHCI_VERSION, spec="AHCI 3.1.5"),
    # CCC (3.1.6-7), enclosure management (3.1.8-9): not implemented (CAP.CCCS, CAP.EMS 0)
    Reg(0x14, "CCC_CTL", Access.RO, spec="AHCI 3.1.6"),
    Reg(0x18, "CCC_PORTS", Access.RO, spec="AHCI 3.1.7"),
    Reg(0x1C, "EM_LOC", Access.RO, spec="AHCI 3.1.8"),
    Reg(0x20, "EM_CTL", Access.RO, spec="AHCI 3.1.9"),
    Reg(0x24, "CAP2", Access.RO, spec="AHCI 3.1.10"),
    # BIOS/OS handoff is absent (CAP2.BOH 0), so BOHC reads 0 (3.1.11)
    Reg(0x28, "BOHC", Access.RO, spec="AHCI 3.1.11"),
    _port(0x00, "PxCLB", mask=0xFFFFFC00, spec="AHCI 3.3.1"),
    _port(0x04, "PxCLBU", spec="AHCI 3.3.2"),
    _port(0x08, "PxFB", mask=0xFFFFFF00, spec="AHCI 3.3.3"),
    _port(0x0C, "PxFBU", spec="AHCI 3.3.4"),
    _port(0x10, "PxIS", Access.RW1C, mask=IS_RW1C, spec="AHCI 3.3.5", on_write="write_pxis"),
    _port(0x14, "PxIE", mask=0xFDC000FF, spec="AHCI 3.3.6", on_write="write_pxie"),
    _port(0x18, "PxCMD", reset=CMD_SUD | CMD_POD, mask=CMD_WRITABLE, spec="AHCI 3.3.7",
          on_write="write_pxcmd"),
    _port(0x20, "PxTFD", Access.RO, reset=0x7F, spec="AHCI 3.3.8"),
    _port(0x24, "PxSIG", Access.RO, reset=0xFFFFFFFF, spec="AHCI 3.3.9"),
    _port(0x28, "PxSSTS", Access.RO, spec="AHCI 3.3.10"),
    _port(0x2C, "PxSCTL", mask=0xFFF, spec="AHCI 3.3.11", on_write="write_pxsctl"),
    _port(0x30, "PxSERR", Access.RW1C, spec="AHCI 3.3.12", on_write="write_pxserr"),
    _port(0x34, "PxSACT", Access.RW1S, spec="AHCI 3.3.13", on_write="write_pxsact"),
    _port(0x38, "PxCI", Access.RW1S, spec="AHCI 3.3.14", on_write="write_pxci"),
    _port(0x3C, "PxSNTF", Access.RW1C, mask=0xFFFF, spec="AHCI 3.3.15"),
    _port(0x40, "PxFBS", Access.RO, spec="AHCI 3.3.16 (FIS-based switching not offered)"),
    _port(0x44, "PxDEVSLP", Access.RO, spec="AHCI 3.3.17 (DevSleep not offered)"),
])
