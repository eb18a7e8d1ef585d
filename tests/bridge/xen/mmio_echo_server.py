"""A minimal real ioreq server for the Xen tier, run in dom0 by test_xen_real.py.

It claims one MMIO page of a guest, answers reads with ``0xC0FFEE00 | offset``
(or the last value written there), restricts its Xen handles to the guest,
drops root, serves until the guest is released (xenstore ``@releaseDomain``)
or SIGTERM, and writes a JSON report.

    python3 tests/bridge/xen/mmio_echo_server.py --domain NAME --base 0xfe800000 \
        --ready FILE --report FILE [--user nobody]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from bridge.xen.abi import size_mask
from bridge.xen.errors import XenError
from bridge.xen.guestmem import GuestMemory
from bridge.xen.ioreq_server import IoreqServer
from bridge.xen.libs import XenLibs
from bridge.xen.privileges import drop_root, lookup_user, restrict_to_domain
from bridge.xen.xenstore import DomainWatcher, XenStore, connect

MAGIC = 0xC0FFEE00


class EchoRegisters:
    """An IoHandler with one page of registers."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.regs: dict[int, int] = {}
        self.reads = 0
        self.writes: list[tuple[int, int, int]] = []

    def mmio_read(self, addr: int, size: int) -> int:
        self.reads += 1
        off = addr - self.base
        return self.regs.get(off, MAGIC | (off & 0xFF)) & size_mask(size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.writes.append((addr - self.base, size, value))
        self.regs[addr - self.base] = value

    def pio_read(self, port: int, size: int) -> int:
        return size_mask(size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        pass

    def config_read(self, sbdf: int, reg: int, size: int) -> int:
        return size_mask(size)

    def config_write(self, sbdf: int, reg: int, size: int, value: int) -> None:
        pass

    def invalidate(self) -> None:
        pass


def wait_for_domain(store: XenStore, name: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return store.resolve_domain(name)
        except XenError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domain", required=True)
    parser.add_argument("--base", type=lambda s: int(s, 0), required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--user", default=None)
    parser.add_argument("--started", type=Path, default=None,
                        help="touched once Python is up, before waiting for the domain")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for the domain to appear")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    report: dict[str, object] = {"gone": False}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out = args.report.open("w")  # before dropping root: the run directory is root's
    try:
        xs = connect()
        store = XenStore(xs)
        xen = XenLibs()  # load the libraries before the guest boots (see test_xen_real.py)
        if args.started:
            args.started.write_text("started\n")
        domid = wait_for_domain(store, args.domain, args.wait)
        report["vcpus_dm"] = xen.nr_vcpus(domid)
        regs = EchoRegisters(args.base)
        server = IoreqServer(xen, domid, regs, memory=GuestMemory(xen, domid))
        server.start()
        server.claim_range(True, args.base, args.base + 0xFFF)
        store.publish_bridge(domid, "running", server.id)
        report["published_state"] = xs.read(
            f"/local/domain/0/xdev/{domid}/state".encode()).decode()

        def gone() -> None:
            report["gone"] = True
            stop.set()
            server.wake()

        watcher = DomainWatcher(xs, domid, gone)
        watcher.start()
        restrict_to_domain(xen, domid)
        report["legacy_gfn_mapping"] = server.legacy_gfn_mapping
        report["server_id"] = server.id
        args.ready.write_text("ready\n")
        if args.user:
            drop_root(lookup_user(args.user))
        server.run(stop)
        store.close(domid)
        report["stats"] = vars(server.stats)
        report["reads"] = regs.reads
        report["writes"] = regs.writes
        report["closed"] = server.closed
    except Exception:
        report["error"] = traceback.format_exc()
    out.write(json.dumps(report, indent=1))
    out.close()
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
