"""What the vfio-user server runtime asks of a device model.

The runtime (``xdevproto.server``) owns the socket and the protocol; a device
implements :class:`Device`. The PCI framework (``xdevproto.pci``) implements
it once for every PCI device, so device authors rarely touch this layer.

Every method may raise :class:`~xdevproto.errors.DeviceError` (or any
:class:`~xdevproto.errors.VfioUserError`); its errno goes into the error
reply. Any other exception is a bug in the device: the runtime logs it and
answers EIO rather than letting it escape.

Threading: the runtime calls these methods from its one connection thread,
in message order. A device that does long work (disk or packet I/O) hands it
to worker threads and completes it asynchronously; workers reach guest memory
through :class:`DeviceContext`.
"""

from __future__ import annotations

import abc
import errno
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import DeviceError
from .wire import (
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    DeviceInfoFlags,
    IrqInfoFlags,
    MigrationFlags,
    MigState,
    RegionCap,
    RegionFlags,
)


@dataclass(frozen=True, slots=True)
class RegionDesc:
    """A region as the device describes it (answer to GET_REGION_INFO).

    ``fd`` (with ``fd_offset``) is passed to the client when ``MMAP`` is set;
    the device keeps ownership of it. ``caps`` are extra capabilities such as
    sparse mmap areas or a region type.
    """

    size: int
    flags: RegionFlags
    fd: int | None = None
    fd_offset: int = 0
    caps: tuple[RegionCap, ...] = ()


NO_REGION = RegionDesc(0, RegionFlags(0))


@dataclass(frozen=True, slots=True)
class IrqDesc:
    count: int
    flags: IrqInfoFlags = IrqInfoFlags.EVENTFD


@dataclass(frozen=True, slots=True)
class DmaRegion:
    """One DMA_MAP'ed range of guest memory.

    ``fd`` is ours to close once the region is unmapped (the runtime passes
    ownership); None means the memory is reachable only through DMA_READ/
    DMA_WRITE messages.
    """

    iova: int
    size: int
    readable: bool
    writable: bool
    fd: int | None = None
    fd_offset: int = 0


class DeviceContext(abc.ABC):
    """What the runtime gives a device while a client is attached.

    Safe to call from worker threads. Message DMA blocks until the client
    answered; it raises :class:`~xdevproto.errors.VfioUserError` when the
    client refused or went away.
    """

    @abc.abstractmethod
    def dma_read(self, iova: int, length: int) -> bytes:
        """DMA_READ over the socket (for regions mapped without an fd)."""

    @abc.abstractmethod
    def dma_write(self, iova: int, data: bytes | memoryview) -> None:
        """DMA_WRITE over the socket."""

    @property
    @abc.abstractmethod
    def max_data_xfer_size(self) -> int:
        """The largest single DMA message the client accepts."""

    @property
    def direct(self) -> bool:
        """Whether dma_read/dma_write reach guest memory without a message
        round trip (an xdev guest-memory extension): they never wait on
        the peer."""
        return False

    def file_io(self, fd: int, ranges: Sequence[tuple[int, int]], offset: int,
                to_guest: bool, flags: int = 0) -> int | None:
        """``preadv`` (``to_guest``) or ``pwritev`` between file ``fd`` at
        ``offset`` and the guest ranges (iova, length) of regions mapped
        without an fd, when the runtime reaches guest memory itself (an xdev
        guest-memory extension): the bytes moved, short at end of file. None
        when it cannot, and the caller uses messages. ``flags`` as for
        ``os.preadv`` (RWF_NOWAIT: BlockingIOError rather than wait)."""
        return None


#: a region's register read, ``read(offset, size) -> value`` (Device.region_int_access)
IntReader = Callable[[int, int], int]
#: a region's register write, ``write(offset, size, value)``
IntWriter = Callable[[int, int, int], None]


class Device(abc.ABC):
    """A vfio-user device (vfio-user spec, "Device information" onwards)."""

    #: answered by DEVICE_GET_INFO
    info_flags: DeviceInfoFlags = DeviceInfoFlags.RESET | DeviceInfoFlags.PCI
    num_regions: int = PCI_NUM_REGIONS
    num_irqs: int = PCI_NUM_IRQS
    #: DEVICE_FEATURE MIGRATION flags; 0 = the device cannot migrate
    migration_flags: MigrationFlags = MigrationFlags(0)

    # -- description -----------------------------------------------------
    @abc.abstractmethod
    def region(self, index: int) -> RegionDesc:
        """Describe region ``index`` (< num_regions); NO_REGION if absent."""

    @abc.abstractmethod
    def irq(self, index: int) -> IrqDesc:
        """Describe interrupt index ``index`` (< num_irqs)."""

    # -- accesses --------------------------------------------------------
    @abc.abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes; bounds were checked against region(index).size."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Write ``data``; bounds were checked against region(index).size."""

    def region_read_int(self, index: int, offset: int, size: int) -> int:
        """:meth:`region_read` of ``size`` (1-8) bytes as a little-endian
        number: what a CPU's register access wants (bridge.direct serves
        ioreqs through these). Override to spare the bytes in between."""
        return int.from_bytes(self.region_read(index, offset, size), "little")

    def region_write_int(self, index: int, offset: int, size: int, value: int) -> None:
        """:meth:`region_write` of ``value`` as ``size`` (1-8) little-endian bytes."""
        self.region_write(index, offset, value.to_bytes(size, "little"))

    def region_int_access(self, index: int) -> tuple[IntReader, IntWriter]:
        """:meth:`region_read_int` and :meth:`region_write_int` of region
        ``index`` as ``read(offset, size)`` and ``write(offset, size,
        value)``, for a caller that looks them up once and then calls them
        per access (bridge.direct does, whenever the guest's ranges change).
        Override to hand out something shorter; the pair serves as long as
        the device does."""
        return (functools.partial(self.region_read_int, index),
                functools.partial(self.region_write_int, index))

    # -- client session --------------------------------------------------
    def attach(self, ctx: DeviceContext) -> None:
        """A client connected and finished VERSION."""

    def detach(self) -> None:
        """The client went away: DMA regions and IRQ fds are already dropped
        (through dma_unmap_all / set_irqs); device state stays."""

    def dma_map(self, region: DmaRegion) -> None:
        """Add a DMA region; overlaps were refused by the runtime."""
        if region.fd is not None:


            os.close(region.fd)

    def dma_unmap(self, region: DmaRegion) -> None:
        """Drop a DMA region; return only once no DMA uses it any more."""

    def set_irqs(self, index: int, action: int, start: int, count: int,
                 fds: Sequence[int | None] | None, bools: bytes | None) -> None:
        """DEVICE_SET_IRQS, validated: ``action`` is one ACTION_* flag; with
        DATA_EVENTFD ``fds`` holds count fds (None de-assigns; the device owns
        the fds it keeps and closes the rest); with DATA_BOOL ``bools``; with
        DATA_NONE both are None. count == 0 with DATA_NONE disables all."""
        raise DeviceError("interrupts not supported", errno.EINVAL)

    def reset(self) -> None:
        """DEVICE_RESET."""

    # -- migration v2 ("DEVICE_FEATURE", "MIG_DATA_READ") -----------------
    def mig_state(self) -> MigState:
        return MigState.RUNNING

    def set_mig_state(self, state: MigState) -> None:
        raise DeviceError("migration not supported", errno.ENOTSUP)

    def mig_data_read(self, size: int) -> bytes:
        raise DeviceError("migration not supported", errno.ENOTSUP)

    def mig_data_write(self, data: bytes) -> None:
        raise DeviceError("migration not supported", errno.ENOTSUP)

    def dma_logging_start(self, page_size: int, ranges: Sequence[tuple[int, int]]) -> None:
        raise DeviceError("dirty logging not supported", errno.ENOTSUP)

    def dma_logging_stop(self) -> None:
        raise DeviceError("dirty logging not supported", errno.ENOTSUP)

    def dma_logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        """The bitmap for [iova, iova+length), cleared as it is reported."""
        raise DeviceError("dirty logging not supported", errno.ENOTSUP)
