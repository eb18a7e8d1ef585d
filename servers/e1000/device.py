"""The Intel 82540EM as an ``xdevproto.pci`` device: PCI identity, BARs,
register semantics, interrupts with moderation, link state and reset
(8254x SDM ch. 13, 3.4 "Interrupts", 4.1 "PCI Configuration"). The transmit
and receive engines live in :mod:`.tx` and :mod:`.rx`, packet logic in
:mod:`.packet`, EEPROM and PHY in :mod:`.eeprom`.

BAR0 is 128 KiB of registers (the layout in :mod:`.regs`), BAR1 a 64-byte
I/O window (IOADDR at 0, IODATA at 4, SDM 13.2.2), INTx pin A, a power
management capability. Frames arrive from the back end's thread, in
batches, and are stored under the device lock; time comes from
:class:`~.timers.Timers`.
"""

from __future__ import annotations

import bisect
import errno
import logging
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any

from xdevproto.errors import DeviceError
from xdevproto.pci import Bar, BarKind, Identity, PciDevice, PmCap
from xdevproto.pci.regs import RegisterFile

from . import regs as R
from .backends import Backend
from .eeprom import DEVICE_ID, INTEL, SUBSYSTEM_ID, Eeprom, Phy, eeprom_image, mdic_access
from .packet import BROADCAST, RxFilter
from .regs import BAR0_SIZE, LAYOUT, STAT_PAIRS, STATS
from .rx import Receiver
from .timers import ThreadTimers, Timers
from .tx import Transmitter

log = logging.getLogger(__name__)

IO_SIZE = 0x40
ITR_UNIT = 256e-9  # ITR counts 256 ns (SDM 13.4.18)
DELAY_UNIT = 1.024e-6  # RDTR/RADV/TIDV/TADV count 1.024 us (SDM 13.4.30)
_RX_COUNTERS = ("GPRC", "TPR", "GORCL", "TORL", "BPRC", "MPRC", "PRC")
_TX_COUNTERS = ("GPTC", "TPT", "GOTCL", "TOTL", "BPTC", "MPTC", "PTC")
_TIMERS = ("itr", "rdtr", "radv", "tidv", "tadv")
_BUCKETS = (64, 127, 255, 511, 1023, 1522)  # PRCnn/PTCnn upper bounds (SDM 13.7)


class OffsetRegs:
    """BAR0 registers by offset, without side effects: the engines' view
    (``r[RDH]``), backed by the framework's register file."""

    def __init__(self, rf: RegisterFile) -> None:
        self.values = rf.values  # reset and load update the list in place
        self.slot = {s.offset: s.number for s in rf.layout.slots}

    def __getitem__(self, off: int) -> int:
        return self.values[self.slot[off]]

    def __setitem__(self, off: int, value: int) -> None:
        self.values[self.slot[off]] = value & 0xFFFFFFFF


class E1000Device(PciDevice):
    identity = Identity(vendor_id=INTEL, device_id=DEVICE_ID, class_code=0x020000,
                        revision=0x03, subsystem_vendor_id=INTEL, subsystem_id=SUBSYSTEM_ID)
    bars = (Bar(0, BAR0_SIZE, regs=LAYOUT), Bar(1, IO_SIZE, BarKind.IO))
    capabilities = (PmCap(),)
    workers = 1

    def __init__(self, mac: bytes, backend: Backend, timers: Timers | None = None) -> None:
        super().__init__()
        self.mac = bytes(mac)
        self.backend = backend
        self.timers = timers if timers is not None else ThreadTimers()
        self.r = OffsetRegs(self.regs(0))
        self._counter_slots: dict[bool, Any] = {
            True: self._slots_for(_RX_COUNTERS), False: self._slots_for(_TX_COUNTERS)}
        self.eeprom = Eeprom(eeprom_image(self.mac))
        self.phy = Phy()
        self.irq_level = False
        self._last_irq = -1e9
        self._filter: RxFilter | None = None
        self.io_addr = 0
        self.tx = Transmitter(self)
        self.rx = Receiver(self)
        self._reset_nic()
        self.set_partner(backend.link_up)
        backend.start(self.receive_frames, self.set_partner)

    def close(self) -> None:
        self.backend.close()
        self.timers.close()
        self.work.shutdown()
        self.dma.unmap_all()
        self.intr.release()

    # -- reset (SDM 13.4.1 CTRL.RST; 14.3 "Software reset") -----------------------
    def _reset_nic(self) -> None:
        """Everything outside the register file; registers are already reset."""
        self.eeprom.eecd = 0
        self._load_mac()
        self.tx.reset()
        self.rx.reset()
        for key in _TIMERS:
            self.timers.cancel(key)
        self._filter = None
        self.irq_level = False
        self.intr.lower(0)

    def _load_mac(self) -> None:
        """The MAC from EEPROM words 0-2 into RAL0/RAH0 with AV (SDM 5.6.1)."""
        mac = struct.pack("<3H", *self.eeprom.words[0:3])
        self.r[R.RAL] = struct.unpack("<I", mac[:4])[0]
        self.r[R.RAL + 4] = struct.unpack("<H", mac[4:])[0] | R.RAH_AV
        self._filter = None

    def device_reset(self) -> None:
        """DEVICE_RESET, FLR or D3hot->D0: the framework reset the registers."""
        self._reset_nic()
        self.phy.reset()

    def running(self, running: bool) -> None:
        if not running:
            for key in _TIMERS:
                self.timers.cancel(key)

    # -- register side effects (named in regs.py) ------------------------------------
    def write_ctrl(self, index: int, value: int, old: int) -> None:
        if value & R.CTRL_RST:
            log.info("CTRL.RST: device reset")
            self.regs(0).reset()
            self._reset_nic()
            self.phy.reset()
            self.link_changed()
            return
        if (value ^ old) & (R.CTRL_PHY_RST | R.CTRL_SLU):
            if value & R.CTRL_PHY_RST and not old & R.CTRL_PHY_RST:
                self.phy.reset()
            self.link_changed()

    def read_status(self, index: int, value: int) -> int:
        status = R.STATUS_SPEED_1000 | R.STATUS_ASDV_1000 | R.STATUS_FD
        if self.link_up:
            status |= R.STATUS_LU
        return status

    @property
    def link_up(self) -> bool:
        return self.phy.link_up and not self.r[R.CTRL] & R.CTRL_PHY_RST

    def read_eecd(self, index: int, value: int) -> int:
        return self.eeprom.read_eecd()

    def write_eecd(self, index: int, value: int, old: int) -> None:
        self.eeprom.write_eecd(value)

    def write_eerd(self, index: int, value: int, old: int) -> None:
        self.r[R.EERD] = self.eeprom.eerd(value)

    def write_ctrl_ext(self, index: int, value: int, old: int) -> None:
        if value & R.CTRL_EXT_EE_RST:
            self._load_mac()

    def write_mdic(self, index: int, value: int, old: int) -> None:
        was_up = self.link_up
        self.r[R.MDIC] = mdic_access(self.phy, value)
        if self.link_up != was_up:
            self.link_changed()
        if value & (1 << 29):  # MDIC.I: interrupt on completion
            self.raise_cause(R.ICR_MDAC)

    def filter_changed(self, index: int, value: int, old: int) -> None:
        self._filter = None

    # -- interrupts (SDM 3.4, 13.4.17-13.4.21) ---------------------------------------
    def read_icr(self, index: int, value: int) -> int:
        if value & self.r[R.IMS]:
            value |= R.ICR_INT_ASSERTED
        self.r[R.ICR] = 0  # the 82540 clears ICR on every read
        self.update_irq()
        return value

    def read_ics(self, index: int, value: int) -> int:
        # Real parts read ICR's value here without clearing it; VxWorks relies on it.
        return self.r[R.ICR]

    def write_ics(self, index: int, value: int, old: int) -> None:
        self.raise_cause(value & R.ICR_CAUSES)

    def write_imc(self, index: int, value: int, old: int) -> None:
        self.r[R.IMS] = self.r[R.IMS] & ~value
        self.update_irq()

    def raise_cause(self, bits: int) -> None:
        self.r[R.ICR] = self.r[R.ICR] | bits
        self.update_irq()

    def update_irq(self, *_: object) -> None:
        """Drive the line from ICR & IMS, holding back a new assertion until
        ITR intervals have passed since the last (SDM 3.4.2 throttling)."""
        if not self.r[R.ICR] & self.r[R.IMS]:
            self.timers.cancel("itr")
            self._set_level(False)
            return
        if self.irq_level:
            return
        interval = (self.r[R.ITR] & 0xFFFF) * ITR_UNIT
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
            self.intr.set_level(0, level)

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

    def write_rdtr(self, index: int, value: int, old: int) -> None:
        if value & R.RDTR_FPD and self.timers.armed("rdtr"):
            # Flush Partial Descriptor: report what is pending now.
            self.timers.cancel("rdtr")
            self.timers.cancel("radv")
            self.raise_cause(R.ICR_RXT0)

    # -- engines ------------------------------------------------------------------------
    def write_tdt(self, index: int, value: int, old: int) -> None:
        self.tx.kick()

    def write_tctl(self, index: int, value: int, old: int) -> None:
        if value & R.TCTL_EN:
            self.tx.kick()

    def rx_ring_changed(self, index: int, value: int, old: int) -> None:
        self.rx.ring_changed()

    def rx_filter(self) -> RxFilter:
        if self._filter is None:
            r = self.r
            exact = set()
            for i in range(16):
                rah = r[R.RAL + 8 * i + 4]
                if rah & R.RAH_AV:
                    exact.add(struct.pack("<IH", r[R.RAL + 8 * i], rah & 0xFFFF))
            self._filter = RxFilter(
                frozenset(exact), tuple(r[R.MTA + 4 * i] for i in range(128)),
                tuple(r[R.VFTA + 4 * i] for i in range(128)), r[R.RCTL], r[R.VET] & 0xFFFF)
        return self._filter

    def receive(self, frame: bytes) -> bool:
        """A frame from the wire; False if dropped."""
        return self.receive_frames((frame,)) == 1

    def receive_frames(self, frames: Sequence[bytes]) -> int:
        """Frames from the wire, in order (back end thread): stored under
        one acquisition of the lock. Returns how many were stored."""
        with self.lock:
            return self.rx.receive(frames)

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
        self.r[off] = min(self.r[off] + n, 0xFFFFFFFF)  # counters stick at max

    def count64(self, low: str, n: int) -> None:
        lo, hi = STATS[low], STATS[low[:-1] + "H"]
        total = min((self.r[hi] << 32 | self.r[lo]) + n, (1 << 64) - 1)
        self.r[lo], self.r[hi] = total & 0xFFFFFFFF, total >> 32

    def count_frame(self, rx: bool, frame: bytes) -> None:
        """The per-frame counters of one direction: good/total packets and
        octets (with FCS), broadcast/multicast, size bucket (SDM 13.7)."""
        self.count_frames(rx, (frame,))

    def count_frames(self, rx: bool, frames: Sequence[bytes]) -> None:
        """:meth:`count_frame` for a batch (a ring's worth), on the slots
        directly: each counter is updated once, size buckets once per
        distinct frame length, broadcast/multicast per group frame."""
        if not frames:
            return
        v = self.r.values
        packets, octets, bcast, mcast, buckets = self._counter_slots[rx]
        total = 0
        for length, count in Counter(map(len, frames)).items():
            size = length + 4  # and the FCS
            total += size * count
            n = buckets[min(bisect.bisect_left(_BUCKETS, size), 5)]
            v[n] = min(v[n] + count, 0xFFFFFFFF)  # counters stick at max
        for frame in [f for f in frames if f[0] & 1]:
            n = bcast if frame[:6] == BROADCAST else mcast
            v[n] = min(v[n] + 1, 0xFFFFFFFF)
        for n in packets:
            v[n] = min(v[n] + len(frames), 0xFFFFFFFF)
        for lo, hi in octets:
            both = min((v[hi] << 32 | v[lo]) + total, (1 << 64) - 1)
            v[lo], v[hi] = both & 0xFFFFFFFF, both >> 32

    def _slots_for(self, names: tuple[str, ...]) -> tuple[object, ...]:
        slot = self.r.slot
        gp, tp, go, to, bc, mc, prefix = names
        return ((slot[STATS[gp]], slot[STATS[tp]]),
                tuple((slot[STATS[lo]], slot[STATS[lo[:-1] + "H"]]) for lo in (go, to)),
                slot[STATS[bc]], slot[STATS[mc]],
                tuple(slot[STATS[f"{prefix}{b}"]] for b in _BUCKETS))

    def _clear_low(self, high: str, value: int) -> int:
        """Reading the high half of a 64-bit counter clears both halves."""
        self.r[STATS[STAT_PAIRS[high]]] = 0
        return value

    def read_gorch(self, index: int, value: int) -> int:
        return self._clear_low("GORCH", value)

    def read_gotch(self, index: int, value: int) -> int:
        return self._clear_low("GOTCH", value)

    def read_torh(self, index: int, value: int) -> int:
        return self._clear_low("TORH", value)

    def read_toth(self, index: int, value: int) -> int:
        return self._clear_low("TOTH", value)

    def stat(self, name: str) -> int:
        """A counter's value without clearing it (for tests and logs)."""
        return self.r[STATS[name]]

    # -- I/O BAR (SDM 13.2.2: IOADDR at 0, IODATA at 4) -----------------------------------
    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        if offset == 0 and count == 4:
            return self.io_addr.to_bytes(4, "little")
        if offset == 4 and count == 4:
            return self.regs(0).read(self.io_addr, 4)
        return bytes(count)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.io_addr = int.from_bytes(data, "little") & (BAR0_SIZE - 4)
        elif offset == 4 and len(data) == 4:
            self.regs(0).write(self.io_addr, data)

    # -- migration: state outside the register file -----------------------------------------
    def save_state(self) -> bytes:
        phy = [self.phy.regs.get(i, 0) for i in range(32)]
        return struct.pack("<32HBBI", *phy, self.phy.partner_up, self.phy.an_done, self.io_addr)

    def load_state(self, data: bytes) -> None:
        if len(data) != struct.calcsize("<32HBBI"):
            raise DeviceError("bad e1000 state", errno.EINVAL)
        *phy, partner, an_done, io_addr = struct.unpack("<32HBBI", data)
        self.phy.regs = {i: phy[i] for i in self.phy.regs}
        self.phy.partner_up, self.phy.an_done = bool(partner), bool(an_done)
        self.io_addr = io_addr & (BAR0_SIZE - 4)
        self._filter = None
        self.rx.ring_changed()
        self.tx.reset()  # a frame half gathered at the source is not carried over
