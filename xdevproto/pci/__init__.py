"""The PCI device framework: a PCI device is mostly declarations.

See docs/device-framework.md for a guide with a complete example.
"""

from .caps import MsiCap, MsixCap, PcieCap, PmCap
from .config import Bar, BarKind, Identity
from .device import PciDevice
from .dma import DmaError, GuestMemory, SgEntry
from .regs import Access, Reg, RegisterFile, RegisterLayout, block

__all__ = [
    "Access", "Bar", "BarKind", "DmaError", "GuestMemory", "Identity", "MsiCap", "MsixCap",
    "PciDevice", "PcieCap", "PmCap", "Reg", "RegisterFile", "RegisterLayout", "SgEntry", "block",
]
