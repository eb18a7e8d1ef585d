"""Give up privileges once the ioreq server is set up.

Order matters (QEMU's ``-xen-domid-restrict`` and xapi's varstored do the
same in spirit):

1. Open every Xen handle and the xenstore connection, create the ioreq
   server, map its pages, bind its ports.
2. :func:`restrict_to_domain`: ``xentoolcore_restrict_all(domid)`` limits
   every open libxen* handle of the process (privcmd, evtchn, ...) to the
   guest, so a compromised bridge can no longer touch other domains.
3. :func:`drop_root`: ``setgroups``, ``setgid``, ``setuid`` to an
   unprivileged user, then check that root cannot be regained.

Failure of either raises :class:`PrivilegeError`; the bridge must then
exit rather than run privileged.
"""

from __future__ import annotations

import errno
import os
import pwd
from dataclasses import dataclass
from typing import Protocol

from bridge.xen.errors import PrivilegeError, XenError


class Restrictable(Protocol):
    def restrict_all(self, domid: int) -> None: ...


def restrict_to_domain(xen: Restrictable, domid: int) -> None:
    """``xentoolcore_restrict_all(domid)`` on every handle the process holds."""
    try:
        xen.restrict_all(domid)
    except XenError as exc:
        raise PrivilegeError(f"cannot restrict Xen handles to domain {domid}: {exc}") from exc


class Credentials(Protocol):
    """The process-credential calls (``os`` implements them; tests record them)."""

    def getuid(self) -> int: ...
    def setgroups(self, groups: list[int], /) -> None: ...
    def setgid(self, gid: int, /) -> None: ...
    def setuid(self, uid: int, /) -> None: ...


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def lookup_user(user: str) -> Identity:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"no such user {user!r} to drop privileges to") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user {user!r} is root; pick an unprivileged user")
    return Identity(user, entry.pw_uid, entry.pw_gid)


def drop_root(identity: Identity, creds: Credentials = os) -> None:
    """Become ``identity`` for good: groups first, then gid, then uid."""
    if creds.getuid() == identity.uid:
        return
    if creds.getuid() != 0:
        raise PrivilegeError(f"not root (uid {creds.getuid()}): cannot become {identity.user}")
    try:
        creds.setgroups([])
        creds.setgid(identity.gid)
        creds.setuid(identity.uid)
    except OSError as exc:
        raise PrivilegeError(f"dropping root to {identity.user} failed: {exc}") from exc
    try:
        creds.setuid(0)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return
        raise PrivilegeError(f"unexpected error checking dropped privileges: {exc}") from exc
    raise PrivilegeError("root could be regained after setuid; refusing to continue")
