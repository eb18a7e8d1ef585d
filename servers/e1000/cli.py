"""``xdev-e1000``: serve an Intel 82540EM NIC over vfio-user.

    xdev-e1000 --socket /run/xdev/nic0.sock --mac 52:54:00:12:34:56 \\
        --netdev tap,ifname=xdevtap0 [--pcap /var/tmp/nic0.pcap]

argv becomes a frozen :class:`Config` before anything is opened, so tests
call :func:`parse` and :func:`main` directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from xdevproto.daemon import (
    add_server_arguments,
    expand_config,
    listener_from,
    run_server,
    setup_logging,
)

from .backends import BackendError, NetdevSpec, PcapWriter, open_backend, parse_netdev

log = logging.getLogger(__name__)

NAME = "xdev-e1000"
DEFAULT_MAC = "52:54:00:12:34:56"


@dataclass(frozen=True, slots=True)
class Config:
    socket: str | None
    fd: int | None
    mac: bytes
    netdev: NetdevSpec
    pcap: str | None
    allow_uid: tuple[int, ...] | None
    log_level: str
    engine: str = "native"
    xen_foreign_dma: bool = False
    xen_ioreq: bool = False


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=NAME, description="Serve an emulated Intel 82540EM (e1000) NIC over vfio-user.",
        epilog="netdev kinds: tap,ifname=NAME | tap,fd=N | dgram,local=H:P[,remote=H:P] | "
               "stream,connect=H:P | stream,listen=H:P | null")
    add_server_arguments(p)
    p.add_argument("--mac", default=DEFAULT_MAC, help=f"MAC address (default {DEFAULT_MAC})")
    p.add_argument("--netdev", default="null", metavar="SPEC",
                   help="network back end (default: null, no wire)")
    p.add_argument("--pcap", metavar="FILE", help="capture every frame both ways to FILE")
    return p


def parse(argv: list[str]) -> Config:
    p = parser()
    args = p.parse_args(expand_config(argv))
    try:
        mac = parse_mac(args.mac)
        netdev = parse_netdev(args.netdev)
    except ValueError as exc:
        p.error(str(exc))
    return Config(args.socket, args.fd, mac, netdev, args.pcap,
                  tuple(args.allow_uid) if args.allow_uid else None, args.log_level, args.engine,
                  args.xen_foreign_dma, args.xen_ioreq)


def main(argv: list[str] | None = None) -> int:
    config = parse(list(sys.argv[1:] if argv is None else argv))
    setup_logging(config.log_level, NAME)
    from .device import E1000Device

    try:
        backend = open_backend(config.netdev)
    except (BackendError, OSError) as exc:
        print(f"{NAME}: cannot open back end {config.netdev.kind}: {exc}", file=sys.stderr)
        return 2
    if config.pcap:
        try:
            backend.pcap = PcapWriter.open(config.pcap)
        except OSError as exc:
            backend.close()
            print(f"{NAME}: cannot write {config.pcap}: {os.strerror(exc.errno or 0)}",
                  file=sys.stderr)
            return 2
    listener = listener_from(config.socket, config.fd)
    device = E1000Device(config.mac, backend)
    log.info("MAC %s, back end %s", config.mac.hex(":"), config.netdev.kind)
    return run_server(device, listener, name=NAME,
                      allowed_uids=list(config.allow_uid) if config.allow_uid else None,
                      cleanup=device.close, engine=config.engine,
                      xen_foreign_dma=config.xen_foreign_dma, xen_ioreq=config.xen_ioreq)


if __name__ == "__main__":
    raise SystemExit(main())
