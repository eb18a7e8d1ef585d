"""Clients for the client-mode tests: xdev's own client driven by a short
script (well-behaved), and a raw client that breaks one rule on request."""

from __future__ import annotations

import mmap
import os
import struct

from xdevproto import wire
from xdevproto.client import Client
from xdevproto.conformance.model import Transcript
from xdevproto.conformance.rawpeer import Msg, RawPeer
from xdevproto.errors import RemoteError
from xdevproto.guestmem import MemfdRam
from xdevproto.wire import Command, HeaderFlags, SetIrqsFlags

RAM_BASE, RAM_SIZE = 0x10000, 1 << 16


class NullFrontend:
    """The bridge's hypervisor side, doing nothing (no Xen here)."""

    def claim_range(self, mmio: bool, start: int, end: int) -> None: ...
    def release_range(self, mmio: bool, start: int, end: int) -> None: ...
    def set_intx(self, sbdf: int, pin: int, level: int) -> None: ...
    def inject_msi(self, addr: int, data: int) -> None: ...


def bridge_client(path: str) -> None:
    """The bridge's client side: connect a BridgeDevice (learn the device,
    map guest memory, wire interrupts), forward a BAR read, disconnect."""
    from bridge.core import BridgeDevice, parse_bdf

    with MemfdRam(RAM_SIZE, base=RAM_BASE) as ram:
        dev = BridgeDevice(parse_bdf("00:05.0"), path, NullFrontend(), ram,
                           dma_ranges=[(RAM_BASE, RAM_SIZE)])
        try:
            dev.connect()
        finally:
            dev.close()


def xdev_client(path: str) -> None:
    """What a VMM does at start-up, with xdevproto.client."""
    with MemfdRam(RAM_SIZE, base=RAM_BASE) as ram, Client.connect(path, guest=ram) as c:
        info = c.device_info()
        for index in range(info.num_regions):
            try:
                r = c.region_info(index)
            except RemoteError:
                continue  # the checking server refuses region 8 on purpose
            if r.fd is not None:
                os.close(r.fd)
        for index in range(info.num_irqs):
            c.irq_info(index)
        c.dma_map(RAM_BASE, RAM_SIZE, fd=ram.fd)
        c.region_read(0, 0, 8192)  # more than max_data_xfer_size: split
        c.region_write(0, 0x100, b"\1" * 5000)
        try:
            c.region_read(0, 0x20, 4)
        except RemoteError:
            pass
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        c.set_irqs(2, SetIrqsFlags.ACTION_TRIGGER, 0, fds=[efd])
        os.close(efd)
        c.reset()
        c.dma_unmap(RAM_BASE, RAM_SIZE)


class RawClient:
    """A client over the raw layer that answers server DMA from a memfd."""

    def __init__(self, path: str, fault: str) -> None:
        self.fault = fault
        self.peer = RawPeer.connect(path, Transcript(), 5.0)
        self.ram_fd = os.memfd_create("raw-client", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, RAM_SIZE)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)

    def close(self) -> None:
        self.peer.close()
        self.ram.close()
        os.close(self.ram_fd)

    def call(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = 0) -> Msg:
        mid = self.peer.send(command, payload, fds=fds or [], flags=flags)
        while True:
            msg = self.peer.recv()
            if msg.is_reply and msg.msg_id == mid:
                msg.close_fds()
                return msg
            if not msg.is_reply:
                self.serve(msg)

    def serve(self, msg: Msg) -> None:
        address, count = struct.unpack_from("<QQ", msg.payload)
        off = address - RAM_BASE
        if msg.command == Command.DMA_WRITE:
            if self.fault == "dma-write-error":
                self.peer.send(msg.command, msg_id=msg.msg_id,
                               flags=HeaderFlags.REPLY | HeaderFlags.ERROR, error=14)
                return
            self.ram[off:off + count] = msg.payload[16:16 + count]
            self.peer.send(msg.command, msg.payload[:16], msg_id=msg.msg_id,
                           flags=HeaderFlags.REPLY)
        else:
            data = bytes(count) if self.fault == "dma-read-zeros" \
                else bytes(self.ram[off:off + count])
            self.peer.send(msg.command, msg.payload[:16] + data, msg_id=msg.msg_id,
                           flags=HeaderFlags.REPLY)

    def run(self) -> None:
        f = self.fault
        if f == "version-not-first":
            self.call(Command.DEVICE_GET_INFO, wire.DeviceInfo(16, 0, 0, 0).encode())
        text = b'{"capabilities":{"max_msg_fds":1}}' + (b"" if f == "version-no-nul" else b"\0")
        self.call(Command.VERSION, struct.pack("<HH", 0, 2) + text)
        info_fds = [os.dup(self.ram_fd)] if f == "fds-on-info" else []
        self.call(Command.DEVICE_GET_INFO,
                  wire.DeviceInfo(8 if f == "small-argsz" else 16, 0, 0, 0).encode(), info_fds,
                  flags=HeaderFlags.ERROR if f == "error-bit" else 0)
        for fd in info_fds:
            os.close(fd)
        reply = self.call(Command.DEVICE_GET_REGION_INFO,
                          wire.RegionInfo(32, 0, 2, 0, 0, 0).encode())
        need = struct.unpack_from("<I", reply.payload)[0]
        if need > 32 and f != "no-two-step":
            self.call(Command.DEVICE_GET_REGION_INFO,
                      wire.RegionInfo(need, 0, 2, 0, 0, 0).encode())
        fds = [self.ram_fd, self.ram_fd] if f == "two-fds" else [self.ram_fd]
        self.call(Command.DMA_MAP, wire.DmaMap(16 if f == "bad-dma-map" else 32, 3, 0, RAM_BASE,
                                               RAM_SIZE).encode(), fds)
        count = 8192 if f == "big-read" else 4
        self.call(Command.REGION_READ, wire.REGION_ACCESS.pack(0, 0, count))
        data = b"\1" * (8 if f == "bad-write-len" else 4)
        self.call(Command.REGION_WRITE, wire.REGION_ACCESS.pack(0x100, 0, 4) + data)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        argsz = 0 if f == "bad-set-irqs" else 20
        self.call(Command.DEVICE_SET_IRQS,
                  wire.SetIrqs(argsz, SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER,
                               2, 0, 1).encode(), [efd])
        os.close(efd)
        reply = self.call(Command.REGION_READ, wire.REGION_ACCESS.pack(0x20, 0, 4))
        if reply.is_error and f == "gives-up-after-error":
            raise RuntimeError("the device failed a read; giving up")
        if f == "write-multi":
            entry = wire.WriteMultiEntry(0x100, 0, 4, b"\2" * 4)
            self.call(Command.REGION_WRITE_MULTI, wire.RegionWriteMulti((entry,)).encode())
        if f == "sends-dma-read":
            self.call(Command.DMA_READ, struct.pack("<QQ", RAM_BASE, 8))


def raw_client(fault: str) -> object:
    def run(path: str) -> None:
        client = RawClient(path, fault)
        try:
            client.run()
        finally:
            client.close()
    return run


#: for every client check, the misbehaviour it must catch
CLIENT_FAULT_FOR = {
    "client.version-first": "version-not-first",
    "client.version-format": "version-no-nul",
    "client.headers": "error-bit",
    "client.max-msg-fds": "two-fds",
    "client.fds-where-allowed": "fds-on-info",
    "client.max-xfer": "big-read",
    "client.access-format": "bad-write-len",
    "client.no-write-multi": "write-multi",
    "client.argsz": "small-argsz",
    "client.region-info-two-step": "no-two-step",
    "client.dma-map-format": "bad-dma-map",
    "client.set-irqs-format": "bad-set-irqs",
    "client.dma-write": "dma-write-error",
    "client.dma-read": "dma-read-zeros",
    "client.error-reply": "gives-up-after-error",
    "client.completes": "gives-up-after-error",
}
