"""A device server's own ioreq server: the guest's BAR accesses without the bridge.

Through the bridge, every register access the guest makes wakes three
processes (Xen to the bridge, the bridge to the server and back). A device
server started with ``--xen-ioreq`` (in a domain that may serve the guest's
ioreqs, e.g. dom0 beside the bridge) takes the xdev VERSION extension
``{"xdev": {"ioreq": {"kind": "xen", "domid": N}}}``. The bridge then keeps
one more ioreq server for the device, routes the device's BARs to it, and
sends XDEV_IOREQ_SERVE; the server maps that ioreq server's page, binds its
ports and answers its requests itself, as QEMU answers its own:

* the ranges of XDEV_IOREQ_SERVE say which guest addresses are which
  region; a request anywhere else is answered as unanswered (all-ones);
* the server drives the device's INTx line with ``set_pci_intx_level``
  itself meanwhile, since the bridge, which sees no BAR access, could not
  end a level-triggered interrupt (MSI and MSI-X still go through the
  bridge, which shadows their capabilities);
* ``rep``/``data_is_ptr`` strings and INVALIDATE are handled here as in
  the bridge, with a foreign mapping of the guest of this server's own.

The bridge owns the ioreq server (creates, enables, claims ranges on it,
destroys it). XDEV_IOREQ_RELEASE, or the end of the session, unbinds the
server and lowers its INTx line; if the server dies, the kernel closes its
ports and the bridge binds them itself, answering what the server left
unanswered.
"""

from __future__ import annotations

import bisect
import errno
import logging
import threading
from typing import Any

from bridge.xen.backend import XenBackend
from bridge.xen.errors import XenError
from bridge.xen.guestmem import GuestMemory
from bridge.xen.ioreq_server import IoreqServer
from xdevproto.device import Device, IntReader, IntWriter
from xdevproto.errors import DeviceError
from xdevproto.wire import IoreqRange, IoreqServe, PciRegion

log = logging.getLogger(__name__)

KIND = "xen"


# A range's end and its region's accessors.
_Bound = tuple[int, IntReader, IntWriter]


def offer(domid: int) -> dict[str, Any]:
    return {"kind": KIND, "domid": domid}


class _DeviceIo:
    """The ioreq server's handler: guest addresses to the device's regions.

    Every BAR access of the guest comes through here, so the ranges are
    kept as the loop wants them: per kind (MMIO or ports), the starts for
    one bisect and, beside each, its end and the region's number accessors
    (Device.region_int_access), looked up when the ranges change."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self._tables: dict[bool, tuple[list[int], list[_Bound]]] = \
            {True: ([], []), False: ([], [])}

    def set_ranges(self, ranges: tuple[IoreqRange, ...]) -> None:
        tables: dict[bool, tuple[list[int], list[_Bound]]] = {}
        for mmio in (True, False):
            ordered = sorted((r for r in ranges if r.mmio == mmio), key=lambda r: r.start)
            tables[mmio] = ([r.start for r in ordered],
                            [(r.start + r.size, *self.device.region_int_access(r.region))
                             for r in ordered])
        self._tables = tables  # one assignment: the serving thread sees old or new

    def _read(self, mmio: bool, addr: int, size: int) -> int:
        starts, bound = self._tables[mmio]
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            end, read, _ = bound[i]
            if addr + size <= end:
                return read(addr - starts[i], size)
        return (1 << (8 * size)) - 1  # nobody's: as if unanswered

    def _write(self, mmio: bool, addr: int, size: int, value: int) -> None:
        starts, bound = self._tables[mmio]
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            end, _, write = bound[i]
            if addr + size <= end:
                write(addr - starts[i], size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        return self._read(True, addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._write(True, addr, size, value)

    def pio_read(self, port: int, size: int) -> int:
        return self._read(False, port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._write(False, port, size, value)

    # Config space stays with the bridge: it is never routed here.
    def config_read(self, sbdf: int, reg: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def config_write(self, sbdf: int, reg: int, size: int, value: int) -> None:
        pass

    def invalidate(self) -> None:
        pass  # the ioreq server drops our guest mappings itself


class XenIoreqAttachment:
    """One session's side of the extension (see the module's docstring)."""

    def __init__(self, xen: XenBackend, domid: int, device: Device) -> None:
        self.xen = xen
        self.domid = domid
        self.device = device
        self.io = _DeviceIo(device)
        self.memory = GuestMemory(xen, domid)
        self.server: IoreqServer | None = None
        self.sbdf = 0
        self.pin = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def serve(self, request: IoreqServe) -> None:
        with self._lock:
            if self.server is not None and (self.server.id != request.ioservid
                                            or self.server.closed):
                self._release()
            self.io.set_ranges(request.ranges)
            if self.server is not None:
                return
            server = IoreqServer(self.xen, self.domid, self.io, memory=self.memory,
                                 nr_vcpus=request.nr_vcpus, attach_id=request.ioservid)
            try:
                server.start()
            except XenError as exc:
                raise DeviceError(f"cannot serve ioreq server {request.ioservid}: {exc}",
                                  errno.EIO) from None
            self.server, self.sbdf = server, request.sbdf
            # The interrupt pin register (1 = INTA); a device without one has no INTx.
            self.pin = self.device.region_read(PciRegion.CONFIG, 0x3D, 1)[0]
            self._stop = threading.Event()
            self._thread = threading.Thread(target=server.run, args=(self._stop,), daemon=True,
                                            name=f"xdev-ioreq-{request.ioservid}")
            self._thread.start()
            intr = getattr(self.device, "intr", None)
            if intr is not None and 1 <= self.pin <= 4:
                intr.set_line_sink(self._set_intx)
            log.info("serving ioreq server %d of domain %d myself: %s", request.ioservid,
                     self.domid, ", ".join(f"{'MMIO' if r.mmio else 'I/O'} "
                                           f"{r.start:#x}+{r.size:#x}=region {r.region}"
                                           for r in request.ranges) or "no ranges yet")

    def _set_intx(self, level: bool) -> None:
        """The device's INTx line, as the bridge would set it."""
        s = self.sbdf
        try:
            self.xen.set_pci_intx_level(self.domid, s >> 16, (s >> 8) & 0xFF, (s >> 3) & 0x1F,
                                        self.pin - 1, int(level))
        except XenError as exc:
            log.warning("INTx level %d not set: %s", level, exc)

    def release(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        intr = getattr(self.device, "intr", None)
        if intr is not None:
            intr.set_line_sink(None)  # lowers our line, gives INTx back to the eventfd
        server, self.server = self.server, None
        if server is None:
            return
        self._stop.set()
        server.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        server.close()  # unbinds and unmaps; the bridge owns the server
        self.memory.invalidate()
        st = server.stats
        log.info("stopped serving ioreq server %s of domain %d: %d requests, %.3f s CPU "
                 "on the serving thread (%.0f us each)", server.id, self.domid, st.handled,
                 st.cpu_seconds, st.cpu_seconds / max(1, st.handled) * 1e6)


def xen_ioreq(params: dict[str, Any], device: Device) -> XenIoreqAttachment:
    """A device server's attacher for the bridge's offer."""
    from bridge.xen.libs import XenLibs

    domid = params.get("domid")
    if isinstance(domid, bool) or not isinstance(domid, int) or not 0 < domid < 0x7FF0:
        raise ValueError(f"bad domid {domid!r} in the ioreq offer")
    return XenIoreqAttachment(XenLibs(), domid, device)


IOREQ_ATTACHERS = {KIND: xen_ioreq}
