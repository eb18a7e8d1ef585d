"""The small interface between the Xen front end and Xen itself.

Everything above this line (ioreq server, guest memory, interrupts) talks
to a :class:`XenBackend`.  :class:`bridge.xen.libs.XenLibs` implements it
with the real libraries; :class:`bridge.xen.fake.FakeXen` implements it in
memory for tests.  The two differ only in these calls.

Shared pages are handed out as :class:`SharedMapping`: a writable
``memoryview`` plus the address of its first byte, which the atomics need.
A view is only valid until the mapping is closed; callers copy data in and
out and never keep views (a dangling view of an unmapped foreign page would
crash the process).
"""

from __future__ import annotations

from typing import Protocol


class SharedMapping(Protocol):
    """Pages shared with Xen or the guest."""

    @property
    def view(self) -> memoryview: ...
    @property
    def address(self) -> int: ...
    def close(self) -> None: ...


class XenBackend(Protocol):
    """libxendevicemodel + libxenforeignmemory + libxenevtchn, for one process."""

    # libxendevicemodel (tools/include/xendevicemodel.h)
    def create_ioreq_server(self, domid: int, handle_bufioreq: int) -> int: ...
    def get_ioreq_server_info(self, domid: int, server: int, want_gfns: bool,
                              want_buffered: bool
                              ) -> tuple[int | None, int | None, int | None]:
        """(ioreq gfn, bufioreq gfn, bufioreq port); gfns only if ``want_gfns``.

        Asking for gfns makes Xen place the pages in the guest physmap, where
        the guest can write them (XSA-199); after a resource mapping, ask
        only for the port (libxendevicemodel then sets XEN_DMOP_no_gfns).
        """
        ...
    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None: ...
    def destroy_ioreq_server(self, domid: int, server: int) -> None: ...
    def map_io_range(self, domid: int, server: int, is_mmio: bool,
                     start: int, end: int) -> None: ...
    def unmap_io_range(self, domid: int, server: int, is_mmio: bool,
                       start: int, end: int) -> None: ...
    def map_pcidev(self, domid: int, server: int, segment: int, bus: int,
                   device: int, function: int) -> None: ...
    def unmap_pcidev(self, domid: int, server: int, segment: int, bus: int,
                     device: int, function: int) -> None: ...
    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int,
                           intx: int, level: int) -> None: ...
    def inject_msi(self, domid: int, addr: int, data: int) -> None: ...
    def nr_vcpus(self, domid: int) -> int: ...

    # libxenforeignmemory (tools/include/xenforeignmemory.h)
    def map_resource(self, domid: int, rtype: int, rid: int, frame: int,
                     nr_frames: int) -> SharedMapping: ...
    def map_foreign(self, domid: int, gfns: list[int]) -> tuple[SharedMapping, list[int]]:
        """Map ``gfns`` read/write; returns the mapping and a per-page errno list (0 = ok)."""
        ...

    # libxenevtchn (tools/include/xenevtchn.h)
    def evtchn_fd(self) -> int: ...
    def bind_interdomain(self, domid: int, remote_port: int) -> int: ...
    def bind_unbound_port(self, domid: int) -> int:
        """A new local port that ``domid`` may bind (DOMID_SELF: this domain,
        for a loopback pair with :meth:`bind_interdomain`)."""
        ...
    def unbind(self, port: int) -> None: ...
    def pending(self) -> int | None:
        """The next pending local port, or None if nothing is pending (on a
        blocking event channel fd: waits for one)."""
        ...
    def unmask(self, port: int) -> None: ...
    def notify(self, port: int) -> None: ...
