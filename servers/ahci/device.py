"""The AHCI controller as a PCI function: an Intel ICH9 SATA controller in AHCI mode.

PCI identity 8086:2922, class 01/06/01 (mass storage, SATA, AHCI 1.0),
ABAR in BAR5, MSI (one vector) plus INTA#. The HBA registers are declared
in :mod:`.regs`; this module holds the HBA-wide semantics (GHC.HR, IS
aggregation, the interrupt line) and routes port registers to
:class:`~.port.Port`.

Interrupts (AHCI 1.3.1 5.5.4, 10.7.2): a port's PxIS bit enabled in PxIE sets
the port's IS bit; the line is GHC.IE and any IS bit. INTx follows that level;
MSI sends one message per port event.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from xdevproto.errors import DeviceError
from xdevproto.pci import Bar, Identity, MsiCap, PciDevice, PmCap
from xdevproto.pci.migration import Reader
from xdevproto.wire import IrqIndex

from . import regs as R
from .ata import AtaDisk
from .atapi import AtapiCdrom, Sense
from .port import Drive, Port

ICH9_AHCI = Identity(vendor_id=0x8086, device_id=0x2922, class_code=0x010601, revision=0x02,
                     subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)

_STATE_VERSION = 1


class AhciDevice(PciDevice):
    identity = ICH9_AHCI
    bars = (Bar(5, R.ABAR_SIZE, regs=R.ABAR),)
    capabilities = (MsiCap(1, addr64=True), PmCap())
    workers = 32  # NCQ: 32 commands of one port really run at once

    def __init__(self, drives: Sequence[Drive | None]) -> None:
        if not 1 <= len(drives) <= R.MAX_PORTS:
            raise ValueError(f"an AHCI controller has 1 to {R.MAX_PORTS} ports, not {len(drives)}")
        super().__init__()
        self.abar = self.regs(5)
        self.ports = [Port(self, i, d) for i, d in enumerate(drives)]
        # The registers of ports past the last are reserved (AHCI 3.3).
        self.reserve(5, R.PORT_BASE + R.PORT_STRIDE * len(self.ports),
                     R.PORT_BASE + R.PORT_STRIDE * R.MAX_PORTS)
        self.device_reset()

    def close(self) -> None:
        """Finish running work, make every completed write durable, close the images."""
        self.work.shutdown()
        for port in self.ports:
            drive = port.drive
            disk = drive.disk if drive is not None else None
            if disk is not None:
                try:
                    disk.flush()
                except OSError as exc:
                    self.log.error("flushing %s: %s", disk.path, exc)
                disk.close()

    # -- HBA registers (AHCI 3.1) ------------------------------------------------------
    def write_ghc(self, index: int, value: int, old: int) -> None:
        if value & R.GHC_HR:
            self.hba_reset()
        self.update_irq(event=False)

    def write_is(self, index: int, value: int, old: int) -> None:
        # a port whose enabled causes are still set keeps its IS bit (level semantics)
        is_ = self.abar["IS"]
        for port in self.ports:
            if port.get("PxIS") & port.get("PxIE"):
                is_ |= 1 << port.i
        self.abar["IS"] = is_
        self.update_irq(event=False)

    def hba_reset(self) -> None:
        """GHC.HR (10.4.3): every port and register back to reset; HR reads 0 at once.

        Work still running belongs to an older generation and completes into
        nothing, so the reset never waits for disk I/O or guest memory.
        """
        self.log.info("HBA reset")
        for port in self.ports:
            port.abort_all()
        self.abar.reset()
        self.device_reset()

    def device_reset(self) -> None:
        """After DEVICE_RESET/FLR or GHC.HR: ports come up with their signatures."""
        for port in self.ports:
            port.gen += 1
            port.queue.clear()
            port.halted = port.srst = False
            port.link_up()
        self.abar["IS"] = 0  # link-up causes interrupt nobody until PxIE enables them
        # What this HBA has: CAP.NP (ports - 1) and one PI bit per port (3.1.1, 3.1.4).
        self.abar["CAP"] = R.CAP_BASE | (len(self.ports) - 1)
        self.abar["PI"] = (1 << len(self.ports)) - 1
        self.intr.lower(0)

    # -- port registers (AHCI 3.3) -----------------------------------------------------
    def _port(self, index: int) -> Port | None:
        return self.ports[index] if index < len(self.ports) else None

    def write_pxis(self, index: int, value: int, old: int) -> None:
        if (port := self._port(index)) is not None:
            port.sync_serr_bits()
        self.update_irq(event=False)

    def write_pxie(self, index: int, value: int, old: int) -> None:
        if (port := self._port(index)) is not None and port.get("PxIS") & port.get("PxIE"):
            self.port_interrupt(index)

    def write_pxcmd(self, index: int, value: int, old: int) -> None:
        if (port := self._port(index)) is None:
            self.abar["PxCMD", index] = old
            return
        port.command_written(value, old)

    def write_pxsctl(self, index: int, value: int, old: int) -> None:
        if (port := self._port(index)) is None:
            return
        det, old_det = value & 0xF, old & 0xF
        if det == 1 and old_det != 1:
            port.link_down()
        elif det == 0 and old_det == 1:
            port.link_up()
        elif det == 4:
            port.abort_all()
            port.set("PxSSTS", R.SSTS_OFFLINE)

    def write_pxserr(self, index: int, value: int, old: int) -> None:
        if (port := self._port(index)) is not None:
            port.sync_serr_bits()
        self.update_irq(event=False)

    def write_pxsact(self, index: int, value: int, old: int) -> None:
        port = self._port(index)
        if port is None or not port.get("PxCMD") & R.CMD_ST:
            self.abar["PxSACT", index] = old  # only a running port takes tags (3.3.13)

    def write_pxci(self, index: int, value: int, old: int) -> None:
        port = self._port(index)
        if port is None or not port.get("PxCMD") & R.CMD_ST or port.halted:
            self.abar["PxCI", index] = old  # 3.3.14: ignored unless ST is set
            return
        port.issue(value & ~old)

    # -- migration: state beyond the registers ------------------------------------------
    def save_state(self) -> bytes:
        """Per port: halt/SRST flags and the drive's settings (work was drained by STOP)."""
        out = bytearray((_STATE_VERSION, len(self.ports)))
        for port in self.ports:
            out += bytes((port.halted | port.srst << 1,))
            drive = port.drive
            if isinstance(drive, AtaDisk):
                log = drive.ncq_error_log()
                out += bytes((1, drive.disk.write_cache, drive.udma_mode, drive.standby))
                out += len(log).to_bytes(2, "little") + log
            elif isinstance(drive, AtapiCdrom):
                out += bytes((2, drive.sense.key, drive.sense.asc, drive.sense.ascq))
            else:
                out += b"\0"
        return bytes(out)

    def load_state(self, data: bytes) -> None:
        """Restore :meth:`save_state` bytes, every field checked (CVE-2013-4526 pattern)."""
        r = Reader(data)
        if r.u8() != _STATE_VERSION or r.u8() != len(self.ports):
            raise DeviceError("AHCI state: wrong version or port count", errno.EINVAL)
        staged: list[tuple[Port, int, tuple[int, ...], bytes]] = []
        for port in self.ports:
            flags, kind = r.u8(), r.u8()
            if flags > 3:
                raise DeviceError("AHCI state: bad port flags", errno.EINVAL)
            drive = port.drive
            expect = 1 if isinstance(drive, AtaDisk) else 2 if isinstance(drive, AtapiCdrom) else 0
            if kind != expect:
                raise DeviceError(f"AHCI state: port {port.i} drive differs", errno.EINVAL)
            fields: tuple[int, ...] = ()
            log = b""
            if kind == 1:
                fields = (r.u8(), r.u8(), r.u8())
                if fields[0] > 1 or fields[1] > 6 or fields[2] > 1:
                    raise DeviceError("AHCI state: bad disk settings", errno.EINVAL)
                log = r.take(r.u16())
                if len(log) not in (0, 512):
                    raise DeviceError("AHCI state: bad NCQ error log", errno.EINVAL)
            elif kind == 2:
                fields = (r.u8(), r.u8(), r.u8())
                if fields[0] > 0xF:
                    raise DeviceError("AHCI state: bad sense key", errno.EINVAL)
            staged.append((port, flags, fields, log))
        r.end()
        for port, flags, fields, log in staged:  # nothing changes unless all of it is valid
            port.gen += 1
            port.queue.clear()
            port.halted, port.srst = bool(flags & 1), bool(flags & 2)
            drive = port.drive
            if isinstance(drive, AtaDisk):
                drive.disk.write_cache, drive.udma_mode = bool(fields[0]), fields[1]
                drive.standby = bool(fields[2])
                drive.restore_ncq_error_log(log)
            elif isinstance(drive, AtapiCdrom):
                drive.sense = Sense(*fields)

    # -- interrupts ----------------------------------------------------------------------
    def port_interrupt(self, index: int) -> None:
        port = self.ports[index]
        if port.get("PxIS") & port.get("PxIE"):
            self.abar["IS"] = self.abar["IS"] | 1 << index
            self.update_irq(event=True)

    def update_irq(self, event: bool) -> None:
        level = bool(self.abar["GHC"] & R.GHC_IE and self.abar["IS"])
        if not level:
            self.intr.lower(0)
        elif event or self.intr.mode() is IrqIndex.INTX:
            self.intr.raise_(0)


__all__ = ["ICH9_AHCI", "AhciDevice", "AtaDisk", "AtapiCdrom"]
