"""cffi (ABI mode) bindings to Xen's stable tool libraries, as a :class:`XenBackend`.

The declarations below are written from the prototypes in Xen 4.17's
``tools/include/xendevicemodel.h``, ``xenforeignmemory.h``,
``xenevtchn.h`` and ``xentoolcore.h`` (Debian ``libxen-dev``).  The
libraries are opened with ``ffi.dlopen`` at run time from their sonames
(Debian packages ``libxendevicemodel1``, ``libxenforeignmemory1``,
``libxenevtchn1``, ``libxentoolcore1``), so nothing is compiled at install.

Errors: a missing library raises :class:`XenUnavailable` naming it; a
handle that cannot be opened raises :class:`XenUnavailable` (no
``/dev/xen/privcmd``: not a Xen domain) or :class:`XenPermissionError`
(not root, or no device-model rights over the guest: dm_op is XSM_DM_PRIV,
allowed to the control domain or a domain whose target is the guest);
failed calls raise :class:`XenCallError` with the call's name and errno,
or :class:`DomainGone` for ESRCH.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import sys
from typing import Any

from bridge.xen.abi import PAGE_SIZE
from bridge.xen.errors import (
    DomainGone,
    XenCallError,
    XenError,
    XenPermissionError,
    XenUnavailable,
)

CDEF = """
typedef uint16_t domid_t;
typedef uint16_t ioservid_t;
typedef uint32_t evtchn_port_t;
typedef uint64_t xen_pfn_t;      /* unsigned long on x86_64, uint64_t on Arm: 64 bits on both */
typedef int xenevtchn_port_or_error_t;
struct xentoollog_logger;

typedef struct xendevicemodel_handle xendevicemodel_handle;
xendevicemodel_handle *xendevicemodel_open(struct xentoollog_logger *logger,
                                           unsigned int open_flags);
int xendevicemodel_close(xendevicemodel_handle *dmod);
int xendevicemodel_create_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                       int handle_bufioreq, ioservid_t *id);
int xendevicemodel_get_ioreq_server_info(xendevicemodel_handle *dmod, domid_t domid,
                                         ioservid_t id, xen_pfn_t *ioreq_gfn,
                                         xen_pfn_t *bufioreq_gfn,
                                         evtchn_port_t *bufioreq_port);
int xendevicemodel_map_io_range_to_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                                ioservid_t id, int is_mmio,
                                                uint64_t start, uint64_t end);
int xendevicemodel_unmap_io_range_from_ioreq_server(xendevicemodel_handle *dmod,
                                                    domid_t domid, ioservid_t id,
                                                    int is_mmio, uint64_t start,
                                                    uint64_t end);
int xendevicemodel_map_pcidev_to_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                              ioservid_t id, uint16_t segment,
                                              uint8_t bus, uint8_t device,
                                              uint8_t function);
int xendevicemodel_unmap_pcidev_from_ioreq_server(xendevicemodel_handle *dmod,
                                                  domid_t domid, ioservid_t id,
                                                  uint16_t segment, uint8_t bus,
                                                  uint8_t device, uint8_t function);
int xendevicemodel_destroy_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                        ioservid_t id);
int xendevicemodel_set_ioreq_server_state(xendevicemodel_handle *dmod, domid_t domid,
                                          ioservid_t id, int enabled);
int xendevicemodel_set_pci_intx_level(xendevicemodel_handle *dmod, domid_t domid,
                                      uint16_t segment, uint8_t bus, uint8_t device,
                                      uint8_t intx, unsigned int level);
int xendevicemodel_inject_msi(xendevicemodel_handle *dmod, domid_t domid,
                              uint64_t msi_addr, uint32_t msi_data);
int xendevicemodel_nr_vcpus(xendevicemodel_handle *dmod, domid_t domid,
                            unsigned int *vcpus);

typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef struct xenforeignmemory_resource_handle xenforeignmemory_resource_handle;
xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger,
                                               unsigned open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot,
                           size_t pages, const xen_pfn_t arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages);
xenforeignmemory_resource_handle *xenforeignmemory_map_resource(
    xenforeignmemory_handle *fmem, domid_t domid, unsigned int type, unsigned int id,
    unsigned long frame, unsigned long nr_frames, void **paddr, int prot, int flags);
int xenforeignmemory_unmap_resource(xenforeignmemory_handle *fmem,
                                    xenforeignmemory_resource_handle *fres);

typedef struct xenevtchn_handle xenevtchn_handle;
xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);

int xentoolcore_restrict_all(domid_t domid);
"""

SONAMES = {
    "devicemodel": ("libxendevicemodel.so.1", "libxendevicemodel1"),
    "foreignmemory": ("libxenforeignmemory.so.1", "libxenforeignmemory1"),
    "evtchn": ("libxenevtchn.so.1", "libxenevtchn1"),
    "toolcore": ("libxentoolcore.so.1", "libxentoolcore1"),
}
_PRIVILEGE_HINT = ("run as root in dom0, or in a domain with device-model rights over the "
                   "guest (XSM_DM_PRIV: the control domain or a domain whose target is it)")

_ffi: Any = None
_libs: dict[str, Any] = {}


def load_libraries() -> tuple[Any, dict[str, Any]]:
    """dlopen the four libraries once; a clear error names the one missing."""
    global _ffi
    if _ffi is None:
        try:
            import cffi
        except ImportError as exc:
            raise XenUnavailable("the cffi package is required for the Xen bindings") from exc
        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        libs = {}
        for key, (soname, package) in SONAMES.items():
            try:
                libs[key] = ffi.dlopen(soname)
            except OSError as exc:
                raise XenUnavailable(
                    f"cannot load {soname} (Debian package {package}): {exc}") from exc
        _ffi = ffi
        _libs.update(libs)
    return _ffi, _libs


# Linux's evtchn device (linux/include/uapi/xen/evtchn.h): ports are
# evtchn_port_t (uint32_t) in the machine's byte order, and
# IOCTL_EVTCHN_NOTIFY is _IOC(_IOC_NONE, 'E', 4, sizeof(struct
# ioctl_evtchn_notify { unsigned int port; })). Checked against the header
# by tests/bridge/xen/test_xen_abi_probe.py.
EVTCHN_PORT_SIZE = 4
IOCTL_EVTCHN_NOTIFY = (0 << 30) | (4 << 16) | (ord("E") << 8) | 4


def check_result(call: str, ok: bool, detail: str = "") -> None:
    """Raise the typed error for a failed call, reading errno right after it."""
    if not ok:
        raise call_error(call, _ffi.errno if _ffi is not None else errno.EIO, detail)


def call_error(call: str, err: int, detail: str = "") -> XenError:
    """The typed error for ``call`` failing with ``err``."""
    if err in (errno.EPERM, errno.EACCES):
        return XenPermissionError(f"{call}: permission denied; {_PRIVILEGE_HINT}")
    if err == errno.ESRCH:
        return DomainGone(call, err, detail or "no such domain")
    return XenCallError(call, err, detail)


def _open_handle(call: str, fn: Any) -> Any:
    handle = fn(_ffi.NULL, 0)
    if handle == _ffi.NULL:
        err = _ffi.errno
        if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise XenUnavailable(f"{call}: no Xen device nodes (/dev/xen/privcmd, "
                                 f"/dev/xen/evtchn): not running in a Xen domain")
        check_result(call, False)
    return handle


class _Mapping:
    """A foreign or resource mapping; ``close`` unmaps it exactly once."""

    def __init__(self, ptr: Any, nbytes: int, unmap: Any) -> None:
        self._view: memoryview | None = memoryview(_ffi.buffer(ptr, nbytes))
        self._address = int(_ffi.cast("uintptr_t", ptr))
        self._unmap = unmap

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("mapping is closed")
        return self._view

    @property
    def address(self) -> int:
        return self._address

    def close(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
            self._unmap()


class XenLibs:
    """The real :class:`~bridge.xen.backend.XenBackend`: one handle per library."""

    def __init__(self) -> None:
        ffi, libs = load_libraries()
        self._dm = libs["devicemodel"]
        self._fm = libs["foreignmemory"]
        self._ev = libs["evtchn"]
        self._tc = libs["toolcore"]
        self._dmh = _open_handle("xendevicemodel_open", self._dm.xendevicemodel_open)
        self._fmh = _open_handle("xenforeignmemory_open", self._fm.xenforeignmemory_open)
        self._evh = _open_handle("xenevtchn_open", self._ev.xenevtchn_open)
        self._ffi = ffi
        # libxenevtchn opens /dev/xen/evtchn blocking; a non-blocking fd lets
        # pending() drain every port after one poll and return None when empty.
        fd = self.evtchn_fd()
        os.set_blocking(fd, False)
        # On Linux the per-request calls go to that fd directly (see pending()).
        self._evfd = fd if sys.platform == "linux" else None

    def close(self) -> None:
        for handle, closer in ((self._evh, self._ev.xenevtchn_close),
                               (self._fmh, self._fm.xenforeignmemory_close),
                               (self._dmh, self._dm.xendevicemodel_close)):
            if handle is not None:
                closer(handle)
        self._evh = self._fmh = self._dmh = None

    def restrict_all(self, domid: int) -> None:
        """``xentoolcore_restrict_all``: every open handle may only touch ``domid``."""
        check_result("xentoolcore_restrict_all", self._tc.xentoolcore_restrict_all(domid) == 0)

    # -- libxendevicemodel -------------------------------------------------
    def create_ioreq_server(self, domid: int, handle_bufioreq: int) -> int:
        sid = self._ffi.new("ioservid_t *")
        rc = self._dm.xendevicemodel_create_ioreq_server(self._dmh, domid, handle_bufioreq, sid)
        check_result("xendevicemodel_create_ioreq_server", rc == 0, f"domain {domid}")
        return int(sid[0])

    def get_ioreq_server_info(self, domid: int, server: int, want_gfns: bool,
                              want_buffered: bool
                              ) -> tuple[int | None, int | None, int | None]:
        null = self._ffi.NULL
        gfn = self._ffi.new("xen_pfn_t *") if want_gfns else null
        bgfn = self._ffi.new("xen_pfn_t *") if want_gfns and want_buffered else null
        bport = self._ffi.new("evtchn_port_t *") if want_buffered else null
        rc = self._dm.xendevicemodel_get_ioreq_server_info(self._dmh, domid, server, gfn,
                                                           bgfn, bport)
        check_result("xendevicemodel_get_ioreq_server_info", rc == 0)
        return (int(gfn[0]) if gfn != null else None, int(bgfn[0]) if bgfn != null else None,
                int(bport[0]) if bport != null else None)

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None:
        rc = self._dm.xendevicemodel_set_ioreq_server_state(self._dmh, domid, server,
                                                            int(enabled))
        check_result("xendevicemodel_set_ioreq_server_state", rc == 0)

    def destroy_ioreq_server(self, domid: int, server: int) -> None:
        rc = self._dm.xendevicemodel_destroy_ioreq_server(self._dmh, domid, server)
        check_result("xendevicemodel_destroy_ioreq_server", rc == 0)

    def map_io_range(self, domid: int, server: int, is_mmio: bool, start: int,
                     end: int) -> None:
        rc = self._dm.xendevicemodel_map_io_range_to_ioreq_server(
            self._dmh, domid, server, int(is_mmio), start, end)
        check_result("xendevicemodel_map_io_range_to_ioreq_server", rc == 0,
                     f"{'mmio' if is_mmio else 'pio'} [{start:#x}, {end:#x}]")

    def unmap_io_range(self, domid: int, server: int, is_mmio: bool, start: int,
                       end: int) -> None:
        rc = self._dm.xendevicemodel_unmap_io_range_from_ioreq_server(
            self._dmh, domid, server, int(is_mmio), start, end)
        check_result("xendevicemodel_unmap_io_range_from_ioreq_server", rc == 0)

    def map_pcidev(self, domid: int, server: int, segment: int, bus: int, device: int,
                   function: int) -> None:
        rc = self._dm.xendevicemodel_map_pcidev_to_ioreq_server(
            self._dmh, domid, server, segment, bus, device, function)
        check_result("xendevicemodel_map_pcidev_to_ioreq_server", rc == 0)

    def unmap_pcidev(self, domid: int, server: int, segment: int, bus: int, device: int,
                     function: int) -> None:
        rc = self._dm.xendevicemodel_unmap_pcidev_from_ioreq_server(
            self._dmh, domid, server, segment, bus, device, function)
        check_result("xendevicemodel_unmap_pcidev_from_ioreq_server", rc == 0)

    def set_pci_intx_level(self, domid: int, segment: int, bus: int, device: int,
                           intx: int, level: int) -> None:
        rc = self._dm.xendevicemodel_set_pci_intx_level(self._dmh, domid, segment, bus,
                                                        device, intx, level)
        check_result("xendevicemodel_set_pci_intx_level", rc == 0)

    def inject_msi(self, domid: int, addr: int, data: int) -> None:
        rc = self._dm.xendevicemodel_inject_msi(self._dmh, domid, addr, data)
        check_result("xendevicemodel_inject_msi", rc == 0)

    def nr_vcpus(self, domid: int) -> int:
        out = self._ffi.new("unsigned int *")
        rc = self._dm.xendevicemodel_nr_vcpus(self._dmh, domid, out)
        check_result("xendevicemodel_nr_vcpus", rc == 0)
        return int(out[0])

    # -- libxenforeignmemory -----------------------------------------------
    def map_resource(self, domid: int, rtype: int, rid: int, frame: int,
                     nr_frames: int) -> _Mapping:
        addr = self._ffi.new("void **")
        fres = self._fm.xenforeignmemory_map_resource(
            self._fmh, domid, rtype, rid, frame, nr_frames, addr,
            mmap.PROT_READ | mmap.PROT_WRITE, 0)
        check_result("xenforeignmemory_map_resource", fres != self._ffi.NULL)
        fm, fmh = self._fm, self._fmh
        return _Mapping(addr[0], nr_frames * PAGE_SIZE,
                        lambda: fm.xenforeignmemory_unmap_resource(fmh, fres))

    def map_foreign(self, domid: int, gfns: list[int]) -> tuple[_Mapping, list[int]]:
        n = len(gfns)
        arr = self._ffi.new("xen_pfn_t[]", gfns)
        err = self._ffi.new("int[]", n)
        ptr = self._fm.xenforeignmemory_map(self._fmh, domid,
                                            mmap.PROT_READ | mmap.PROT_WRITE, n, arr, err)
        check_result("xenforeignmemory_map", ptr != self._ffi.NULL,
                     f"{n} pages from gfn {gfns[0]:#x}" if gfns else "")
        fm, fmh = self._fm, self._fmh
        mapping = _Mapping(ptr, n * PAGE_SIZE, lambda: fm.xenforeignmemory_unmap(fmh, ptr, n))
        return mapping, [abs(int(e)) for e in err]

    # -- libxenevtchn ------------------------------------------------------
    def evtchn_fd(self) -> int:
        return int(self._ev.xenevtchn_fd(self._evh))

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        port = self._ev.xenevtchn_bind_interdomain(self._evh, domid, remote_port)
        check_result("xenevtchn_bind_interdomain", port >= 0, f"remote port {remote_port}")
        return int(port)

    def bind_unbound_port(self, domid: int) -> int:
        port = self._ev.xenevtchn_bind_unbound_port(self._evh, domid)
        check_result("xenevtchn_bind_unbound_port", port >= 0, f"for domain {domid}")
        return int(port)

    def unbind(self, port: int) -> None:
        check_result("xenevtchn_unbind", self._ev.xenevtchn_unbind(self._evh, port) == 0)

    # pending, unmask and notify run for every request an ioreq server
    # serves. libxenevtchn's Linux back end makes each one system call on
    # its fd, to the evtchn device (linux/include/uapi/xen/evtchn.h): read(2)
    # hands out pending ports (each masked as it is reported), write(2) of
    # ports unmasks them, IOCTL_EVTCHN_NOTIFY notifies. On Linux they are
    # made here directly: the same system calls without libffi setting up
    # a call each time, which in an emulated dom0 is a noticeable part of a
    # register round trip. Elsewhere, the library.
    def pending(self) -> int | None:
        fd = self._evfd
        if fd is None:
            return self._lib_pending()
        try:
            data = os.read(fd, EVTCHN_PORT_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise call_error("xenevtchn_pending", exc.errno or errno.EIO) from None
        if len(data) != EVTCHN_PORT_SIZE:
            raise XenCallError("xenevtchn_pending", errno.EIO, f"read {len(data)} bytes")
        return int.from_bytes(data, sys.byteorder)

    def unmask(self, port: int) -> None:
        fd = self._evfd
        if fd is None:
            if self._ev.xenevtchn_unmask(self._evh, port) != 0:
                check_result("xenevtchn_unmask", False)
            return
        try:
            os.write(fd, port.to_bytes(EVTCHN_PORT_SIZE, sys.byteorder))
        except OSError as exc:
            raise call_error("xenevtchn_unmask", exc.errno or errno.EIO, f"port {port}") from None

    def notify(self, port: int) -> None:
        fd = self._evfd
        if fd is None:
            if self._ev.xenevtchn_notify(self._evh, port) != 0:
                check_result("xenevtchn_notify", False)
            return
        try:
            fcntl.ioctl(fd, IOCTL_EVTCHN_NOTIFY, port.to_bytes(EVTCHN_PORT_SIZE, sys.byteorder))
        except OSError as exc:
            raise call_error("xenevtchn_notify", exc.errno or errno.EIO, f"port {port}") from None

    def _lib_pending(self) -> int | None:
        port = self._ev.xenevtchn_pending(self._evh)
        if port < 0:
            if self._ffi.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            check_result("xenevtchn_pending", False)
        return int(port)
