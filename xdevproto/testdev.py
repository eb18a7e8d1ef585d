"""A small device for exercising the runtime, clients and the conformance
suite: every protocol feature, none of a real device's complexity.

Regions:
* BAR0, 4 KiB of registers (read/write, no mmap):
  ``0x00`` ID (RO, 0x78646576 "xdev"), ``0x04`` SCRATCH (RW),
  ``0x08`` DMA_ADDR (u64), ``0x10`` DMA_LEN, ``0x14`` DMA_CMD (write 1: copy
  guest memory into the buffer; 2: buffer into guest memory; 3: both from a
  worker thread), ``0x18`` DMA_STATUS (0 ok, errno otherwise), ``0x1c`` IRQ
  (write N: raise vector N of the enabled index), ``0x100..0x1000`` BUFFER.
* BAR2, 64 KiB of memory backed by a memfd, mmap-able through a sparse area
  covering its first half.
* CONFIG, 256 bytes: vendor 0x1b36 (Red Hat, QEMU's test ids), device 0x0005.

Interrupts: INTx (1), MSI (4), MSI-X (8): vectors are written to eventfds.
Migration: STOP_COPY with the whole register and buffer state; dirty
logging of DMA writes.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from collections.abc import Sequence

from . import wire
from .device import NO_REGION, Device, DeviceContext, DmaRegion, IrqDesc, RegionDesc
from .errors import DeviceError, VfioUserError
from .wire import IrqIndex, MigrationFlags, MigState, PciRegion, RegionFlags

ID_VALUE = 0x78646576
BUF_OFF = 0x100
BAR0_SIZE = 0x1000
BAR2_SIZE = 0x10000
STATE_MAGIC = b"XTDV\x01"
RW = RegionFlags.READ | RegionFlags.WRITE
# Plain ints for the access paths (an IntEnum member lookup costs more than
# the comparison, and the protocol bench times this device).
_BAR0, _BAR2, _CONFIG = int(PciRegion.BAR0), int(PciRegion.BAR2), int(PciRegion.CONFIG)

# Arcs of the migration v2 state machine (vfio-user spec, DEVICE_FEATURE):
ARCS = {
    (MigState.RUNNING, MigState.STOP), (MigState.STOP, MigState.RUNNING),
    (MigState.STOP, MigState.STOP_COPY), (MigState.STOP_COPY, MigState.STOP),
    (MigState.STOP, MigState.RESUMING), (MigState.RESUMING, MigState.STOP),
    (MigState.RUNNING, MigState.PRE_COPY), (MigState.PRE_COPY, MigState.RUNNING),
    (MigState.PRE_COPY, MigState.STOP_COPY),
}


class TestDevice(Device):
    __test__ = False  # not a pytest class
    migration_flags = MigrationFlags.STOP_COPY | MigrationFlags.PRE_COPY

    def __init__(self) -> None:
        self.regs = bytearray(BAR0_SIZE)
        struct.pack_into("<I", self.regs, 0, ID_VALUE)
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, 0x1B36, 0x0005)
        self.bar2_fd = os.memfd_create("xdev-testdev-bar2", os.MFD_CLOEXEC)
        os.ftruncate(self.bar2_fd, BAR2_SIZE)
        self.bar2 = mmap.mmap(self.bar2_fd, BAR2_SIZE)
        self.ctx: DeviceContext | None = None
        self.dma_regions: list[tuple[DmaRegion, mmap.mmap | None]] = []
        self.irq_fds: dict[int, list[int | None]] = {}
        self.irq_masked: dict[int, bytearray] = {}
        self.state = MigState.RUNNING
        self.mig_out = b""
        self.mig_in = bytearray()
        self.dirty: dict[int, set[int]] | None = None
        self.dirty_page = 4096
        self.lock = threading.Lock()
        self.resets = 0

    # -- description ---------------------------------------------------------------
    def region(self, index: int) -> RegionDesc:
        if index == PciRegion.BAR0:
            return RegionDesc(BAR0_SIZE, RW)
        if index == PciRegion.BAR2:
            sparse = wire.SparseMmapCap((wire.SparseArea(0, BAR2_SIZE // 2),))
            return RegionDesc(BAR2_SIZE, RW | RegionFlags.MMAP, self.bar2_fd, 0, (sparse,))
        if index == PciRegion.CONFIG:
            return RegionDesc(len(self.config), RW)
        return NO_REGION

    def irq(self, index: int) -> IrqDesc:
        counts = {IrqIndex.INTX: 1, IrqIndex.MSI: 4, IrqIndex.MSIX: 8}
        return IrqDesc(counts.get(IrqIndex(index), 0),
                       wire.IrqInfoFlags.EVENTFD | wire.IrqInfoFlags.MASKABLE)

    # -- accesses --------------------------------------------------------------------
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == _BAR0:
            return bytes(self.regs[offset:offset + count])
        if index == _BAR2:
            return self.bar2[offset:offset + count]
        return bytes(self.config[offset:offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == _BAR2:
            self.bar2[offset:offset + len(data)] = data
            return
        if index == _CONFIG:
            if offset >= 4:  # ids are read-only
                self.config[offset:offset + len(data)] = data
            return
        if offset < 4:
            return  # ID is read-only
        self.regs[offset:offset + len(data)] = data
        if offset <= 0x14 < offset + len(data):
            self._dma_command(struct.unpack_from("<I", self.regs, 0x14)[0])
        if offset <= 0x1C < offset + len(data):
            self.raise_irq(struct.unpack_from("<I", self.regs, 0x1C)[0])

    # -- DMA engine -------------------------------------------------------------------
    def _dma_command(self, cmd: int) -> None:
        if cmd == 3:
            threading.Thread(target=self._dma_roundtrip, daemon=True).start()
            return
        status = 0
        try:
            if cmd == 1:
                self._copy_in()
            elif cmd == 2:
                self._copy_out()
        except VfioUserError as exc:
            status = exc.errno
        struct.pack_into("<I", self.regs, 0x18, status)

    def _dma_args(self) -> tuple[int, int]:
        addr, length = struct.unpack_from("<QI", self.regs, 0x08)
        if length > BAR0_SIZE - BUF_OFF:
            raise DeviceError("DMA length beyond the buffer", errno.EINVAL)
        return addr, length

    def _copy_in(self) -> None:
        addr, length = self._dma_args()
        self.regs[BUF_OFF:BUF_OFF + length] = self.dma_read(addr, length)

    def _copy_out(self) -> None:
        addr, length = self._dma_args()
        self.dma_write(addr, bytes(self.regs[BUF_OFF:BUF_OFF + length]))

    def _dma_roundtrip(self) -> None:
        status = 0
        try:
            self._copy_in()
            self._copy_out()
        except VfioUserError as exc:
            status = exc.errno
        struct.pack_into("<I", self.regs, 0x18, status)
        self.raise_irq(0)

    def _find(self, iova: int, length: int) -> tuple[DmaRegion, mmap.mmap | None]:
        for region, mem in self.dma_regions:
            if region.iova <= iova and iova + length <= region.iova + region.size:
                return region, mem
        raise DeviceError(f"DMA to unmapped {iova:#x}+{length}", errno.EFAULT)

    def dma_read(self, iova: int, length: int) -> bytes:
        with self.lock:
            region, mem = self._find(iova, length)
            if mem is not None:
                start = iova - region.iova + region.fd_offset
                return mem[start:start + length]
        assert self.ctx is not None
        return self.ctx.dma_read(iova, length)

    def dma_write(self, iova: int, data: bytes) -> None:
        with self.lock:
            region, mem = self._find(iova, len(data))
            if not region.writable:
                raise DeviceError("DMA region is read-only", errno.EFAULT)
            self._mark_dirty(iova, len(data))
            if mem is not None:
                start = iova - region.iova + region.fd_offset
                mem[start:start + len(data)] = data
                return
        assert self.ctx is not None
        self.ctx.dma_write(iova, data)

    def _mark_dirty(self, iova: int, length: int) -> None:
        if self.dirty is None or length == 0:
            return
        for page in range(iova // self.dirty_page, (iova + length - 1) // self.dirty_page + 1):
            self.dirty.setdefault(0, set()).add(page)

    # -- session ------------------------------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    def detach(self) -> None:
        self.ctx = None

    def dma_map(self, region: DmaRegion) -> None:
        mem = None
        if region.fd is not None:
            try:
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if region.writable else 0)
                mem = mmap.mmap(region.fd, region.size + region.fd_offset, prot=prot)
            except (OSError, ValueError) as exc:
                raise DeviceError(f"cannot map DMA fd: {exc}", errno.EINVAL) from None
            finally:
                os.close(region.fd)
        with self.lock:
            self.dma_regions.append((region, mem))

    def dma_unmap(self, region: DmaRegion) -> None:
        with self.lock:
            for i, (r, mem) in enumerate(self.dma_regions):
                if r.iova == region.iova and r.size == region.size:
                    del self.dma_regions[i]
                    if mem is not None:
                        mem.close()
                    return

    def set_irqs(self, index: int, action: int, start: int, count: int,
                 fds: Sequence[int | None] | None, bools: bytes | None) -> None:
        vectors = self.irq(index).count
        table = self.irq_fds.setdefault(index, [None] * vectors)
        masked = self.irq_masked.setdefault(index, bytearray(vectors))
        if action == wire.SetIrqsFlags.ACTION_TRIGGER:
            if fds is not None:
                for i, fd in enumerate(fds):
                    old = table[start + i]
                    if old is not None:
                        os.close(old)
                    table[start + i] = fd
            elif count == 0:
                for i, old in enumerate(table):
                    if old is not None:
                        os.close(old)
                    table[i] = None
            else:
                for i in range(count):
                    if bools is None or bools[i]:
                        self._signal(index, start + i)
        else:
            value = 1 if action == wire.SetIrqsFlags.ACTION_MASK else 0
            for i in range(count):
                if bools is None or bools[i]:
                    masked[start + i] = value
            if fds:
                for fd in fds:
                    if fd is not None:
                        os.close(fd)

    def raise_irq(self, vector: int) -> None:
        for index in (IrqIndex.MSIX, IrqIndex.MSI, IrqIndex.INTX):
            table = self.irq_fds.get(index)
            if table and any(fd is not None for fd in table):
                if vector < len(table):
                    self._signal(index, vector)
                return

    def _signal(self, index: int, vector: int) -> None:
        masked = self.irq_masked.get(index)
        if masked is not None and masked[vector]:
            return
        fd = self.irq_fds.get(index, [None] * (vector + 1))[vector]
        if fd is not None:
            os.eventfd_write(fd, 1)

    def reset(self) -> None:
        self.resets += 1
        self.regs[4:] = bytes(BAR0_SIZE - 4)
        self.state = MigState.RUNNING

    # -- migration -----------------------------------------------------------------------
    def mig_state(self) -> MigState:
        return self.state

    def set_mig_state(self, state: MigState) -> None:
        if state == self.state:
            return
        if state == MigState.ERROR or state not in (MigState.STOP, MigState.RUNNING,
                                                    MigState.STOP_COPY, MigState.RESUMING,
                                                    MigState.PRE_COPY):
            raise DeviceError(f"cannot enter {state.name}", errno.EINVAL)
        if (self.state, state) not in ARCS:
            # The spec lets a device take the shortest path; this device
            # only goes through STOP, which is never a saving state.
            if (self.state, MigState.STOP) not in ARCS or (MigState.STOP, state) not in ARCS:
                raise DeviceError(f"no path {self.state.name} -> {state.name}", errno.EINVAL)
            self._enter(MigState.STOP)
        self._enter(state)

    def _enter(self, state: MigState) -> None:
        if state in (MigState.STOP_COPY, MigState.PRE_COPY):
            self.mig_out = STATE_MAGIC + bytes(self.regs) + bytes(self.config)
        if state == MigState.RESUMING:
            self.mig_in = bytearray()
        if self.state == MigState.RESUMING and state == MigState.STOP:
            self._load(bytes(self.mig_in))
        self.state = state

    def _load(self, blob: bytes) -> None:
        want = len(STATE_MAGIC) + BAR0_SIZE + 256
        if len(blob) != want or not blob.startswith(STATE_MAGIC):
            self.state = MigState.ERROR
            raise DeviceError("migration stream is not a test-device state", errno.EINVAL)
        body = blob[len(STATE_MAGIC):]
        self.regs[:] = body[:BAR0_SIZE]
        self.config[:] = body[BAR0_SIZE:]

    def mig_data_read(self, size: int) -> bytes:
        out, self.mig_out = self.mig_out[:size], self.mig_out[size:]
        return out

    def mig_data_write(self, data: bytes) -> None:
        if len(self.mig_in) + len(data) > len(STATE_MAGIC) + BAR0_SIZE + 256:
            raise DeviceError("migration stream too long", errno.EINVAL)
        self.mig_in += data

    def dma_logging_start(self, page_size: int, ranges: Sequence[tuple[int, int]]) -> None:
        self.dirty_page = page_size
        self.dirty = {}

    def dma_logging_stop(self) -> None:
        self.dirty = None

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        if self.dirty is None:
            raise DeviceError("dirty logging is not on", errno.EINVAL)
        pages = -(-length // page_size)
        bitmap = bytearray(-(-pages // 64) * 8)
        dirty = self.dirty.get(0, set())
        first = iova // page_size
        for page in sorted(dirty):
            n = page - first
            if 0 <= n < pages:
                bitmap[n // 8] |= 1 << (n % 8)
                dirty.discard(page)
        return bytes(bitmap)


def main(argv: list[str] | None = None) -> int:
    """``python -m xdevproto.testdev --socket PATH``: serve a test device."""
    import argparse
    import sys

    from .daemon import (
        add_server_arguments,
        expand_config,
        listener_from,
        run_server,
        setup_logging,
    )

    parser = argparse.ArgumentParser(prog="xdev-testdev", description="serve the xdev test device")
    add_server_arguments(parser)
    args = parser.parse_args(expand_config(list(sys.argv[1:] if argv is None else argv)))
    setup_logging(args.log_level, "xdev-testdev")
    listener = listener_from(args.socket, args.fd)
    return run_server(TestDevice(), listener, name="xdev-testdev", allowed_uids=args.allow_uid,
                      engine=args.engine)


if __name__ == "__main__":
    raise SystemExit(main())
