"""Carry out one validated ioreq against an :class:`IoHandler`.

Semantics follow ioreq.h and what QEMU's Xen device model does with each
type (hw/xen/xen-hvm-common.c, cpu_ioreq_pio / cpu_ioreq_move /
cpu_ioreq_config):

* PIO: the port stays fixed for every element of a string (``rep ins/outs``).
* COPY (MMIO): element ``i`` is at ``addr + i*step``; without
  ``data_is_ptr`` a write stores the same value ``count`` times
  (``rep stos``) and a read returns the last element read.
* ``data_is_ptr``: ``data`` is the guest-physical address of element 0 and
  element ``i`` lives at ``data + i*step``; reads store into guest memory,
  writes load from it.  ``step`` is ``-size`` when the direction flag is set.
* PCI_CONFIG: ``addr >> 32`` is the SBDF, the low 32 bits the register.

The handler is called once per element; validation already bounded
``count``, so the total work of one request is bounded too.
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.xen.abi import Ioreq, IoreqDir, IoreqType, size_mask
from bridge.xen.errors import GuestMemoryError
from bridge.xen.guestmem import GuestMemory
from bridge.xen.handler import IoHandler


def _element_access(req: Ioreq, handler: IoHandler) -> tuple[Callable[[int], int],
                                                             Callable[[int, int], None]]:
    """(read element i, write element i) for the request's address space."""
    size = req.size
    if req.type is IoreqType.PIO:
        port = req.addr
        return (lambda i: handler.pio_read(port, size),
                lambda i, v: handler.pio_write(port, size, v))
    if req.type is IoreqType.COPY:
        addr, step = req.addr, req.step
        return (lambda i: handler.mmio_read(addr + i * step, size),
                lambda i, v: handler.mmio_write(addr + i * step, size, v))
    sbdf, reg = req.sbdf, req.reg
    return (lambda i: handler.config_read(sbdf, reg, size),
            lambda i, v: handler.config_write(sbdf, reg, size, v))


def execute(req: Ioreq, handler: IoHandler, memory: GuestMemory | None) -> int | None:
    """Perform ``req``; return the value for ``ioreq.data`` (reads without a pointer) or None.

    INVALIDATE and TIMEOFFSET are the server's business and are not
    accepted here.  Raises :class:`GuestMemoryError` if a string touches
    memory that is not guest RAM; elements before it have been done.
    """
    if req.type not in (IoreqType.PIO, IoreqType.COPY, IoreqType.PCI_CONFIG):
        raise ValueError(f"{req.type.name} is handled by the ioreq server")
    mask = size_mask(req.size)
    if req.count == 1 and not req.data_is_ptr and req.type is IoreqType.COPY:
        # A plain register access, nearly every request: no per-element machinery.
        if req.dir is IoreqDir.READ:
            return handler.mmio_read(req.addr, req.size) & mask
        handler.mmio_write(req.addr, req.size, req.data & mask)
        return None
    read, write = _element_access(req, handler)
    if req.data_is_ptr and memory is None:
        raise GuestMemoryError(req.data, req.size * req.count, "no guest memory mapping")
    result: int | None = None
    for i in range(req.count):
        if req.dir is IoreqDir.READ:
            value = read(i) & mask
            if req.data_is_ptr:
                assert memory is not None
                memory.write(req.data + i * req.step, value.to_bytes(req.size, "little"))
            else:
                result = value
        else:
            if req.data_is_ptr:
                assert memory is not None
                value = int.from_bytes(memory.read(req.data + i * req.step, req.size), "little")
            else:
                value = req.data
            write(i, value & mask)
    return result
