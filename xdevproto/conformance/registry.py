"""The two check catalogues, and payload shorthands the checks share."""

from __future__ import annotations

import json
import struct

from .. import wire
from ..wire import SetIrqsFlags
from .model import Registry

SERVER = Registry("server")
CLIENT = Registry("client")

RW_FLAGS = wire.DmaMapFlags.READ | wire.DmaMapFlags.WRITE
#: IOVAs used by the DMA checks: page aligned, far from zero
IOVA = 0x1_0000_0000
PAGE = 4096


def version_body(major: int = 0, minor: int = 2, text: bytes | None = None) -> bytes:
    """A VERSION payload; by default offering 8 fds per message."""
    if text is None:
        text = json.dumps({"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"
    return struct.pack("<HH", major, minor) + text


def dev_info(argsz: int = 16) -> bytes:
    return wire.DeviceInfo(argsz, 0, 0, 0).encode()


def region_info(index: int, argsz: int = 32) -> bytes:
    return wire.RegionInfo(argsz, 0, index, 0, 0, 0).encode()


def irq_info(index: int, argsz: int = 16) -> bytes:
    return wire.IrqInfo(argsz, 0, index, 0).encode()


def access(region: int, offset: int, count: int, data: bytes = b"") -> bytes:
    return wire.REGION_ACCESS.pack(offset, region, count) + data


def dma_map(address: int, size: int, flags: int = RW_FLAGS, offset: int = 0,
            argsz: int = 32) -> bytes:
    return wire.DmaMap(argsz, flags, offset, address, size).encode()


def dma_unmap(address: int, size: int, flags: int = 0, argsz: int = 24) -> bytes:
    return wire.DmaUnmap(argsz, flags, address, size).encode()


def set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"",
             argsz: int | None = None) -> bytes:
    size = wire.SetIrqs.SIZE + len(data)
    return wire.SetIrqs(size if argsz is None else argsz, flags, index, start, count,
                        data).encode()


EVENTFD_TRIGGER = SetIrqsFlags.DATA_EVENTFD | SetIrqsFlags.ACTION_TRIGGER
NONE_TRIGGER = SetIrqsFlags.DATA_NONE | SetIrqsFlags.ACTION_TRIGGER


def feature(flags: int, data: bytes = b"", room: int = 0, argsz: int | None = None) -> bytes:
    size = wire.DeviceFeature.SIZE + len(data) + room
    return wire.DeviceFeature(size if argsz is None else argsz, flags, data).encode()


def mig_state(state: int) -> bytes:
    return struct.pack("<Ii", state, -1)
