"""Many datagrams per system call: ``recvmmsg(2)`` for the datagram back end.

Python's socket module reads one datagram per call, so a NIC receiving
small-to-medium frames spends as much on system calls and interpreter work
per frame as on everything the device does with it. ``recvmmsg`` fills up
to :data:`SLOTS` buffers in one call; the frames are then copied out of
one preallocated area, as :func:`servers.e1000.backends._drain` does for one.

Loaded through cffi in ABI mode from the C library (no compiler at install
time); where that fails (no cffi, no ``recvmmsg``, a C library whose
``struct msghdr`` is not the one declared here), :func:`batch_reader`
returns None and the back end reads datagrams one by one.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from typing import Any

log = logging.getLogger(__name__)

#: Buffers filled per call (the back ends' RX_BATCH).
SLOTS = 64
#: Bytes per buffer: more than the longest frame an 8254x takes (16384 with
#: RCTL.LPE, SDM 13.4.22) and its FCS. A longer datagram arrives cut to this
#: and is still too long for any receive buffer, so the NIC drops and counts
#: it as oversize exactly as it would the whole datagram.
SLOT_BYTES = 16384 + 64

_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
struct msghdr {
    void *msg_name; unsigned int msg_namelen;
    struct iovec *msg_iov; size_t msg_iovlen;
    void *msg_control; size_t msg_controllen;
    int msg_flags;
};
struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
int recvmmsg(int sockfd, struct mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout);
"""


@functools.cache
def _load() -> tuple[Any, Any] | None:
    """(ffi, libc) with recvmmsg declared, or None where that fails."""
    try:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        # The layout declared above is glibc's on LP64 Linux; refuse others.
        if ffi.sizeof("struct msghdr") != 56 or ffi.sizeof("struct mmsghdr") != 64:
            raise OSError("struct msghdr is not the LP64 glibc one")
        libc = ffi.dlopen(None)
        libc.recvmmsg  # noqa: B018 - resolve now, not on the first frame
    except (ImportError, OSError, AttributeError) as exc:
        log.info("recvmmsg unavailable (%s): datagrams are read one at a time", exc)
        return None
    return ffi, libc


class BatchReader:
    """Reads up to :data:`SLOTS` datagrams from a socket per system call."""

    def __init__(self, sock: socket.socket, api: tuple[Any, Any]) -> None:
        ffi, self._libc = api
        self._fd = sock.fileno()
        self._area = bytearray(SLOTS * SLOT_BYTES)
        self._view = memoryview(self._area)
        base = ffi.from_buffer(self._area)
        self._keep = base  # the cdata pins the area's address for the iovecs
        self._iov = ffi.new("struct iovec[]", SLOTS)
        self._msgs = ffi.new("struct mmsghdr[]", SLOTS)
        for i in range(SLOTS):
            self._iov[i].iov_base = base + i * SLOT_BYTES
            self._iov[i].iov_len = SLOT_BYTES
            self._msgs[i].msg_hdr.msg_iov = self._iov + i
            self._msgs[i].msg_hdr.msg_iovlen = 1
        self._ffi = ffi

    def read(self, limit: int = SLOTS) -> list[bytes]:
        """The datagrams waiting, at most ``limit``; [] when none is (never
        blocks). Raises OSError for errors other than "nothing waiting"."""
        n = self._libc.recvmmsg(self._fd, self._msgs, min(limit, SLOTS), socket.MSG_DONTWAIT,
                                self._ffi.NULL)
        if n < 0:
            err = self._ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return []
            raise OSError(err, os.strerror(err))
        view, msgs = self._view, self._msgs
        return [view[i * SLOT_BYTES:i * SLOT_BYTES + msgs[i].msg_len].tobytes()
                for i in range(n)]


def batch_reader(sock: socket.socket) -> BatchReader | None:
    """A :class:`BatchReader` for ``sock``, or None where recvmmsg is unavailable."""
    api = _load()
    return BatchReader(sock, api) if api is not None else None
