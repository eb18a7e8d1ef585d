"""Find and check libvfio-user at run time (cffi ABI mode, no compiler).

libvfio-user promises no stable ABI (its soname stays ``.so.0`` and its
project version 0.0.1 whatever changes), and exports no version symbol, so
:func:`load` checks what can be checked before handing out the library:

1. every function in :data:`~xdevproto.lvu.cdef.FUNCTIONS` resolves (dlsym);
2. ``dma_sg_size()`` is plausible (the bindings allocate ``dma_sg_t`` arrays
   by that size);
3. a behaviour probe on a throw-away context: BAR sizes must be powers of
   two and ``VFU_REGION_FLAG_64_BITS`` (0x10) is accepted on BAR0. Both came
   with libvfio-user #832 (2026-03); older libraries take the 12 KiB region
   and refuse the flag. Libraries from that change on pass ``flags`` to
   ``vfu_sgl_read``/``vfu_sgl_write`` (#845) and use migration v2, the
   layouts the bindings declare.

Failures raise :class:`LibraryUnavailable` or :class:`AbiMismatch` with a
message saying what to do; nothing else in the package touches ``dlopen``.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from typing import Any

from cffi import FFI

from xdevproto.lvu import cdef

#: Name the dynamic loader resolves (override with $XDEV_LVU_LIBRARY, a path or name).
LIBRARY_NAME = "libvfio-user.so.0"
ENV_LIBRARY = "XDEV_LVU_LIBRARY"

_HOW_TO = ("build libvfio-user from https://github.com/nutanix/libvfio-user (meson), "
           "install it where the dynamic loader finds libvfio-user.so.0, or set "
           f"${ENV_LIBRARY} to the library's path")


class LibraryUnavailable(RuntimeError):
    """libvfio-user cannot be loaded at all."""


class AbiMismatch(RuntimeError):
    """The loaded libvfio-user is not the API these bindings were written for."""


ffi = FFI()
ffi.cdef(cdef.CDEF)

_lock = threading.Lock()
_lib: Any = None


def library_name() -> str:
    return os.environ.get(ENV_LIBRARY) or LIBRARY_NAME


def load() -> Any:
    """Return the checked library object (cached per process).

    Raises :class:`LibraryUnavailable` or :class:`AbiMismatch`.
    """
    global _lib
    with _lock:
        if _lib is None:
            name = library_name()
            try:
                lib = ffi.dlopen(name)
            except OSError as exc:
                raise LibraryUnavailable(f"cannot load {name}: {exc}; {_HOW_TO}") from exc
            check_abi(lib, name)
            _lib = lib
        return _lib


def library_path() -> str | None:
    """The file of the libvfio-user this process loaded (from
    /proc/self/maps), or None when it cannot be loaded."""
    if unavailable_reason() is not None:
        return None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[5:]
                if path and os.path.basename(path[0].strip()).startswith("libvfio-user.so"):
                    return path[0].strip()
    except OSError:
        pass
    return None


def unavailable_reason() -> str | None:
    """None when :func:`load` succeeds, else why not (for pytest skips)."""
    try:
        load()
    except (LibraryUnavailable, AbiMismatch) as exc:
        return str(exc)
    return None


def check_abi(lib: Any, name: str) -> None:
    missing = []
    for fn in cdef.FUNCTIONS:
        try:
            getattr(lib, fn)
        except AttributeError:
            missing.append(fn)
    if missing:
        raise AbiMismatch(f"{name} lacks {', '.join(missing)}: these bindings need the API of "
                          f"libvfio-user {cdef.WRITTEN_FOR} or later")
    sg_size = lib.dma_sg_size()
    if not 0 < sg_size <= 4096:
        raise AbiMismatch(f"{name}: dma_sg_size() is {sg_size}, not a plausible size")
    _probe_regions(lib, name)


def _probe_regions(lib: Any, name: str) -> None:
    """Tell a #832-or-later library from an older one by how it judges BARs."""
    with tempfile.TemporaryDirectory(prefix="xdev-lvu-probe-") as tmp:
        ctx = lib.vfu_create_ctx(cdef.TRANS_SOCK, os.path.join(tmp, "probe").encode(), 0,
                                 ffi.NULL, cdef.DEV_TYPE_PCI)
        if ctx == ffi.NULL:
            raise AbiMismatch(f"{name}: vfu_create_ctx failed in the ABI probe "
                              f"({errno.errorcode.get(ffi.errno, ffi.errno)})")
        try:
            if lib.vfu_pci_init(ctx, cdef.PciType.CONVENTIONAL, 0, 0) != 0:
                raise AbiMismatch(f"{name}: vfu_pci_init failed in the ABI probe")
            rw = int(cdef.RegionFlag.RW)
            odd = lib.vfu_setup_region(ctx, cdef.Region.BAR0, 0x3000, ffi.NULL, rw,
                                       ffi.NULL, 0, -1, 0)
            wide = lib.vfu_setup_region(ctx, cdef.Region.BAR0, 0x1000, ffi.NULL,
                                        rw | cdef.RegionFlag.MEM | cdef.RegionFlag.BITS_64,
                                        ffi.NULL, 0, -1, 0)
        finally:
            lib.vfu_destroy_ctx(ctx)
    if odd == 0 or wide != 0:
        raise AbiMismatch(f"{name} predates libvfio-user #832 (64-bit BARs, power-of-two BAR "
                          f"sizes): these bindings need {cdef.WRITTEN_FOR} or later")
