"""The bridge core: guest PCI functions served by vfio-user device servers.

The core knows nothing of Xen. A front end (``bridge.xen`` for Xen's ioreq
servers; a fake in tests) hands it the guest's accesses through the
:class:`~bridge.xen.handler.IoHandler` methods and gives it a
:class:`Frontend` to claim address ranges and raise interrupts.

For each device the core keeps:

* the guest-visible BARs (the server's region sizes, the type bits of the
  server's own BAR registers, the addresses the guest programs) and claims
  their ranges while the command register enables decoding (PCI 3.0,
  6.2.5.1 BAR sizing; 6.2.2 command register);
* a shadow of the MSI and MSI-X capabilities and of the MSI-X table, so
  that an interrupt the server raises on an eventfd is delivered with the
  address and data the guest programmed, honouring masks and pending bits
  (PCI 3.0, 6.8);
* INTx with level semantics: an eventfd signal asserts the line and masks
  INTx at the server; the next access to a BAR deasserts and unmasks, and
  a device whose interrupt is still pending signals again (the scheme of
  vfio without an EOI notifier);
* liveness: if the server dies the guest keeps running (reads all-ones,
  writes dropped, logged) and the core reconnects in the background,
  re-establishing DMA, interrupts and the guest's configuration.
"""

from __future__ import annotations

import bisect
import logging
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from xdevproto.client import Client
from xdevproto.errors import RemoteError, VfioUserError
from xdevproto.guestmem import GuestMemory
from xdevproto.wire import IoreqRange, IoreqServe, IrqIndex, PciRegion, RegionFlags, SetIrqsFlags

log = logging.getLogger(__name__)

ALL_ONES = (1 << 64) - 1
CFG_COMMAND = 0x04
CFG_BAR0 = 0x10
CFG_ROM = 0x30
CFG_CAP_PTR = 0x34
CFG_INT_PIN = 0x3D
CMD_IO = 1 << 0
CMD_MEM = 1 << 1
CMD_INTX_DISABLE = 1 << 10
CAP_MSI = 0x05
CAP_MSIX = 0x11
RECONNECT_INTERVAL = 0.5
#: Guest-physical space offered to device servers, as DMA regions without an
#: fd (reached by DMA_READ/DMA_WRITE, or mapped by the server itself with the
#: xdev extension). 48 bits in pieces of 8 TiB: libvfio-user refuses a
#: single region larger than that (ENOSPC). Holes answer EFAULT.
DMA_PIECE = 1 << 43
GUEST_DMA_RANGES = tuple((i * DMA_PIECE, DMA_PIECE) for i in range((1 << 48) // DMA_PIECE))


class Frontend(Protocol):
    """What the core needs from the hypervisor side. A front end may also
    offer ``direct_ioreq(sbdf) -> DirectIoreq | None`` (see
    :class:`DirectIoreq`); the core looks for it with getattr."""

    def claim_range(self, mmio: bool, start: int, end: int) -> None: ...
    def release_range(self, mmio: bool, start: int, end: int) -> None: ...
    def set_intx(self, sbdf: int, pin: int, level: int) -> None: ...
    def inject_msi(self, addr: int, data: int) -> None: ...


class DirectIoreq(Protocol):
    """A device's own ioreq server, which its device server serves itself
    (the xdev ioreq extension, bridge.direct): the core claims the device's
    BARs on it instead of on the front end's. While the device server is
    gone, the core serves it (:meth:`take_over`), answering like for any
    dead server."""

    id: int
    nr_vcpus: int

    def claim_range(self, mmio: bool, start: int, end: int) -> None: ...
    def release_range(self, mmio: bool, start: int, end: int) -> None: ...
    def hand_over(self) -> None:
        """Stop serving it here (the device server is about to)."""
    def take_over(self) -> bool:
        """Serve it here, answering what the device server left
        unanswered; False while the device server still holds it."""
    def close(self) -> None: ...


@dataclass
class Bar:
    index: int
    size: int
    io: bool
    is64: bool
    prefetch: bool
    address: int = 0  # as the guest programmed it (type bits excluded)
    claimed: tuple[int, int] | None = None
    direct: bool = False  # claimed on the device's own ioreq server

    def register(self, high: bool) -> int:
        if high:
            return (self.address >> 32) & 0xFFFFFFFF
        bits = 1 if self.io else (0x4 if self.is64 else 0) | (0x8 if self.prefetch else 0)
        return (self.address & 0xFFFFFFFF) | bits

    def program(self, value: int, high: bool) -> None:
        if high:
            self.address = (self.address & 0xFFFFFFFF) | (value << 32)
        else:
            low = value & ~(0x3 if self.io else 0xF) & 0xFFFFFFFF
            self.address = (self.address & ~0xFFFFFFFF) | low
        self.address &= ~(self.size - 1) & ((1 << 64) - 1 if self.is64 else 0xFFFFFFFF)


@dataclass
class MsiState:
    offset: int = 0  # capability offset in config space, 0 = none
    is64: bool = False
    maskable: bool = False
    control: int = 0
    address: int = 0
    data: int = 0
    mask: int = 0
    pending: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.offset and self.control & 1)


@dataclass
class MsixState:
    offset: int = 0
    size: int = 0  # table entries
    table_bar: int = 0
    table_offset: int = 0
    pba_bar: int = 0
    pba_offset: int = 0
    control: int = 0
    table: bytearray = field(default_factory=bytearray)
    pending: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.offset and self.control & 0x8000)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & 0x4000)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.table, vector * 16)
        return lo | hi << 32, data, bool(ctrl & 1)


class BridgeDevice:
    """One guest PCI function backed by a vfio-user server."""

    def __init__(self, sbdf: int, address: str, frontend: Frontend,
                 guest: GuestMemory | None, *,
                 dma_ranges: Sequence[tuple[int, int]] = GUEST_DMA_RANGES,
                 guest_memory_offer: dict[str, Any] | None = None,
                 ioreq_offer: dict[str, Any] | None = None) -> None:
        self.sbdf = sbdf
        self.address = address
        self.frontend = frontend
        self.guest = guest
        self.dma_ranges = tuple(dma_ranges)
        self.guest_memory_offer = guest_memory_offer
        self.ioreq_offer = ioreq_offer
        self.direct: DirectIoreq | None = None  # the device's own ioreq server, once made
        self.direct_serving = False  # the device server serves it (this connection)
        self.direct_orphaned = False  # its server is gone and we have not taken it over yet
        self.client: Client | None = None
        self.bars: dict[int, Bar] = {}
        self.command = 0
        self.pin = 0
        self.msi = MsiState()
        self.msix = MsixState()
        self.intx_asserted = False
        self.irq_fds: dict[int, list[int]] = {}
        self.lock = threading.RLock()
        self.dead_since: float | None = None
        self.on_change: Callable[[BridgeDevice], None] | None = None

    # -- connection --------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.client is not None

    def connect(self) -> None:
        """Connect, learn the device, set up DMA and interrupts, and replay
        the guest's configuration (after a reconnect)."""
        client = Client.connect(self.address, guest=self.guest,
                                guest_memory_offer=self.guest_memory_offer,
                                ioreq_offer=self.ioreq_offer)
        try:
            self._learn(client)
            for start, size in self.dma_ranges:
                client.dma_map(start, size)
            self._setup_irqs(client)
        except BaseException:
            client.close()
            raise
        with self.lock:
            first = self.client is None and self.dead_since is None and not self.bars
            self.client = client
            self.dead_since = None
            if not first:
                self._replay()
        log.info("device %s: connected to %s", _fmt_sbdf(self.sbdf), self.address)

    def _learn(self, client: Client) -> None:
        config = client.region_read(PciRegion.CONFIG, 0, 256)
        bars: dict[int, Bar] = {}
        index = 0
        while index < 6:
            info = client.region_info(index)
            if info.fd is not None:
                os.close(info.fd)
            raw = struct.unpack_from("<I", config, CFG_BAR0 + 4 * index)[0]
            is64 = not raw & 1 and (raw >> 1) & 3 == 2
            if info.size and info.flags & (RegionFlags.READ | RegionFlags.WRITE):
                if info.size & (info.size - 1):
                    raise VfioUserError(f"BAR{index} size {info.size:#x} not a power of two")
                old = self.bars.get(index)
                bars[index] = Bar(index, info.size, bool(raw & 1), is64, bool(raw & 8),
                                  old.address if old else 0, old.claimed if old else None)
            index += 2 if is64 else 1
        self.pin = config[CFG_INT_PIN]
        self._find_caps(config)
        with self.lock:
            self.bars = bars

    def _find_caps(self, config: bytes) -> None:
        ptr, seen = config[CFG_CAP_PTR] & 0xFC, 0
        while ptr and seen < 48:
            cap_id, nxt = config[ptr], config[ptr + 1] & 0xFC
            if cap_id == CAP_MSI and not self.msi.offset:
                control = struct.unpack_from("<H", config, ptr + 2)[0]
                self.msi = MsiState(ptr, bool(control & 0x80), bool(control & 0x100))
            elif cap_id == CAP_MSIX and not self.msix.offset:
                control, table, pba = struct.unpack_from("<HII", config, ptr + 2)
                size = (control & 0x7FF) + 1
                self.msix = MsixState(ptr, size, table & 7, table & ~7, pba & 7, pba & ~7,
                                      table=bytearray(_masked_table(size)))
            ptr, seen = nxt, seen + 1

    def _setup_irqs(self, client: Client) -> None:
        for fds in self.irq_fds.values():
            for fd in fds:
                os.close(fd)
        self.irq_fds = {}
        for index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX):
            count = client.irq_info(index).count
            if not count:
                continue
            fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
            client.set_irqs(index, SetIrqsFlags.ACTION_TRIGGER, 0, fds=fds)
            self.irq_fds[index] = fds
        if self.on_change is not None:
            self.on_change(self)

    def _replay(self) -> None:
        """Give a restarted server the guest's view of its configuration."""
        for bar in self.bars.values():
            self._forward_config(CFG_BAR0 + 4 * bar.index, 4, bar.register(False))
            if bar.is64:
                self._forward_config(CFG_BAR0 + 4 * bar.index + 4, 4, bar.register(True))
        if self.msi.offset:
            self._forward_config(self.msi.offset + 4, 4, self.msi.address & 0xFFFFFFFF)
            self._forward_config(self.msi.offset + 2, 2, self.msi.control)
        if self.msix.offset:
            for v in range(self.msix.size):
                self._forward_bar_write(self.msix.table_bar,
                                        self.msix.table_offset + 16 * v, 16,
                                        bytes(self.msix.table[16 * v:16 * v + 16]))
            self._forward_config(self.msix.offset + 2, 2, self.msix.control)
        self._forward_config(CFG_COMMAND, 2, self.command)
        self._update_claims()

    def _died(self, exc: BaseException) -> None:
        with self.lock:
            if self.client is None:
                return
            log.error("device %s: server %s lost (%s); serving all-ones until it returns",
                      _fmt_sbdf(self.sbdf), self.address, exc)
            client, self.client = self.client, None
            self.dead_since = time.monotonic()
            # Our INTx level goes, and so does the one a server serving its
            # own ioreqs drove itself.
            lower = self.intx_asserted or (self.direct_serving and self.pin)
            self.intx_asserted = False
            if self.direct_serving:
                self.direct_serving = False
                self.direct_orphaned = True
            if lower:
                self.frontend.set_intx(self.sbdf, self.pin - 1, 0)
        try:
            client.close()
        except Exception:
            pass
        self.retry_take_over()
        if self.on_change is not None:
            self.on_change(self)

    def retry_take_over(self) -> bool:
        """Serve the device's own ioreq server here once its dead server's
        ports are free (the kernel frees them when the process is gone);
        True when nothing is left to take over."""
        with self.lock:
            if not self.direct_orphaned or self.direct is None:
                return True
            if not self.direct.take_over():
                return False
            self.direct_orphaned = False
            log.info("device %s: serving its ioreq server %d until the server returns",
                     _fmt_sbdf(self.sbdf), self.direct.id)
            return True

    def try_reconnect(self) -> bool:
        if not self.retry_take_over():
            return False  # a new session could not serve it yet either
        try:
            self.connect()
        except (OSError, VfioUserError) as exc:
            log.debug("device %s: reconnect failed: %s", _fmt_sbdf(self.sbdf), exc)
            return False
        return True

    def close(self) -> None:
        with self.lock:
            client, self.client = self.client, None
            if client is not None and self.direct_serving:
                try:
                    client.ioreq_release()
                except (OSError, VfioUserError) as exc:
                    log.warning("device %s: ioreq server not released: %s",
                                _fmt_sbdf(self.sbdf), exc)
            self.direct_serving = False
            self.release_claims()
            if self.direct is not None:
                self.direct.close()
                self.direct = None
        if client is not None:
            client.close()
        for fds in self.irq_fds.values():
            for fd in fds:
                os.close(fd)
        self.irq_fds = {}

    def invalidate_guest_memory(self) -> None:
        """Pass an invalidation on to a server that maps the guest itself.
        One that refuses or fails is cut off like a dead one: its session
        ends, which closes its mappings, and a reconnect maps afresh."""
        client = self.client
        if client is None or not client.direct_memory:
            return
        try:
            client.invalidate_guest_memory()
        except (OSError, VfioUserError) as exc:
            self._died(exc)

    # -- forwarding ----------------------------------------------------------------
    def _call(self, fn: Callable[[Client], bytes | None]) -> bytes | None:
        client = self.client
        if client is None:
            return None
        try:
            return fn(client)
        except RemoteError as exc:  # the server refused; it is alive
            log.warning("device %s: %s", _fmt_sbdf(self.sbdf), exc)
            return None
        except (OSError, VfioUserError) as exc:
            self._died(exc)
            return None

    def _forward_config(self, reg: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._call(lambda c: c.region_write(PciRegion.CONFIG, reg, data))

    def _forward_bar_write(self, bar: int, offset: int, size: int, data: bytes) -> None:
        self._call(lambda c: c.region_write(bar, offset, data))

    # -- config space ----------------------------------------------------------------
    def config_read(self, reg: int, size: int) -> int:
        with self.lock:
            bar_index = (reg - CFG_BAR0) // 4 if CFG_BAR0 <= reg < CFG_BAR0 + 24 else None
            if bar_index is not None:
                return self._bar_register_read(bar_index, reg, size)
            if CFG_ROM <= reg < CFG_ROM + 4:
                return 0
            raw = self._call(lambda c: c.region_read(PciRegion.CONFIG, reg, size))
            if raw is None:
                return _ones(size)
            return int.from_bytes(raw, "little")

    def _bar_register_read(self, index: int, reg: int, size: int) -> int:
        word = 0
        bar = self.bars.get(index)
        if bar is not None:
            word = bar.register(False)
        else:
            lower = self.bars.get(index - 1)
            if lower is not None and lower.is64:
                word = lower.register(True)
        shift = 8 * (reg & 3)
        return (word >> shift) & ((1 << (8 * size)) - 1)

    def config_write(self, reg: int, size: int, value: int) -> None:
        with self.lock:
            if CFG_BAR0 <= reg < CFG_BAR0 + 24 and size == 4 and not reg & 3:
                self._bar_register_write((reg - CFG_BAR0) // 4, value)
            elif CFG_ROM <= reg < CFG_ROM + 4:
                return
            if reg <= CFG_COMMAND < reg + size:
                shift = 8 * (CFG_COMMAND - reg)
                self.command = (value >> shift) & 0xFFFF if size >= 2 else \
                    (self.command & 0xFF00) | ((value >> shift) & 0xFF)
                self._update_claims()
            self._shadow_caps(reg, size, value)
            self._forward_config(reg, size, value)

    def _bar_register_write(self, index: int, value: int) -> None:
        bar = self.bars.get(index)
        if bar is not None:
            bar.program(value, False)
        else:
            lower = self.bars.get(index - 1)
            if lower is None or not lower.is64:
                return
            lower.program(value, True)
        self._update_claims()

    def _shadow_caps(self, reg: int, size: int, value: int) -> None:
        for off in range(size):
            self._shadow_byte(reg + off, (value >> (8 * off)) & 0xFF)

    def _shadow_byte(self, reg: int, byte: int) -> None:
        msi, msix = self.msi, self.msix
        if msi.offset and msi.offset + 2 <= reg < msi.offset + 24:
            rel = reg - msi.offset
            data_at = 12 if msi.is64 else 8
            mask_at = 16 if msi.is64 else 12
            if rel in (2, 3):
                msi.control = _set_byte(msi.control, rel - 2, byte)
            elif 4 <= rel < 8 or (msi.is64 and 8 <= rel < 12):
                msi.address = _set_byte(msi.address, rel - 4, byte)
            elif data_at <= rel < data_at + 2:
                msi.data = _set_byte(msi.data, rel - data_at, byte)
            elif msi.maskable and mask_at <= rel < mask_at + 4:
                msi.mask = _set_byte(msi.mask, rel - mask_at, byte)
                self._flush_msi_pending()
        elif msix.offset and reg in (msix.offset + 2, msix.offset + 3):
            msix.control = _set_byte(msix.control, reg - msix.offset - 2, byte)
            self._flush_msix_pending()

    # -- BARs and claims ------------------------------------------------------------
    def _decodes(self, bar: Bar) -> bool:
        enabled = self.command & (CMD_IO if bar.io else CMD_MEM)
        limit = 0x10000 if bar.io else (1 << 64 if bar.is64 else 1 << 32)
        # An all-ones address is a BAR in the middle of sizing, not a place.
        sizing = bar.address == (limit - bar.size) & ~(bar.size - 1)
        return bool(enabled and bar.address and not sizing and bar.address + bar.size <= limit)

    def _may_go_direct(self, bar: Bar) -> bool:
        """Whether ``bar`` may be served by the device server itself: it
        offered to, the front end can give it an ioreq server, and the BAR
        holds no MSI-X table or PBA (those are shadowed here)."""
        client = self.client
        if client is None or not client.direct_ioreq or self.ioreq_offer is None \
                or getattr(self.frontend, "direct_ioreq", None) is None:
            return False
        m = self.msix
        return not (m.offset and bar.index in (m.table_bar, m.pba_bar))

    def _update_claims(self) -> None:
        """Claim each decoding BAR where it is served: on the device's own
        ioreq server when its server serves it itself, else on the front
        end's. Changed claims are released first, and the server hears of
        its new ranges before any claim can route a request there."""
        changes = []
        for bar in self.bars.values():
            want = (bar.address, bar.address + bar.size - 1) if self._decodes(bar) else None
            direct = want is not None and self._may_go_direct(bar)
            if (want, direct) != (bar.claimed, bar.direct):
                changes.append((bar, want, direct))
        for bar, _, _ in changes:
            if bar.claimed is not None:
                self._claimer(bar.direct).release_range(not bar.io, *bar.claimed)
            bar.claimed, bar.direct = None, False
        table = [b for b in self.bars.values() if b.direct]
        table += [bar for bar, want, direct in changes if direct]
        wanted = (table and not self.direct_serving) or (self.direct_serving and changes)
        if wanted and not self._serve_direct(table):
            changes = [(bar, want, False) for bar, want, _ in changes]
        for bar, want, direct in changes:
            if want is not None:
                self._claimer(direct).claim_range(not bar.io, *want)
                bar.claimed, bar.direct = want, direct
        if self.on_change is not None:
            self.on_change(self)

    def _claimer(self, direct: bool) -> Frontend | DirectIoreq:
        if direct:
            assert self.direct is not None
            return self.direct
        return self.frontend

    def _serve_direct(self, bars: list[Bar]) -> bool:
        """Tell the device server which BARs it serves itself, where; False
        (nothing is served there) if it cannot."""
        client = self.client
        if client is None:
            return False
        if self.direct is None:
            make = getattr(self.frontend, "direct_ioreq", None)
            self.direct = make(self.sbdf) if make is not None else None
            if self.direct is None:
                return False
        request = IoreqServe(self.direct.id, self.sbdf, self.direct.nr_vcpus,
                             tuple(IoreqRange(b.address, b.size, b.index, not b.io)
                                   for b in bars))
        if not self.direct_serving:
            # The server drives INTx from now on: our level goes.
            if self.intx_asserted:
                self.intx_asserted = False
                self.frontend.set_intx(self.sbdf, self.pin - 1, 0)
            self.direct.hand_over()
        try:
            client.ioreq_serve(request)
        except (OSError, VfioUserError) as exc:
            # A refusal too: the claims already made there would go unanswered.
            log.error("device %s: the server cannot serve its ioreq server: %s",
                      _fmt_sbdf(self.sbdf), exc)
            self.direct_serving = True  # so that _died takes it over
            self._died(exc)
            return False
        if not self.direct_serving:
            log.info("device %s: its server serves BAR accesses itself (ioreq server %d)",
                     _fmt_sbdf(self.sbdf), self.direct.id)
        self.direct_serving = True
        return True

    def release_claims(self) -> None:
        for bar in self.bars.values():
            if bar.claimed is not None:
                self._claimer(bar.direct).release_range(not bar.io, *bar.claimed)
                bar.claimed, bar.direct = None, False

    def bar_at(self, mmio: bool, addr: int, size: int) -> tuple[Bar, int] | None:
        for bar in self.bars.values():
            if bar.claimed and bar.io != mmio and bar.claimed[0] <= addr \
                    and addr + size - 1 <= bar.claimed[1]:
                return bar, addr - bar.address
        return None

    # -- BAR accesses ------------------------------------------------------------
    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        with self.lock:
            self._intx_eoi()
            table = self._msix_hit(bar, offset, size)
            if table is not None:
                return int.from_bytes(self.msix.table[table:table + size], "little")
            pba = self._pba_hit(bar, offset, size)
            if pba is not None:
                return (self.msix.pending >> (8 * pba)) & ((1 << (8 * size)) - 1)
        raw = self._call(lambda c: c.region_read(bar.index, offset, size))
        return _ones(size) if raw is None else int.from_bytes(raw, "little")

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self.lock:
            self._intx_eoi()
            table = self._msix_hit(bar, offset, size)
            if table is not None:
                self.msix.table[table:table + size] = data
                self._flush_msix_pending()
        # A memory write is posted (PCI ordering): the guest's vCPU goes on
        # while the server works, and the server's order keeps any later
        # read behind it. I/O writes are non-posted on PCI and wait.
        self._call(lambda c: c.region_write(bar.index, offset, data, posted=not bar.io))

    def _msix_hit(self, bar: Bar, offset: int, size: int) -> int | None:
        m = self.msix
        if not m.offset or bar.index != m.table_bar:
            return None
        rel = offset - m.table_offset
        return rel if rel >= 0 and rel + size <= 16 * m.size else None

    def _pba_hit(self, bar: Bar, offset: int, size: int) -> int | None:
        m = self.msix
        if not m.offset or bar.index != m.pba_bar:
            return None
        rel = offset - m.pba_offset
        return rel if rel >= 0 and rel + size <= 8 * (-(-m.size // 64)) else None

    # -- interrupts ------------------------------------------------------------------
    def irq_fired(self, index: int, vector: int) -> None:
        """The server signalled eventfd ``vector`` of ``index``."""
        with self.lock:
            if index == IrqIndex.MSIX:
                self._deliver_msix(vector)
            elif index == IrqIndex.MSI:
                self._deliver_msi(vector)
            elif index == IrqIndex.INTX:
                self._assert_intx()

    def _deliver_msi(self, vector: int) -> None:
        msi = self.msi
        if not msi.enabled:
            return
        if msi.maskable and msi.mask >> vector & 1:
            msi.pending |= 1 << vector
            return
        enabled_vectors = 1 << ((msi.control >> 4) & 7)
        data = (msi.data & ~(enabled_vectors - 1)) | (vector & (enabled_vectors - 1))
        self.frontend.inject_msi(msi.address, data & 0xFFFF)

    def _flush_msi_pending(self) -> None:
        msi = self.msi
        for v in range(32):
            if msi.pending >> v & 1 and not msi.mask >> v & 1:
                msi.pending &= ~(1 << v)
                self._deliver_msi(v)

    def _deliver_msix(self, vector: int) -> None:
        m = self.msix
        if not m.enabled or vector >= m.size:
            return
        addr, data, masked = m.entry(vector)
        if masked or m.function_masked:
            m.pending |= 1 << vector
            return
        self.frontend.inject_msi(addr, data)

    def _flush_msix_pending(self) -> None:
        m = self.msix
        if not m.enabled or m.function_masked or not m.pending:
            return
        for v in range(m.size):
            if m.pending >> v & 1 and not m.entry(v)[2]:
                m.pending &= ~(1 << v)
                self.frontend.inject_msi(*m.entry(v)[:2])

    def _assert_intx(self) -> None:
        if self.intx_asserted or not self.pin or self.command & CMD_INTX_DISABLE:
            return
        self.intx_asserted = True
        self.frontend.set_intx(self.sbdf, self.pin - 1, 1)
        self._call(lambda c: c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_MASK, 0, count=1))

    def _intx_eoi(self) -> None:
        if not self.intx_asserted:
            return
        self.intx_asserted = False
        self.frontend.set_intx(self.sbdf, self.pin - 1, 0)
        self._call(lambda c: c.set_irqs(IrqIndex.INTX, SetIrqsFlags.ACTION_UNMASK, 0, count=1))


class Bridge:
    """The device table and the IoHandler a front end calls."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.devices: dict[int, BridgeDevice] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._irq_thread: threading.Thread | None = None
        self._ranges: list[tuple[int, int, bool, BridgeDevice]] = []

    def add(self, device: BridgeDevice) -> None:
        device.on_change = self._changed
        self.devices[device.sbdf] = device

    def _changed(self, _device: BridgeDevice) -> None:
        ranges = []
        for dev in self.devices.values():
            for bar in dev.bars.values():
                if bar.claimed is not None:
                    ranges.append((bar.claimed[0], bar.claimed[1], not bar.io, dev))
        ranges.sort(key=lambda r: (r[2], r[0]))
        self._ranges = ranges
        os.write(self._wake_w, b"x")

    def start(self) -> None:
        """Connect every device server; one that is not up yet is retried in
        the background (the guest sees all-ones there until it comes)."""
        for dev in self.devices.values():
            try:
                dev.connect()
            except (OSError, VfioUserError) as exc:
                log.error("device %s: cannot reach %s yet: %s", _fmt_sbdf(dev.sbdf),
                          dev.address, exc)
                dev.dead_since = time.monotonic()
        self._irq_thread = threading.Thread(target=self._irq_loop, daemon=True,
                                            name="xdev-bridge-irq")
        self._irq_thread.start()

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._irq_thread is not None:
            self._irq_thread.join(5)
        for dev in self.devices.values():
            dev.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _irq_loop(self) -> None:
        """Wait on every device's interrupt eventfds; reconnect dead servers.

        The set of eventfds is rebuilt only when a device changed (it writes
        the wake pipe), a select failed, or a server is dead: an interrupt
        costs the select, the eventfd read and the delivery, nothing more."""
        watch: dict[int, tuple[BridgeDevice, int, int]] | None = None
        fds: list[int] = []
        dead: list[BridgeDevice] = []
        while not self._stop.is_set():
            if watch is None:
                watch = {}
                for dev in self.devices.values():
                    for index, vectors in dev.irq_fds.items():
                        for vector, fd in enumerate(vectors):
                            watch[fd] = (dev, index, vector)
                fds = [self._wake_r, *watch]
                dead = [d for d in self.devices.values() if not d.alive]
            try:
                ready, _, _ = select.select(fds, [], [], RECONNECT_INTERVAL if dead else None)
            except (OSError, ValueError):
                watch = None  # an fd closed under us: rebuild the set
                continue
            for fd in ready:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    watch = None
                    continue
                hit = watch.get(fd) if watch is not None else None
                if hit is None:
                    continue
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    continue
                hit[0].irq_fired(hit[1], hit[2])
            if dead:
                watch = None
                for dev in dead:
                    if not self._stop.is_set():
                        dev.try_reconnect()

    # -- IoHandler --------------------------------------------------------------
    def _find(self, mmio: bool, addr: int, size: int) -> tuple[BridgeDevice, Bar, int] | None:
        ranges = self._ranges
        i = bisect.bisect_right(ranges, (mmio, addr), key=lambda r: (r[2], r[0])) - 1
        if i < 0:
            return None
        start, end, is_mmio, dev = ranges[i]
        if is_mmio != mmio or not start <= addr or addr + size - 1 > end:
            return None
        hit = dev.bar_at(mmio, addr, size)
        return (dev, *hit) if hit else None

    def mmio_read(self, addr: int, size: int) -> int:
        hit = self._find(True, addr, size)
        return hit[0].bar_read(hit[1], hit[2], size) if hit else _ones(size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        hit = self._find(True, addr, size)
        if hit:
            hit[0].bar_write(hit[1], hit[2], size, value)

    def pio_read(self, port: int, size: int) -> int:
        hit = self._find(False, port, size)
        return hit[0].bar_read(hit[1], hit[2], size) if hit else _ones(size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        hit = self._find(False, port, size)
        if hit:
            hit[0].bar_write(hit[1], hit[2], size, value)

    def config_read(self, sbdf: int, reg: int, size: int) -> int:
        dev = self.devices.get(sbdf)
        if dev is None or reg + size > 4096:
            return _ones(size)
        return dev.config_read(reg, size)

    def config_write(self, sbdf: int, reg: int, size: int, value: int) -> None:
        dev = self.devices.get(sbdf)
        if dev is not None and reg + size <= 4096:
            dev.config_write(reg, size, value)

    def invalidate(self) -> None:
        """The guest's memory map changed (Xen's INVALIDATE; the ioreq server
        has dropped the bridge's own mappings): make every server that maps
        the guest itself drop its, before the caller completes the request."""
        for dev in self.devices.values():
            dev.invalidate_guest_memory()


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


def _set_byte(word: int, index: int, byte: int) -> int:
    return (word & ~(0xFF << (8 * index))) | (byte << (8 * index))


def _masked_table(size: int) -> bytes:
    # PCI 3.0 6.8.2.9: every vector's mask bit is set after reset.
    return b"".join(struct.pack("<IIII", 0, 0, 0, 1) for _ in range(size))


def _fmt_sbdf(sbdf: int) -> str:
    return (f"{sbdf >> 16:04x}:{(sbdf >> 8) & 0xFF:02x}:"
            f"{(sbdf >> 3) & 0x1F:02x}.{sbdf & 7}")


def parse_bdf(text: str) -> int:
    """``[SSSS:]BB:DD.F`` -> Xen's SBDF integer (segment << 16 | bus << 8 | devfn)."""
    parts = text.split(":")
    if len(parts) == 2:
        parts.insert(0, "0")
    if len(parts) != 3 or "." not in parts[2]:
        raise ValueError(f"bad PCI address {text!r}, want [SSSS:]BB:DD.F")
    dev, fn = parts[2].split(".")
    seg, bus, d, f = int(parts[0], 16), int(parts[1], 16), int(dev, 16), int(fn, 16)
    if seg > 0xFFFF or bus > 0xFF or d > 0x1F or f > 7:
        raise ValueError(f"PCI address {text!r} out of range")
    return seg << 16 | bus << 8 | d << 3 | f
