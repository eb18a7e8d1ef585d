"""Interrupts, xenstore (over an in-memory client) and privilege dropping."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from bridge.xen.errors import GuestError, PrivilegeError, XenError
from bridge.xen.fake import FakeXen
from bridge.xen.irq import Interrupts, intx_gsi
from bridge.xen.privileges import Identity, drop_root, lookup_user, restrict_to_domain
from bridge.xen.xenstore import RELEASE_DOMAIN, XenStore, bridge_path, wait_for_release


@pytest.fixture
def xen() -> Iterator[FakeXen]:
    fake = FakeXen(domid=7)
    yield fake
    fake.close()


def test_intx_levels_are_sent_on_change_only_and_released(xen: FakeXen) -> None:
    irq = Interrupts(xen, 7)
    irq.set_pci_intx_level(0, 0, 5, 0, 1)
    irq.set_pci_intx_level(0, 0, 5, 0, 1)
    assert xen.intx == {(0, 0, 5, 0): 1} and irq.level(0, 0, 5, 0) == 1
    irq.release(0, 0, 5)
    assert xen.intx == {(0, 0, 5, 0): 0}
    with pytest.raises(ValueError):
        irq.set_pci_intx_level(0, 0, 5, 4, 1)
    with pytest.raises(ValueError):
        irq.set_pci_intx_level(0, 0, 32, 0, 1)


def test_intx_gsi_matches_xens_swizzle() -> None:
    assert intx_gsi(5, 0) == 36 and intx_gsi(6, 0) == 40 and intx_gsi(8, 3) == 16 + 4


def test_msi_injected_as_programmed_and_bad_addresses_refused(xen: FakeXen) -> None:
    irq = Interrupts(xen, 7)
    irq.inject_msi(0xFEE01000, 0x4041)
    assert xen.msis == [(0xFEE01000, 0x4041)]
    for addr in (0, 0xFED00000, 0x1_FEE00000):
        with pytest.raises(GuestError):
            irq.inject_msi(addr, 0x41)
    with pytest.raises(GuestError):
        irq.inject_msi(0xFEE00000, 1 << 32)
    assert len(xen.msis) == 1


class MemoryXs:
    """A dict-backed stand-in for pyxs.Client."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, bytes] = {}
        self.introduced: set[int] = set()

    def read(self, path: bytes, default: bytes | None = None) -> bytes:
        if path in self.nodes:
            return self.nodes[path]
        if default is not None:
            return default
        raise KeyError(path)

    def write(self, path: bytes, value: bytes) -> None:
        self.nodes[path] = value

    def list(self, path: bytes) -> list[bytes]:
        prefix = path + b"/"
        return sorted({p[len(prefix):].split(b"/")[0] for p in self.nodes if p.startswith(prefix)})

    def delete(self, path: bytes) -> None:
        for p in [p for p in self.nodes if p == path or p.startswith(path + b"/")]:
            del self.nodes[p]

    def is_domain_introduced(self, domid: int) -> bool:
        return domid in self.introduced


@pytest.fixture
def xs() -> MemoryXs:
    store = MemoryXs()
    for domid, name, vcpus in ((0, b"Domain-0", 1), (7, b"guest", 3), (8, b"other", 1)):
        store.introduced.add(domid)
        store.write(f"/local/domain/{domid}/name".encode(), name)
        for cpu in range(vcpus):
            store.write(f"/local/domain/{domid}/cpu/{cpu}/availability".encode(), b"online")
    return store


def test_resolve_domain_by_name_or_id(xs: MemoryXs) -> None:
    store = XenStore(xs)
    assert store.resolve_domain("guest") == 7
    assert store.resolve_domain("8") == 8
    with pytest.raises(XenError):
        store.resolve_domain("missing")
    with pytest.raises(XenError):
        store.resolve_domain("42")
    xs.write(b"/local/domain/9/name", b"guest")
    with pytest.raises(XenError):  # ambiguous
        store.resolve_domain("guest")


def test_vcpus_and_state(xs: MemoryXs) -> None:
    store = XenStore(xs)
    assert store.vcpu_count(7) == 3
    assert store.domain_state(7) == "running"
    xs.write(b"/local/domain/7/control/shutdown", b"poweroff")
    assert store.domain_state(7) == "shutdown:poweroff"
    xs.introduced.discard(7)
    assert store.domain_state(7) == "gone"
    with pytest.raises(XenError):
        store.vcpu_count(42)


def test_publish_under_the_documented_path(xs: MemoryXs) -> None:
    store = XenStore(xs, bridge_domid=0)
    root = bridge_path(0, 7)
    assert root == b"/local/domain/0/xdev/7"
    store.publish_bridge(7, "running", ioreq_server=2)
    store.publish_device(7, "0000:00:05.0", "unix:/run/xdev/ahci.sock", "connected")
    assert xs.nodes[root + b"/state"] == b"running"
    assert xs.nodes[root + b"/ioreq-server"] == b"2"
    assert xs.nodes[root + b"/pid"] == str(os.getpid()).encode()
    assert xs.nodes[root + b"/devices/0000-00-05-0/server"] == b"unix:/run/xdev/ahci.sock"
    with pytest.raises(ValueError):
        store.publish_bridge(7, "dancing")
    store.close(7)
    assert xs.nodes[root + b"/state"] == b"closed"
    assert not any(p.startswith(root + b"/devices") for p in xs.nodes)


def test_release_watch_fires_only_when_our_domain_is_gone(xs: MemoryXs) -> None:
    store = XenStore(xs)
    events = iter([(RELEASE_DOMAIN, b"xdev"), (RELEASE_DOMAIN, b"xdev"), (b"/other", b"x"),
                   (RELEASE_DOMAIN, b"xdev")])
    checks = []

    def gone() -> bool:
        checks.append(1)
        if len(checks) == 2:
            xs.introduced.discard(7)
        return not store.domain_exists(7)

    assert wait_for_release(events, gone)
    assert len(checks) == 2
    assert next(events) == (b"/other", b"x")  # stopped consuming once gone
    assert not wait_for_release(iter([(RELEASE_DOMAIN, b"xdev")]), lambda: False)


class Creds:
    def __init__(self, uid: int = 0, regain: bool = False) -> None:
        self.uid = uid
        self.regain = regain
        self.calls: list[tuple[str, object]] = []

    def getuid(self) -> int:
        return self.uid

    def setgroups(self, groups: list[int], /) -> None:
        self.calls.append(("setgroups", groups))

    def setgid(self, gid: int, /) -> None:
        self.calls.append(("setgid", gid))

    def setuid(self, uid: int, /) -> None:
        self.calls.append(("setuid", uid))
        if uid == 0 and not self.regain:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        self.uid = uid


NOBODY = Identity("xdev", 999, 998)


def test_drop_root_order_and_check() -> None:
    creds = Creds()
    drop_root(NOBODY, creds)
    assert creds.calls == [("setgroups", []), ("setgid", 998), ("setuid", 999), ("setuid", 0)]


def test_drop_root_refuses_when_root_can_be_regained_or_not_root() -> None:
    with pytest.raises(PrivilegeError):
        drop_root(NOBODY, Creds(regain=True))
    with pytest.raises(PrivilegeError):
        drop_root(NOBODY, Creds(uid=1000))
    drop_root(NOBODY, Creds(uid=999))  # already that user: nothing to do


def test_lookup_user() -> None:
    with pytest.raises(PrivilegeError):
        lookup_user("root")
    with pytest.raises(PrivilegeError):
        lookup_user("no-such-user-xdev")


def test_restrict_failure_is_a_privilege_error() -> None:
    class Failing:
        def restrict_all(self, domid: int) -> None:
            raise XenError("EPERM")

    class Ok:
        domid = -1

        def restrict_all(self, domid: int) -> None:
            self.domid = domid

    with pytest.raises(PrivilegeError):
        restrict_to_domain(Failing(), 7)
    ok = Ok()
    restrict_to_domain(ok, 7)
    assert ok.domid == 7
