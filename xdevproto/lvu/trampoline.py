"""C callbacks that work where write+execute memory is forbidden.

cffi's ABI-mode ``ffi.callback`` needs a page that is writable and executable
(its closures are built at run time). systemd's ``MemoryDenyWriteExecute=yes``
and the kernel's ``PR_SET_MDWE`` (prctl(2)) forbid such pages, and the call
fails with ``MemoryError`` (checked: cffi 2.0.0 under PR_SET_MDWE on Linux
6.18). ctypes callbacks go through the system's libffi, whose static
trampolines (libffi >= 3.4 on x86-64 and AArch64 Linux) need no such page.

:func:`make_callback` tries cffi first (faster calls) and falls back to a
ctypes callback cast to the cffi function-pointer type, with every argument
converted back to the cffi type the Python function expects, so callers
cannot tell the difference. errno set with ``ffi.errno`` inside the function
is handed to C in both cases.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from xdevproto.lvu.loader import ffi

_INTS = {(1, False): ctypes.c_uint8, (1, True): ctypes.c_int8,
         (2, False): ctypes.c_uint16, (2, True): ctypes.c_int16,
         (4, False): ctypes.c_uint32, (4, True): ctypes.c_int32,
         (8, False): ctypes.c_uint64, (8, True): ctypes.c_int64}


class CallbacksUnavailable(RuntimeError):
    """Neither cffi nor ctypes could make a C callback in this process."""


def _ctypes_of(t: Any) -> Any:
    if t.kind == "pointer":
        return ctypes.c_void_p
    if t.kind == "primitive":
        if t.cname == "_Bool":
            return ctypes.c_bool
        signed = int(ffi.cast(t, -1)) < 0
        return _INTS[(ffi.sizeof(t), signed)]
    if t.kind == "void":
        return None
    raise TypeError(f"no ctypes equivalent for {t.cname}")


def _via_ctypes(ctype: str, fn: Callable[..., Any], error: int | None) -> tuple[Any, Any]:
    ftype = ffi.typeof(ctype)
    if ftype.kind == "pointer":
        ftype = ftype.item
    args = ftype.args
    proto = ctypes.CFUNCTYPE(_ctypes_of(ftype.result), *(_ctypes_of(a) for a in args),
                             use_errno=True)

    def call(*raw: Any) -> Any:
        ffi.errno = 0
        try:
            conv = [ffi.cast(t, v or 0) if t.kind == "pointer" else v
                    for t, v in zip(args, raw, strict=True)]
            result = fn(*conv)
        except BaseException:
            result = error
        ctypes.set_errno(ffi.errno)  # ctypes puts it in the C errno on return
        return result

    cfunc = proto(call)
    return ffi.cast(ctype, ctypes.cast(cfunc, ctypes.c_void_p).value), cfunc


_cffi_works = True


def make_callback(ctype: str, fn: Callable[..., Any], error: int | None = -1) -> tuple[Any, Any]:
    """A C function pointer of type ``ctype`` calling ``fn``, and what to keep alive."""
    global _cffi_works
    if _cffi_works:
        try:
            cb = (ffi.callback(ctype, fn) if error is None
                  else ffi.callback(ctype, fn, error=error))
            return cb, cb
        except MemoryError:
            _cffi_works = False
    try:
        return _via_ctypes(ctype, fn, error)
    except MemoryError as exc:
        raise CallbacksUnavailable(
            "cannot create C callbacks for libvfio-user: this process forbids "
            "write+execute memory (systemd MemoryDenyWriteExecute=yes or PR_SET_MDWE) and "
            "the system libffi has no static trampolines; relax MemoryDenyWriteExecute for "
            "--engine libvfio-user") from exc
