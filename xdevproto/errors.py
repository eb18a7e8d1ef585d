"""Errors of the vfio-user stack.

Every error carries the errno that goes into the reply (vfio-user spec,
"Header": the error field of a reply with the Error bit set). Errors split by
who broke the rules:

* :class:`PeerProtocolError` -- the peer sent something the protocol forbids.
  The runtime answers with an error reply carrying ``errno``, or closes the
  connection when ``fatal`` is set (framing is lost, or the spec says so).
* :class:`LocalProtocolError` -- our own code tried to send something the
  protocol forbids (a bug on our side, or a caller's misuse of the API).
* :class:`DeviceError` -- a device model refuses an otherwise valid request
  (bad region index, access out of bounds, unsupported operation).
* :class:`RemoteError` -- the peer answered one of our requests with an error
  reply.
"""

from __future__ import annotations

import errno as _errno


class VfioUserError(Exception):
    """Base class; ``errno`` is what an error reply would carry."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class PeerProtocolError(VfioUserError):
    """The peer broke the protocol.

    ``fatal`` means the byte stream can no longer be trusted (bad header,
    impossible size, failed negotiation): the connection must be closed.
    """

    def __init__(self, message: str, errno: int = _errno.EINVAL, *, fatal: bool = False) -> None:
        super().__init__(message, errno)
        self.fatal = fatal


class LocalProtocolError(VfioUserError):
    """We were about to break the protocol."""


class DeviceError(VfioUserError):
    """A device model refused a request; the errno goes into the reply."""


class RemoteError(VfioUserError):
    """The peer answered our request with an error reply."""

    def __init__(self, command: int, errno: int) -> None:
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"command {command} failed on the peer: {name}", errno)
        self.command = command


class ConnectionClosed(VfioUserError):
    """The connection is gone (EOF, reset, or closed after a fatal error)."""

    errno = _errno.ENOTCONN
