"""The 82540EM register file, each register declared once (8254x SDM ch. 13),
as an ``xdevproto.pci`` register layout for BAR0.

Each :class:`~xdevproto.pci.Reg` gives offset, name, access kind, reset
value, writable mask and the SDM section; a register whose access has a side
effect names the :class:`~servers.e1000.device.E1000Device` method that
carries it out. Everything not declared reads 0 and ignores writes, as the
reserved space of the real part does.
"""

from __future__ import annotations

from xdevproto.pci import Access, Reg, RegisterLayout

BAR0_SIZE = 0x20000

# Offsets used by code (SDM table 13-2).
CTRL, STATUS, EECD, EERD, CTRL_EXT, MDIC = 0x0000, 0x0008, 0x0010, 0x0014, 0x0018, 0x0020
FCAL, FCAH, FCT, VET = 0x0028, 0x002C, 0x0030, 0x0038
ICR, ITR, ICS, IMS, IMC = 0x00C0, 0x00C4, 0x00C8, 0x00D0, 0x00D8
RCTL, FCTTV, TXCW, RXCW, TCTL, TIPG = 0x0100, 0x0170, 0x0178, 0x0180, 0x0400, 0x0410
LEDCTL, PBA, FCRTL, FCRTH = 0x0E00, 0x1000, 0x2160, 0x2168
RDBAL, RDBAH, RDLEN, RDH, RDT, RDTR, RXDCTL, RADV, RSRPD = (
    0x2800, 0x2804, 0x2808, 0x2810, 0x2818, 0x2820, 0x2828, 0x282C, 0x2C00)
TXDMAC, TDBAL, TDBAH, TDLEN, TDH, TDT, TIDV, TXDCTL, TADV, TSPMT = (
    0x3000, 0x3800, 0x3804, 0x3808, 0x3810, 0x3818, 0x3820, 0x3828, 0x382C, 0x3830)
RXCSUM, MTA, RAL, VFTA = 0x5000, 0x5200, 0x5400, 0x5600
WUC, WUFC, WUS, MANC = 0x5800, 0x5808, 0x5810, 0x5820

# Statistics (SDM 13.7): all clear on read; 64-bit pairs clear when the high half is read.
STATS = {
    "CRCERRS": 0x4000, "ALGNERRC": 0x4004, "SYMERRS": 0x4008, "RXERRC": 0x400C,
    "MPC": 0x4010, "SCC": 0x4014, "ECOL": 0x4018, "MCC": 0x401C, "LATECOL": 0x4020,
    "COLC": 0x4028, "DC": 0x4030, "TNCRS": 0x4034, "SEC": 0x4038, "CEXTERR": 0x403C,
    "RLEC": 0x4040, "XONRXC": 0x4048, "XONTXC": 0x404C, "XOFFRXC": 0x4050,
    "XOFFTXC": 0x4054, "FCRUC": 0x4058, "PRC64": 0x405C, "PRC127": 0x4060,
    "PRC255": 0x4064, "PRC511": 0x4068, "PRC1023": 0x406C, "PRC1522": 0x4070,
    "GPRC": 0x4074, "BPRC": 0x4078, "MPRC": 0x407C, "GPTC": 0x4080, "GORCL": 0x4088,
    "GORCH": 0x408C, "GOTCL": 0x4090, "GOTCH": 0x4094, "RNBC": 0x40A0, "RUC": 0x40A4,
    "RFC": 0x40A8, "ROC": 0x40AC, "RJC": 0x40B0, "MGTPRC": 0x40B4, "MGTPDC": 0x40B8,
    "MGTPTC": 0x40BC, "TORL": 0x40C0, "TORH": 0x40C4, "TOTL": 0x40C8, "TOTH": 0x40CC,
    "TPR": 0x40D0, "TPT": 0x40D4, "PTC64": 0x40D8, "PTC127": 0x40DC, "PTC255": 0x40E0,
    "PTC511": 0x40E4, "PTC1023": 0x40E8, "PTC1522": 0x40EC, "MPTC": 0x40F0,
    "BPTC": 0x40F4, "TSCTC": 0x40F8, "TSCTFC": 0x40FC,
}
STAT_PAIRS = {"GORCH": "GORCL", "GOTCH": "GOTCL", "TORH": "TORL", "TOTH": "TOTL"}

# CTRL (13.4.1)
CTRL_SLU = 1 << 6
CTRL_RST = 1 << 26
CTRL_VME = 1 << 30
CTRL_PHY_RST = 1 << 31
# STATUS (13.4.2)
STATUS_FD, STATUS_LU, STATUS_SPEED_1000, STATUS_ASDV_1000 = 0x1, 0x2, 0x80, 0x200
# CTRL_EXT (13.4.6)
CTRL_EXT_EE_RST = 1 << 13
# ICR causes (13.4.17)
ICR_TXDW, ICR_TXQE, ICR_LSC, ICR_RXSEQ, ICR_RXDMT0 = 0x01, 0x02, 0x04, 0x08, 0x10
ICR_RXO, ICR_RXT0, ICR_MDAC, ICR_TXD_LOW, ICR_SRPD = 0x40, 0x80, 0x200, 0x8000, 0x10000
ICR_INT_ASSERTED = 1 << 31
ICR_CAUSES = 0x0001F6DF
# RCTL (13.4.22)
RCTL_EN, RCTL_SBP, RCTL_LPE = 1 << 1, 1 << 2, 1 << 5
RCTL_LBM_MAC = 3 << 6
RCTL_BSEX = 1 << 25
RCTL_SECRC = 1 << 26  # strip the Ethernet CRC (else it is stored and counted in the length)
# TCTL (13.4.33)
TCTL_EN, TCTL_PSP = 1 << 1, 1 << 3
# RAH (13.4.63)
RAH_AV = 1 << 31
# RDTR (13.4.30)
RDTR_FPD = 1 << 31


def _regs() -> list[Reg]:
    causes = ICR_CAUSES
    r = [
        Reg(CTRL, "CTRL", reset=0x00140240,  # SWDPIN2|SWDPIN0|SPEED 1000|SLU
            spec="13.4.1", on_write="write_ctrl"),
        Reg(STATUS, "STATUS", Access.RO, spec="13.4.2", on_read="read_status"),
        Reg(EECD, "EECD", spec="13.4.3", on_read="read_eecd", on_write="write_eecd"),
        Reg(EERD, "EERD", spec="13.4.4", on_write="write_eerd"),
        Reg(CTRL_EXT, "CTRL_EXT", mask=0x00F0FFFF & ~CTRL_EXT_EE_RST, spec="13.4.6",
            on_write="write_ctrl_ext"),
        Reg(0x001C, "FLA", spec="13.4.5"),
        Reg(MDIC, "MDIC", spec="13.4.7", on_write="write_mdic"),
        Reg(FCAL, "FCAL", reset=0x00C28001, spec="13.4.8"),
        Reg(FCAH, "FCAH", reset=0x0100, mask=0xFFFF, spec="13.4.9"),
        Reg(FCT, "FCT", reset=0x8808, mask=0xFFFF, spec="13.4.10"),
        Reg(VET, "VET", reset=0x8100, mask=0xFFFF, spec="13.4.11", on_write="filter_changed"),
        Reg(FCTTV, "FCTTV", mask=0xFFFF, spec="13.4.12"),
        Reg(TXCW, "TXCW", spec="13.4.13"),
        Reg(RXCW, "RXCW", Access.RO, spec="13.4.14"),
        Reg(LEDCTL, "LEDCTL", reset=0x07068302, spec="13.4.15"),
        Reg(PBA, "PBA", reset=0x00100030, mask=0xFFFF, spec="13.4.16"),
        # ICR: every read clears it on the 82540 (the hook does, so the line
        # drops with it); writing 1s clears causes too.
        Reg(ICR, "ICR", Access.RW1C, mask=causes, spec="13.4.17", on_read="read_icr",
            on_write="update_irq"),
        Reg(ITR, "ITR", mask=0xFFFF, spec="13.4.18", on_write="update_irq"),
        Reg(ICS, "ICS", mask=causes, spec="13.4.19", on_read="read_ics", on_write="write_ics"),
        Reg(IMS, "IMS", Access.RW1S, mask=causes, spec="13.4.20", on_write="update_irq"),
        Reg(IMC, "IMC", Access.WO, mask=causes, spec="13.4.21", on_write="write_imc"),
        Reg(RCTL, "RCTL", mask=0x07FFFFFE, spec="13.4.22", on_write="filter_changed"),
        Reg(FCRTL, "FCRTL", mask=0x8000FFF8, spec="13.4.23"),
        Reg(FCRTH, "FCRTH", mask=0xFFF8, spec="13.4.24"),
        Reg(RDBAL, "RDBAL", mask=0xFFFFFFF0, spec="13.4.25", on_write="rx_ring_changed"),
        Reg(RDBAH, "RDBAH", spec="13.4.26", on_write="rx_ring_changed"),
        Reg(RDLEN, "RDLEN", mask=0x000FFF80, spec="13.4.27", on_write="rx_ring_changed"),
        Reg(RDH, "RDH", mask=0xFFFF, spec="13.4.28", on_write="rx_ring_changed"),
        Reg(RDT, "RDT", mask=0xFFFF, spec="13.4.29"),
        Reg(RDTR, "RDTR", mask=0xFFFF, spec="13.4.30", on_write="write_rdtr"),
        Reg(RXDCTL, "RXDCTL", reset=0x00010000, mask=0x013F3F3F, spec="13.4.31"),
        Reg(RADV, "RADV", mask=0xFFFF, spec="13.4.32"),
        Reg(RSRPD, "RSRPD", mask=0xFFF, spec="13.4.33"),
        Reg(TCTL, "TCTL", reset=0x00000008, mask=0x03FFFFFA, spec="13.4.33",
            on_write="write_tctl"),
        Reg(TIPG, "TIPG", reset=0x00602008, mask=0x3FFFFFFF, spec="13.4.34"),
        Reg(0x0458, "AIFS", mask=0xFFFF, spec="13.4.35"),
        Reg(TXDMAC, "TXDMAC", reset=1, mask=1, spec="13.4.39"),
        Reg(TDBAL, "TDBAL", mask=0xFFFFFFF0, spec="13.4.40"),
        Reg(TDBAH, "TDBAH", spec="13.4.41"),
        Reg(TDLEN, "TDLEN", mask=0x000FFF80, spec="13.4.42"),
        Reg(TDH, "TDH", mask=0xFFFF, spec="13.4.43"),
        Reg(TDT, "TDT", mask=0xFFFF, spec="13.4.44", on_write="write_tdt"),
        Reg(TIDV, "TIDV", mask=0xFFFF, spec="13.4.45"),
        Reg(TXDCTL, "TXDCTL", reset=0x00010000, mask=0x013F3F3F, spec="13.4.46"),
        Reg(TADV, "TADV", mask=0xFFFF, spec="13.4.47"),
        Reg(TSPMT, "TSPMT", reset=0x01000400, spec="13.4.48"),
        Reg(RXCSUM, "RXCSUM", reset=0x0300, mask=0x03FF, spec="13.4.49"),
        Reg(WUC, "WUC", spec="13.6.1"),
        Reg(WUFC, "WUFC", spec="13.6.2"),
        Reg(WUS, "WUS", spec="13.6.3"),
        Reg(MANC, "MANC", spec="13.6.5"),
        Reg(MTA, "MTA", count=128, spec="13.5.1", on_write="filter_changed"),
        Reg(RAL, "RAL", count=16, stride=8, spec="13.5.2", on_write="filter_changed"),
        Reg(RAL + 4, "RAH", count=16, stride=8, mask=0x8003FFFF, spec="13.5.3",
            on_write="filter_changed"),
        Reg(VFTA, "VFTA", count=128, spec="13.5.4", on_write="filter_changed"),
    ]
    lows = set(STAT_PAIRS.values())
    r += [Reg(off, name, Access.RO if name in lows else Access.RC, spec="13.7",
              on_read=f"read_{name.lower()}" if name in STAT_PAIRS else None)
          for name, off in STATS.items()]
    return r


LAYOUT = RegisterLayout("e1000", BAR0_SIZE, _regs())
