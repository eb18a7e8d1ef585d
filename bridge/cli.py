"""``xdev-bridge``: serve a Xen guest's PCI devices from vfio-user servers.

    xdev-bridge --domain NAME|ID --device 00:05.0=unix:/run/xdev/ahci-disk0.sock \\
                [--device BDF=ADDRESS ...] [--user USER] [--config FILE]

The bridge registers as a secondary ioreq server of the guest (beside its
own QEMU), claims each device's PCI function, connects to each device
server, and forwards the guest's accesses. Once set up it restricts its Xen
handles to the guest and, when started as root, becomes ``--user``. It
exits when the guest is destroyed, on SIGTERM, or on a fatal Xen error.
State is published under ``/local/domain/<bridge>/xdev/<guest>/`` (see
docs/xdev-bridge.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from bridge.core import Bridge, BridgeDevice, parse_bdf
from bridge.direct import offer as direct_offer
from bridge.foreign import DmaMemory, offer
from bridge.xen import xenstore
from bridge.xen.abi import Sbdf
from bridge.xen.backend import XenBackend
from bridge.xen.errors import XenError
from bridge.xen.guestmem import GuestMemory
from bridge.xen.ioreq_server import IoreqServer
from bridge.xen.irq import Interrupts
from bridge.xen.libs import XenLibs
from bridge.xen.privileges import drop_root, lookup_user, restrict_to_domain
from xdevproto.daemon import expand_config, notify, setup_logging

log = logging.getLogger("xdev-bridge")


@dataclass(frozen=True)
class DeviceSpec:
    sbdf: int
    bdf: str
    address: str


@dataclass(frozen=True)
class Config:
    domain: str
    devices: tuple[DeviceSpec, ...]
    user: str | None
    restrict: bool
    log_level: str
    direct_dma: bool = True
    direct_ioreq: bool = True


def parse_device(text: str) -> DeviceSpec:
    bdf, sep, address = text.partition("=")
    if not sep or not address:
        raise argparse.ArgumentTypeError(f"want BDF=ADDRESS, got {text!r}")
    try:
        sbdf = parse_bdf(bdf)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return DeviceSpec(sbdf, bdf, address)


def parse_args(argv: list[str]) -> Config:
    ap = argparse.ArgumentParser(
        prog="xdev-bridge", description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True, help="the guest, by name or domain id")
    ap.add_argument("--device", action="append", type=parse_device, required=True,
                    metavar="BDF=ADDRESS",
                    help="guest PCI address and the device server's socket "
                         "(unix:PATH, PATH or tcp:HOST:PORT); repeatable")
    ap.add_argument("--user", default=os.environ.get("XDEV_BRIDGE_USER"),
                    help="drop root to this user after set-up")
    ap.add_argument("--no-restrict", dest="restrict", action="store_false",
                    help="do not restrict the Xen handles to the guest (debugging only)")
    ap.add_argument("--no-direct-dma", dest="direct_dma", action="store_false",
                    help="do not offer device servers to map guest memory themselves "
                         "(xdev extension); they then use DMA_READ/DMA_WRITE")
    ap.add_argument("--no-direct-ioreq", dest="direct_ioreq", action="store_false",
                    help="do not offer device servers to serve their BARs' ioreqs "
                         "themselves (xdev extension); the bridge then forwards every access")
    ap.add_argument("--config", metavar="FILE", help="read options from FILE")
    ap.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(expand_config(argv))
    seen = set()
    for dev in args.device:
        if dev.sbdf in seen:
            ap.error(f"PCI address {dev.bdf} given twice")
        seen.add(dev.sbdf)
    return Config(args.domain, tuple(args.device), args.user, args.restrict, args.log_level,
                  args.direct_dma, args.direct_ioreq)


class XenDirectIoreq:
    """A device's own ioreq server (core.DirectIoreq): created and enabled
    here, served by the device server (bridge.direct) or, while it is gone,
    by this process through the main server's loop."""

    def __init__(self, xen: XenBackend, domid: int, vcpus: int, main: IoreqServer,
                 handler: Bridge, memory: GuestMemory) -> None:
        self.main = main
        self.nr_vcpus = vcpus
        self.server = IoreqServer(xen, domid, handler, memory=memory, nr_vcpus=vcpus,
                                  buffered=False)
        self.server.start(bind=False)
        assert self.server.id is not None
        self.id: int = self.server.id

    def claim_range(self, mmio: bool, start: int, end: int) -> None:
        self.server.claim_range(mmio, start, end)

    def release_range(self, mmio: bool, start: int, end: int) -> None:
        if self.server.closed:
            return
        try:
            self.server.release_range(mmio, start, end)
        except XenError as exc:
            # The guest died: Xen destroyed its ioreq servers, claims and all.
            log.info("ioreq server %d: range not released: %s", self.id, exc)

    def hand_over(self) -> None:
        self.main.disown(self.server)
        self.server.unbind_ports()

    def take_over(self) -> bool:
        try:
            self.server.bind_ports(scan=False)
        except XenError as exc:
            log.debug("ioreq server %d: ports still held: %s", self.id, exc)
            return False
        # Adopted before looking at the slots: an event that comes meanwhile
        # is served by the main loop; the slot lock keeps it to one of us.
        self.main.adopt(self.server)
        self.server.answer_abandoned()
        self.server.scan()
        return True

    def close(self) -> None:
        self.main.disown(self.server)
        self.server.close()


class XenFrontend:
    """The core's Frontend over an ioreq server and Xen's interrupt calls."""

    def __init__(self, irqs: Interrupts) -> None:
        self.ioreq: IoreqServer | None = None
        self.irqs = irqs
        #: what direct_ioreq needs, set once the bridge is made; None: not offered
        self.direct: tuple[XenBackend, int, int, Bridge, GuestMemory] | None = None

    def direct_ioreq(self, sbdf: int) -> XenDirectIoreq | None:
        if self.direct is None or self.ioreq is None or self.ioreq.closed:
            return None
        xen, domid, vcpus, bridge, memory = self.direct
        try:
            return XenDirectIoreq(xen, domid, vcpus, self.ioreq, bridge, memory)
        except XenError as exc:
            log.error("no ioreq server for device %s: %s", Sbdf.from_int(sbdf), exc)
            return None

    def claim_range(self, mmio: bool, start: int, end: int) -> None:
        if self.ioreq is not None:
            self.ioreq.claim_range(mmio, start, end)

    def release_range(self, mmio: bool, start: int, end: int) -> None:
        # A destroyed ioreq server's claims went with it.
        if self.ioreq is not None and not self.ioreq.closed:
            self.ioreq.release_range(mmio, start, end)

    def set_intx(self, sbdf: int, pin: int, level: int) -> None:
        self.irqs.set_pci_intx_level(sbdf >> 16, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F,
                                     pin, level)

    def inject_msi(self, addr: int, data: int) -> None:
        try:
            self.irqs.inject_msi(addr, data)
        except XenError as exc:
            log.warning("MSI not delivered: %s", exc)


def run(cfg: Config, *, xen: XenBackend | None = None, xs_client: Any = None,
        stop: threading.Event | None = None) -> int:
    """Serve until the guest dies, SIGTERM, or ``stop``; ``xen`` and
    ``xs_client`` default to the real libraries and xenstored."""
    try:
        if xen is None:
            xen = XenLibs()
        if xs_client is None:
            xs_client = xenstore.connect()
        store = xenstore.XenStore(xs_client)
        domid = store.resolve_domain(cfg.domain)
        vcpus = store.vcpu_count(domid)
    except XenError as exc:
        log.error("%s", exc)
        return 1
    identity = lookup_user(cfg.user) if cfg.user and os.getuid() == 0 else None
    memory = GuestMemory(xen, domid)
    irqs = Interrupts(xen, domid)
    stop = stop or threading.Event()
    frontend = XenFrontend(irqs)
    bridge = Bridge(frontend)
    ioreq = IoreqServer(xen, domid, bridge, memory=memory, nr_vcpus=vcpus)
    frontend.ioreq = ioreq
    if cfg.direct_ioreq:
        frontend.direct = (xen, domid, vcpus, bridge, memory)
    dma = DmaMemory(memory)
    for spec in cfg.devices:
        bridge.add(BridgeDevice(spec.sbdf, spec.address, frontend, dma,
                                guest_memory_offer=offer(domid) if cfg.direct_dma else None,
                                ioreq_offer=direct_offer(domid) if cfg.direct_ioreq else None))
    watcher = xenstore.DomainWatcher(xs_client, domid, stop.set)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    try:
        store.publish_bridge(domid, "initialising")
        bridge.start()  # device servers first: config reads need answers
        ioreq.start()
        for spec in cfg.devices:
            ioreq.claim_pci(Sbdf.from_int(spec.sbdf))
            alive = bridge.devices[spec.sbdf].alive
            store.publish_device(domid, str(Sbdf.from_int(spec.sbdf)), spec.address,
                                 "connected" if alive else "disconnected")
        watcher.start()
        if cfg.restrict:
            restrict_to_domain(xen, domid)  # type: ignore[arg-type]
        if identity is not None:
            drop_root(identity)
        store.publish_bridge(domid, "running", ioreq.id)
        names = ", ".join(f"{s.bdf}={s.address}" for s in cfg.devices)
        notify(f"READY=1\nSTATUS=serving domain {domid}: {names}")
        log.info("serving domain %d (%d vCPUs): %s", domid, vcpus, names)
        ioreq.run(stop)
    except XenError as exc:
        log.error("%s", exc)
        return 1
    finally:
        notify("STOPPING=1")
        watcher.stop()
        bridge.stop()
        ioreq.close()
        try:
            store.close(domid)
        except Exception as exc:
            log.debug("xenstore clean-up: %s", exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(cfg.log_level, "xdev-bridge")
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
