"""A sample PCI device on the framework, used by the framework's tests.

BAR0 (mem32, 4 KiB): registers. BAR1 (I/O, 32 bytes): handler methods.
BAR2 (mem64 prefetchable, 16 KiB): MSI-X table at 0, PBA at 0x2000.
Capabilities: PM, MSI (64-bit, 4 vectors, per-vector mask), MSI-X (8), PCIe.

``python tests/xdevproto/pci/pci_sample_device.py --socket PATH`` serves it
(with the repo root on PYTHONPATH).
"""

from __future__ import annotations

import errno
import struct

from xdevproto.errors import DeviceError
from xdevproto.pci import (
    Access,
    Bar,
    BarKind,
    DmaError,
    Identity,
    MsiCap,
    MsixCap,
    PciDevice,
    PcieCap,
    PmCap,
    Reg,
    RegisterLayout,
)

ID, CTRL, STATUS, ISR, DOORBELL, COUNTER, ADDR, LEN, SCRATCH, TABLE = (
    0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18, 0x20, 0x24, 0x100)

LAYOUT = RegisterLayout("sample", 0x1000, [
    Reg(ID, "ID", Access.RO, reset=0x5A4D0001, spec="sample 1.1"),
    Reg(CTRL, "CTRL", reset=0x0000_0100, mask=0x0000_FFFF, spec="sample 1.2",
        on_write="write_ctrl"),
    Reg(STATUS, "STATUS", Access.RW1C, mask=0xFF, spec="sample 1.3", on_write="write_status"),
    Reg(ISR, "ISR", Access.RC, spec="sample 1.4"),
    Reg(DOORBELL, "DOORBELL", Access.WO, spec="sample 1.5", on_write="ring"),
    Reg(COUNTER, "COUNTER", Access.RO, spec="sample 1.6", on_read="read_counter"),
    Reg(ADDR, "ADDR", width=8, spec="sample 1.7"),
    Reg(LEN, "LEN", mask=0xFFFF, spec="sample 1.8"),
    Reg(SCRATCH, "SCRATCH", Access.RW1S, spec="sample 1.9"),
    Reg(0x28, "RSVD0", Access.RSVD),
    Reg(0x2C, "MIXED", reset=0x0F, mask=0xFF, w1c=0xF0, width=2),
    Reg(TABLE, "TABLE", count=16, stride=8, spec="sample 2"),
    Reg(TABLE + 4, "TABLE_HI", width=2, count=16, stride=8),
])


class SampleDevice(PciDevice):
    identity = Identity(vendor_id=0x1B36, device_id=0x0011, class_code=0x018000,
                        revision=2, subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
    bars = (
        Bar(0, 0x1000, regs=LAYOUT),
        Bar(1, 32, BarKind.IO),
        Bar(2, 0x4000, BarKind.MEM64, prefetchable=True),
    )
    capabilities = (PmCap(), MsiCap(4, addr64=True, per_vector_mask=True),
                    MsixCap(8, bar=2, table_offset=0, pba_offset=0x2000), PcieCap())
    pcie = True
    rom = b"\x55\xaa" + bytes(2046)

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.io = bytearray(32)

    # -- register hooks ------------------------------------------------------------------
    def write_ctrl(self, index: int, value: int, old: int) -> None:
        if value & 1:  # CTRL.GO: copy LEN bytes from ADDR to ADDR + LEN (on a worker)
            regs = self.regs(0)
            addr, n = regs["ADDR"], regs["LEN"]
            self.work.submit(lambda: self._copy(addr, n), self._copied)

    def _copy(self, addr: int, n: int) -> int:
        self.dma.write(addr + n, self.dma.read(addr, n))
        return n

    def _copied(self, result: int | None, error: BaseException | None) -> None:
        regs = self.regs(0)
        regs["STATUS"] = regs["STATUS"] | (0x2 if isinstance(error, DmaError) else 0x1)
        regs["CTRL"] = regs["CTRL"] & ~1
        self.intr.raise_(0)

    def write_status(self, index: int, value: int, old: int) -> None:
        if self.regs(0)["STATUS"] == 0:
            self.intr.lower(0)

    def ring(self, index: int, value: int, old: int) -> None:
        self.regs(0)["ISR"] = self.regs(0)["ISR"] | value
        self.intr.raise_(value & 7)

    def read_counter(self, index: int, value: int) -> int:
        self.reads += 1
        return self.reads

    # -- the I/O BAR ---------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        if index != 1:
            return bytes(count)  # BAR2 outside the MSI-X table and PBA
        return bytes(self.io[offset:offset + count])

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index == 1:
            self.io[offset:offset + len(data)] = data

    # -- state outside the register files ---------------------------------------------------
    def device_reset(self) -> None:
        self.reads = 0
        self.io[:] = bytes(32)

    def save_state(self) -> bytes:
        return struct.pack("<Q", self.reads) + bytes(self.io)

    def load_state(self, data: bytes) -> None:
        if len(data) != 8 + 32:
            raise DeviceError("bad sample device state", errno.EINVAL)
        self.reads = struct.unpack_from("<Q", data)[0]
        self.io[:] = data[8:]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from xdevproto.daemon import add_server_arguments, listener_from, run_server, setup_logging

    parser = argparse.ArgumentParser(prog="sample-device")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, "sample-device")
    return run_server(SampleDevice(), listener_from(args.socket, args.fd), name="sample-device")


if __name__ == "__main__":
    raise SystemExit(main())
