"""Interrupt delivery into the guest: INTx levels and MSI messages.

* INTx: ``xendevicemodel_set_pci_intx_level(seg, bus, dev, intx, level)``;
  Xen routes it to GSI ``((dev*4 + dev/8 + intx) & 31) + 16``
  (hvm_pci_intx_gsi, xen/arch/x86/include/asm/hvm/irq.h).  The level is
  kept here so repeated asserts are not re-sent and a deassert after a
  device server dies can drop every line it held (:meth:`Interrupts.release`).
* MSI / MSI-X: ``xendevicemodel_inject_msi(addr, data)`` with the address
  and data the guest programmed; the address must lie in the x86 interrupt
  window 0xFEE00000-0xFEEFFFFF (Intel SDM vol. 3, 11.11.1) or Xen would
  reject it anyway.
"""

from __future__ import annotations

from bridge.xen.backend import XenBackend
from bridge.xen.errors import GuestError

MSI_WINDOW = (0xFEE00000, 0xFEEFFFFF)


def intx_gsi(device: int, intx: int) -> int:
    """The GSI Xen routes ``device``'s INT(A+intx)# to (hvm_pci_intx_gsi)."""
    return ((device * 4 + device // 8 + intx) & 31) + 16


class Interrupts:
    """INTx and MSI for one guest."""

    def __init__(self, xen: XenBackend, domid: int) -> None:
        self._xen = xen
        self._domid = domid
        self._levels: dict[tuple[int, int, int, int], int] = {}

    def set_pci_intx_level(self, segment: int, bus: int, device: int, intx: int,
                           level: int) -> None:
        """Drive INT(A+``intx``)# of ``segment:bus:device`` to ``level`` (0 or 1)."""
        if not (0 <= segment <= 0xFFFF and 0 <= bus <= 0xFF and 0 <= device <= 0x1F
                and 0 <= intx <= 3 and level in (0, 1)):
            raise ValueError(f"bad INTx {segment:#x}:{bus:#x}:{device:#x} pin {intx} "
                             f"level {level}")
        key = (segment, bus, device, intx)
        if self._levels.get(key, 0) == level:
            return
        self._xen.set_pci_intx_level(self._domid, segment, bus, device, intx, level)
        self._levels[key] = level

    def level(self, segment: int, bus: int, device: int, intx: int) -> int:
        return self._levels.get((segment, bus, device, intx), 0)

    def release(self, segment: int, bus: int, device: int) -> None:
        """Deassert every line ``device`` holds (its server went away or was reset)."""
        for seg, b, dev, pin in list(self._levels):
            if (seg, b, dev) == (segment, bus, device):
                self.set_pci_intx_level(seg, b, dev, pin, 0)

    def inject_msi(self, addr: int, data: int) -> None:
        """Deliver one MSI/MSI-X message exactly as the guest programmed it.

        The values come from the guest, so a bad one raises :class:`GuestError`
        (the core logs it and drops the message, as hardware would misroute it).
        """
        if not MSI_WINDOW[0] <= addr <= MSI_WINDOW[1]:
            raise GuestError(f"MSI address {addr:#x} outside the interrupt window")
        if not 0 <= data <= 0xFFFFFFFF:
            raise GuestError(f"MSI data {data:#x} wider than 32 bits")
        self._xen.inject_msi(self._domid, addr, data)
