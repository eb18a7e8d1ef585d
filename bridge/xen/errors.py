"""Typed errors of the Xen front end.

Two families, as STYLE.md asks: the local side broke something (a Xen call
failed, a library is missing, we lack privileges) and the guest broke the
ABI (an ioreq field, a ring pointer, a guest-physical address).  Guest
errors never escape the ioreq loop: the request is completed harmlessly
and logged.  Each error carries an errno so a caller serving a peer (for
example a DMA_READ from a device server) can put it into a reply.
"""

from __future__ import annotations

import errno as _errno


class XenError(Exception):
    """Base of every error raised by ``bridge.xen``."""

    errno: int = _errno.EIO


class XenUnavailable(XenError):
    """A Xen library or device node is missing: not a Xen host, or packages absent."""

    errno = _errno.ENOSYS


class XenPermissionError(XenError):
    """The process lacks device-model rights over the domain (EPERM/EACCES)."""

    errno = _errno.EPERM


class XenCallError(XenError):
    """A libxen* call failed; ``call`` names it and ``errno`` says why."""

    def __init__(self, call: str, err: int, detail: str = "") -> None:
        self.call = call
        self.errno = err
        msg = f"{call} failed: {_errno.errorcode.get(err, str(err))} ({err})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class DomainGone(XenCallError):
    """The guest domain no longer exists (ESRCH), e.g. it died under us."""


class GuestError(XenError):
    """The guest (or whoever can write the ioreq pages) broke the ABI."""

    errno = _errno.EINVAL


class InvalidIoreq(GuestError):
    """An ioreq or buffered ioreq field failed validation (XSA-199)."""

    def __init__(self, field: str, value: int, why: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"invalid ioreq: {field}={value:#x}: {why}")


class RingError(GuestError):
    """The buffered ioreq ring pointers are inconsistent."""


class GuestMemoryError(GuestError):
    """A guest-physical access outside mapped, valid guest RAM."""

    errno = _errno.EFAULT

    def __init__(self, gpa: int, length: int, why: str) -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest memory [{gpa:#x}, +{length:#x}): {why}")


class PrivilegeError(XenError):
    """Restricting the Xen handles or dropping root failed."""

    errno = _errno.EPERM
