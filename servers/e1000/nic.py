"""The 82540EM behind its registers: register semantics, interrupts with
moderation, link state and reset (8254x SDM ch. 13, 3.4 "Interrupts"). The
transmit and receive engines live in :mod:`.tx` and :mod:`.rx`.

Nothing here knows vfio-user: guest memory is a :class:`Dma` (read/write at
guest addresses, raising :class:`~xdevproto.errors.DeviceError` for
addresses the device may not reach), the interrupt line is a callable
taking the level, time comes from :class:`~.timers.Timers`, frames leave
through ``send``. One lock serialises register accesses, frames arriving
from the back end thread and timer callbacks.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Protocol

from . import regs as R
from .eeprom import Eeprom, Phy, eeprom_image, mdic_access
from .packet import BROADCAST, RxFilter, size_bucket
from .regs import REGISTERS, STAT_PAIRS, STATS, Access
from .rx import Receiver
from .timers import Timers
from .tx import Transmitter

log = logging.getLogger(__name__)

BAR0_SIZE = 0x20000
IO_SIZE = 0x40
ITR_UNIT = 256e-9  # ITR counts 256 ns (SDM 13.4.18)
DELAY_UNIT = 1.024e-6  # RDTR/RADV/TIDV/TADV count 1.024 us (SDM 13.4.30)
_RX_COUNTERS = ("GPRC", "TPR", "GORCL", "TORL", "BPRC", "MPRC", "PRC")
_TX_COUNTERS = ("GPTC", "TPT", "GOTCL", "TOTL", "BPTC", "MPTC", "PTC")


class Dma(Protocol):
    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...


class E1000:
    def __init__(self, mac: bytes, *, dma: Dma, send: Callable[[bytes], None],
                 set_irq: Callable[[bool], None], timers: Timers) -> None:
        self.mac = bytes(mac)
        self.dma = dma
        self.send = send
        self.set_irq = set_irq
        self.timers = timers
        self.lock = threading.RLock()
        self.eeprom = Eeprom(eeprom_image(self.mac))
        self.phy = Phy()
        self.regs: dict[int, int] = {}
        self.irq_level = False
        self._last_irq = -1e9
        self._filter: RxFilter | None = None
        self.io_addr = 0
        self.tx = Transmitter(self)
        self.rx = Receiver(self)
        self._reset_registers()

    # -- reset (SDM 13.4.1 CTRL.RST; 14.3 "Software reset") -----------------------
    def _reset_registers(self) -> None:
        self.regs = {off: reg.reset for off, reg in REGISTERS.items()}
        self.icr = 0
        self.ims = 0
        self.eeprom.eecd = 0
        self._load_mac()
        self.tx.reset()
        self.rx.reset()
        for key in ("itr", "rdtr", "radv", "tidv", "tadv"):
            self.timers.cancel(key)
        self._filter = None
        self._set_level(False)

    def _load_mac(self) -> None:
        """The MAC from EEPROM words 0-2 into RAL0/RAH0 with AV (SDM 5.6.1)."""
        mac = struct.pack("<3H", *self.eeprom.words[0:3])
        self.regs[R.RAL] = struct.unpack("<I", mac[:4])[0]
        self.regs[R.RAL + 4] = struct.unpack("<H", mac[4:])[0] | R.RAH_AV
        self._filter = None

    def reset(self) -> None:
        """Device (function-level) reset: registers, PHY and engines."""
        with self.lock:
            self._reset_registers()
            self.phy.reset()

    # -- register access -------------------------------------------------------------
    def read(self, offset: int, size: int = 4) -> int:
        """A guest read of ``size`` bytes of BAR0 at ``offset``."""
        base = offset & ~3
        with self.lock:
            value = self._read32(base)
        shift = (offset - base) * 8
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, value: int, size: int = 4) -> None:
        base = offset & ~3
        with self.lock:
            if size != 4 or offset != base:
                # A narrow write merges into the stored value without read side effects.
                shift = (offset - base) * 8
                mask = ((1 << (8 * size)) - 1) << shift
                value = (self.regs.get(base, 0) & ~mask) | ((value << shift) & mask)
            self._write32(base, value & 0xFFFFFFFF)

    def _read32(self, off: int) -> int:
        reg = REGISTERS.get(off)
        if reg is None or reg.access is Access.WO:
            return 0
        if reg.on_read is not None:
            return int(getattr(self, reg.on_read)(off))
        value = self.regs[off]
        if reg.access is Access.RC:
            self.regs[off] = 0
        return value

    def _write32(self, off: int, value: int) -> None:
        reg = REGISTERS.get(off)
        if reg is None:
            log.debug("write %#x to unimplemented register %#x ignored", value, off)
            return
        if reg.access in (Access.RO, Access.RC) and reg.on_write is None:
            return
        old = self.regs.get(off, 0)
        self.regs[off] = value & reg.mask
        if reg.on_write is not None:
            getattr(self, reg.on_write)(off, value, old)

    # -- side effects named by regs.py ---------------------------------------------------
    def write_ctrl(self, off: int, value: int, old: int) -> None:
        if value & R.CTRL_RST:
            log.info("CTRL.RST: device reset")
            self._reset_registers()
            self.phy.reset()
            self.link_changed()
            return
        if (value ^ old) & (R.CTRL_PHY_RST | R.CTRL_SLU):
            if value & R.CTRL_PHY_RST and not old & R.CTRL_PHY_RST:
                self.phy.reset()
            self.link_changed()

    def read_status(self, off: int) -> int:
        status = R.STATUS_SPEED_1000 | R.STATUS_ASDV_1000 | R.STATUS_FD
        if self.link_up:
            status |= R.STATUS_LU
        return status

    @property
    def link_up(self) -> bool:
        return self.phy.link_up and not self.regs[R.CTRL] & R.CTRL_PHY_RST

    def read_eecd(self, off: int) -> int:
        return self.eeprom.read_eecd()

    def write_eecd(self, off: int, value: int, old: int) -> None:
        self.eeprom.write_eecd(value)

    def write_eerd(self, off: int, value: int, old: int) -> None:
        self.regs[off] = self.eeprom.eerd(value)

    def write_ctrl_ext(self, off: int, value: int, old: int) -> None:
        if value & R.CTRL_EXT_EE_RST:
            self._load_mac()

    def write_mdic(self, off: int, value: int, old: int) -> None:
        was_up = self.link_up
        self.regs[off] = mdic_access(self.phy, value)
        if self.link_up != was_up:
            self.link_changed()
        if value & (1 << 29):  # MDIC.I: interrupt on completion
            self.raise_cause(R.ICR_MDAC)

    def filter_changed(self, off: int, value: int, old: int) -> None:
        self._filter = None

    # -- interrupts (SDM 3.4, 13.4.17-13.4.21) ---------------------------------------
    def read_icr(self, off: int) -> int:
        value = self.icr
        if value & self.ims:
            value |= R.ICR_INT_ASSERTED
        self.icr = 0  # the 82540 clears ICR on every read
        self.update_irq()
        return value

    def write_icr(self, off: int, value: int, old: int) -> None:
        self.icr &= ~value
        self.update_irq()

    def read_ics(self, off: int) -> int:
        # Real parts read ICR's value here without clearing it; VxWorks relies on it.
        return self.icr

    def write_ics(self, off: int, value: int, old: int) -> None:
        self.raise_cause(value & R.ICR_CAUSES)

    def write_ims(self, off: int, value: int, old: int) -> None:
        self.ims |= value & R.ICR_CAUSES
        self.regs[off] = self.ims
        self.update_irq()

    def write_imc(self, off: int, value: int, old: int) -> None:
        self.ims &= ~value
        self.regs[R.IMS] = self.ims
        self.update_irq()

    def raise_cause(self, bits: int) -> None:
        self.icr |= bits
        self.update_irq()

    def update_irq(self, *_: object) -> None:
        """Drive the line from ICR & IMS, holding back a new assertion until
        ITR intervals have passed since the last (SDM 3.4.2 throttling)."""
        pending = bool(self.icr & self.ims)
        if not pending:
            self.timers.cancel("itr")
            self._set_level(False)
            return
        if self.irq_level:
            return
        interval = (self.regs[R.ITR] & 0xFFFF) * ITR_UNIT
        wait = self._last_irq + interval - self.timers.now()
        if interval and wait > 0:
            if not self.timers.armed("itr"):
                self.timers.arm("itr", wait, self._itr_expired)
            return
        self._last_irq = self.timers.now()
        self._set_level(True)

    def _itr_expired(self) -> None:
        with self.lock:
            self.update_irq()

    def _set_level(self, level: bool) -> None:
        if level != self.irq_level:
            self.irq_level = level
            self.set_irq(level)

    def delayed_cause(self, cause: int, delay_key: str, abs_key: str, delay: int,
                      absolute: int) -> None:
        """Post ``cause`` after the packet delay timer (re-armed by every
        event) or the absolute timer (armed by the first), whichever expires
        first; with no delay, at once (SDM 3.4.3 RDTR/RADV, 3.4.4 TIDV/TADV)."""
        if delay == 0:
            self.timers.cancel(delay_key)
            self.timers.cancel(abs_key)
            self.raise_cause(cause)
            return

        def fire() -> None:
            with self.lock:
                self.timers.cancel(delay_key)
                self.timers.cancel(abs_key)
                self.raise_cause(cause)

        self.timers.arm(delay_key, delay * DELAY_UNIT, fire)
        if absolute and not self.timers.armed(abs_key):
            self.timers.arm(abs_key, absolute * DELAY_UNIT, fire)

    def write_rdtr(self, off: int, value: int, old: int) -> None:
        if value & R.RDTR_FPD and self.timers.armed("rdtr"):
            # Flush Partial Descriptor: report what is pending now.
            self.timers.cancel("rdtr")
            self.timers.cancel("radv")
            self.raise_cause(R.ICR_RXT0)

    # -- engines ------------------------------------------------------------------------
    def write_tdt(self, off: int, value: int, old: int) -> None:
        self.tx.kick()

    def write_tctl(self, off: int, value: int, old: int) -> None:
        if value & R.TCTL_EN:
            self.tx.kick()

    def write_rdt(self, off: int, value: int, old: int) -> None:
        pass

    def rx_filter(self) -> RxFilter:
        if self._filter is None:
            exact = set()
            for i in range(16):
                rah = self.regs[R.RAL + 8 * i + 4]
                if rah & R.RAH_AV:
                    exact.add(struct.pack("<IH", self.regs[R.RAL + 8 * i], rah & 0xFFFF))
            self._filter = RxFilter(
                frozenset(exact),
                tuple(self.regs[R.MTA + 4 * i] for i in range(128)),
                tuple(self.regs[R.VFTA + 4 * i] for i in range(128)),
                self.regs[R.RCTL], self.regs[R.VET] & 0xFFFF)
        return self._filter

    def receive(self, frame: bytes) -> bool:
        """A frame from the wire (back end thread); False if dropped."""
        with self.lock:
            return self.rx.receive(frame)

    def set_partner(self, up: bool) -> None:
        """The back end's link went up or down."""
        with self.lock:
            was = self.link_up
            self.phy.set_partner(up)
            if self.link_up != was:
                self.link_changed()

    def link_changed(self) -> None:
        self.raise_cause(R.ICR_LSC)

    # -- statistics (SDM 13.7) ---------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        off = STATS[name]
        self.regs[off] = min(self.regs[off] + n, 0xFFFFFFFF)  # counters stick at max

    def count64(self, low: str, n: int) -> None:
        lo, hi = STATS[low], STATS[low[:-1] + "H"]
        total = min((self.regs[hi] << 32 | self.regs[lo]) + n, (1 << 64) - 1)
        self.regs[lo], self.regs[hi] = total & 0xFFFFFFFF, total >> 32

    def count_frame(self, rx: bool, frame: bytes) -> None:
        """The per-frame counters of one direction: good/total packets and
        octets (with FCS), broadcast/multicast, size bucket (SDM 13.7)."""
        size = len(frame) + 4
        names = _RX_COUNTERS if rx else _TX_COUNTERS
        for name in names[:2]:
            self.count(name)
        for name in names[2:4]:
            self.count64(name, size)
        if frame[0] & 1:
            self.count(names[4] if frame[:6] == BROADCAST else names[5])
        self.count(size_bucket(names[6], size))

    def read_stat_pair(self, off: int) -> int:
        """Reading the high half of a 64-bit counter clears both halves."""
        value = self.regs[off]
        name = next(n for n, o in STATS.items() if o == off)
        self.regs[off] = 0
        self.regs[STATS[STAT_PAIRS[name]]] = 0
        return value

    def stat(self, name: str) -> int:
        """A counter's value without clearing it (for tests and logs)."""
        return self.regs[STATS[name]]

    # -- I/O BAR (SDM 13.2.2: IOADDR at 0, IODATA at 4) -----------------------------------
    def io_read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset & ~3 == 0:
                value = self.io_addr
            elif offset & ~3 == 4:
                value = self._read32(self.io_addr & 0x1FFFC)
            else:
                return 0
        return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def io_write(self, offset: int, value: int, size: int) -> None:
        with self.lock:
            if offset == 0 and size == 4:
                self.io_addr = value & 0x1FFFC
            elif offset == 4 and size == 4:
                self._write32(self.io_addr, value & 0xFFFFFFFF)
