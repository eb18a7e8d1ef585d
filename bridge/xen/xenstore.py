"""Xenstore: find the guest, read its vCPUs, notice its death, publish the bridge.

Uses ``pyxs`` (xenstored's UNIX socket, or ``/dev/xen/xenbus``).  Open the
connection before dropping privileges: the socket is root-only.

Reading (docs/misc/xenstore-paths.pandoc in Xen):

* ``/local/domain/<domid>/name``: the domain's name (``xl create`` sets it).
* ``/local/domain/<domid>/cpu/<N>/availability``: one entry per vCPU.
* ``/local/domain/<domid>/control/shutdown``: a pending shutdown request.
* ``@releaseDomain``: a special watch that fires whenever any domain is
  released; ``XS_IS_DOMAIN_INTRODUCED`` then tells whether ours is gone.

Publishing — xdev's own subtree, written by the bridge, under the domain
the bridge runs in (``0`` for dom0), one directory per guest::

    /local/domain/<bridge-domid>/xdev/<guest-domid>/
        state           initialising | running | closing | closed
        pid             the bridge process id
        ioreq-server    the ioreq server id Xen gave us
        devices/<SSSS-BB-DD-F>/   (xenstore node names allow no ":" or ".")
            server      where the device server is (e.g. unix:/run/xdev/ahci.sock)
            state       connected | disconnected

Nodes are created with xenstored's default permissions (owner only), so a
guest cannot read or forge them.  ``close`` sets ``state`` to ``closed``
and removes ``devices``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from bridge.xen.errors import XenError, XenUnavailable

log = logging.getLogger(__name__)
RELEASE_DOMAIN = b"@releaseDomain"
BRIDGE_STATES = ("initialising", "running", "closing", "closed")
DEVICE_STATES = ("connected", "disconnected")


class XsClient(Protocol):
    """The part of ``pyxs.Client`` this module uses."""

    def read(self, path: bytes, default: bytes | None = None) -> bytes: ...
    def write(self, path: bytes, value: bytes) -> None: ...
    def list(self, path: bytes) -> list[bytes]: ...
    def delete(self, path: bytes) -> None: ...
    def is_domain_introduced(self, domid: int) -> bool: ...


def bridge_path(bridge_domid: int, guest_domid: int) -> bytes:
    """The documented root of the bridge's subtree for one guest."""
    return f"/local/domain/{bridge_domid}/xdev/{guest_domid}".encode()


def connect(socket_path: str | None = None) -> Any:
    """A connected ``pyxs.Client`` (``socket_path`` or pyxs's default location)."""
    try:
        import pyxs
    except ImportError as exc:
        raise XenUnavailable("the pyxs package is required for xenstore access") from exc
    client = pyxs.Client(unix_socket_path=socket_path) if socket_path else pyxs.Client()
    try:
        client.connect()
    except (OSError, pyxs.PyXSError) as exc:
        raise XenUnavailable(f"cannot reach xenstored: {exc}") from exc
    return client


class XenStore:
    """Guest lookup and the bridge's published state, over one client."""

    def __init__(self, client: XsClient, bridge_domid: int = 0) -> None:
        self._xs = client
        self._bridge_domid = bridge_domid

    # -- reading -------------------------------------------------------------
    def resolve_domain(self, name_or_id: str) -> int:
        """A domain id from a name or a decimal id; the domain must exist."""
        if name_or_id.isdecimal():
            domid = int(name_or_id)
            if not self.domain_exists(domid):
                raise XenError(f"no domain with id {domid}")
            return domid
        matches = []
        for entry in self._xs.list(b"/local/domain"):
            if not entry.isdigit():
                continue
            name = self._xs.read(b"/local/domain/" + entry + b"/name", b"")
            if name.decode(errors="replace") == name_or_id:
                matches.append(int(entry))
        if len(matches) != 1:
            raise XenError(f"domain name {name_or_id!r} matches {len(matches)} domains")
        return matches[0]

    def vcpu_count(self, domid: int) -> int:
        """vCPUs the toolstack created (entries under ``cpu/``)."""
        entries = self._xs.list(f"/local/domain/{domid}/cpu".encode())
        count = sum(1 for e in entries if e.isdigit())
        if count == 0:
            raise XenError(f"domain {domid} lists no vCPUs in xenstore")
        return count

    def domain_exists(self, domid: int) -> bool:
        return bool(self._xs.is_domain_introduced(domid))

    def domain_state(self, domid: int) -> str:
        """``gone``, ``shutdown:<reason>`` (a request is pending) or ``running``."""
        if not self.domain_exists(domid):
            return "gone"
        request = self._xs.read(f"/local/domain/{domid}/control/shutdown".encode(), b"")
        return f"shutdown:{request.decode(errors='replace')}" if request else "running"

    # -- publishing ----------------------------------------------------------
    def _root(self, guest: int) -> bytes:
        return bridge_path(self._bridge_domid, guest)

    def publish_bridge(self, guest: int, state: str, ioreq_server: int | None = None) -> None:
        if state not in BRIDGE_STATES:
            raise ValueError(f"bridge state must be one of {BRIDGE_STATES}")
        root = self._root(guest)
        self._xs.write(root + b"/pid", str(os.getpid()).encode())
        if ioreq_server is not None:
            self._xs.write(root + b"/ioreq-server", str(ioreq_server).encode())
        self._xs.write(root + b"/state", state.encode())

    def publish_device(self, guest: int, pci: str, server: str, state: str) -> None:
        """``pci`` is ``SSSS:BB:DD.F`` (``str(abi.Sbdf)``), published as
        ``SSSS-BB-DD-F``: xenstore node names allow only ``[A-Za-z0-9-/_@]``
        (docs/misc/xenstore.txt), and xenstored refuses ``:`` and ``.``."""
        if state not in DEVICE_STATES:
            raise ValueError(f"device state must be one of {DEVICE_STATES}")
        base = self._root(guest) + b"/devices/" + _node(pci)
        self._xs.write(base + b"/server", server.encode())
        self._xs.write(base + b"/state", state.encode())

    def remove_device(self, guest: int, pci: str) -> None:
        self._xs.delete(self._root(guest) + b"/devices/" + _node(pci))

    def close(self, guest: int) -> None:
        self._xs.delete(self._root(guest) + b"/devices")
        self._xs.write(self._root(guest) + b"/state", b"closed")


def wait_for_release(events: Iterable[tuple[bytes, bytes]], gone: Callable[[], bool]) -> bool:
    """Consume ``@releaseDomain`` events until ``gone()``; False if the events end first.

    A xenstore watch fires once when it is registered, so a domain that
    died before we watched is noticed on the first event.
    """
    return any(path == RELEASE_DOMAIN and gone() for path, _token in events)


class DomainWatcher:
    """A daemon thread that calls ``on_gone`` once the guest domain is released.

    ``on_gone`` runs on the watcher thread: have it set the
    ``threading.Event`` the ioreq server's :meth:`run` loop checks.
    """

    def __init__(self, client: Any, domid: int, on_gone: Callable[[], None]) -> None:
        self._client = client
        self._domid = domid
        self._on_gone = on_gone
        self._monitor: Any = None
        self._thread = threading.Thread(target=self._run, name=f"xdev-watch-{domid}",
                                        daemon=True)

    def start(self) -> None:
        self._monitor = self._client.monitor()
        self._monitor.watch(RELEASE_DOMAIN, b"xdev")
        self._thread.start()

    def _run(self) -> None:
        store = XenStore(self._client)
        try:
            if wait_for_release(self._monitor.wait(),
                                lambda: not store.domain_exists(self._domid)):
                log.info("domain %d was released", self._domid)
                self._on_gone()
        except Exception as exc:  # the connection dropped; the loop's own errors still work
            log.warning("xenstore watch for domain %d ended: %s", self._domid, exc)

    def stop(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.unwatch(RELEASE_DOMAIN, b"xdev")
                self._monitor.close()
            except Exception as exc:  # closing a broken connection may fail; nothing to do
                log.debug("closing xenstore monitor: %s", exc)


def _node(pci: str) -> bytes:
    return pci.replace(":", "-").replace(".", "-").encode()
