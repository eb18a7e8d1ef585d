"""``xdev-ahci``: serve an AHCI SATA controller (Intel ICH9) over vfio-user.

    xdev-ahci --socket /run/xdev/ahci0.sock \\
        --disk file=/srv/guest.img,cache=writethrough,serial=XD0001 \\
        --cdrom file=/srv/install.iso

One ``--disk`` or ``--cdrom`` per port, in port order (QEMU ``-drive``
style ``key=value`` lists; ``,,`` is a literal comma). argv becomes a frozen
:class:`Config` before anything is opened, so tests call :func:`parse` and
:func:`main` directly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from xdevproto.daemon import (
    add_server_arguments,
    expand_config,
    listener_from,
    run_server,
    setup_logging,
)

from .ata import CD_IDENTITY, DISK_IDENTITY, AtaDisk, Identity
from .atapi import AtapiCdrom
from .device import AhciDevice
from .disk import DiskImage, DiskSpec
from .regs import MAX_PORTS

log = logging.getLogger(__name__)

NAME = "xdev-ahci"
_CACHE_MODES = {"writeback": True, "unsafe": True, "writethrough": False,
                "directsync": False, "none": True}
_BOOL = {"on": True, "yes": True, "true": True, "1": True,
         "off": False, "no": False, "false": False, "0": False}


@dataclass(frozen=True, slots=True)
class DriveSpec:
    """One port's drive: an ATA disk or an ATAPI CD/DVD (``path`` None: no disc)."""

    kind: str  # "disk" | "cdrom"
    path: str | None
    readonly: bool
    writeback: bool
    identity: Identity


@dataclass(frozen=True, slots=True)
class Config:
    socket: str | None
    fd: int | None
    drives: tuple[DriveSpec, ...]
    ports: int
    allow_uid: tuple[int, ...] | None
    log_level: str
    engine: str = "native"
    xen_foreign_dma: bool = False
    xen_ioreq: bool = False


def split_options(text: str) -> dict[str, str]:
    """``a=1,b=2`` (QEMU style: ``,,`` escapes a comma; a bare first item is ``file``)."""
    items: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    out: dict[str, str] = {}
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0 and item:
                key, value = "file", item
            else:
                raise ValueError(f"{item!r} is not key=value")
        if key in out:
            raise ValueError(f"{key} given twice")
        out[key] = value
    return out


def parse_drive(kind: str, text: str) -> DriveSpec:
    opts = split_options(text)
    known = {"file", "readonly", "cache", "serial", "model", "firmware", "media"}
    unknown = set(opts) - known
    if unknown:
        raise ValueError(f"--{kind}: unknown option(s) {', '.join(sorted(unknown))}")
    path = opts.get("file") or None
    if kind == "disk" and path is None:
        raise ValueError("--disk needs file=IMAGE")
    try:
        readonly = _BOOL[opts.get("readonly", "off").lower()] or kind == "cdrom"
    except KeyError:
        raise ValueError(f"readonly={opts['readonly']}: expected on or off") from None
    cache = opts.get("cache", "writeback")
    if cache not in _CACHE_MODES:
        raise ValueError(f"cache={cache}: expected one of {', '.join(_CACHE_MODES)}")
    base = DISK_IDENTITY if kind == "disk" else CD_IDENTITY
    identity = Identity(serial=opts.get("serial", base.serial)[:20],
                        model=opts.get("model", base.model)[:40],
                        firmware=opts.get("firmware", base.firmware)[:8])
    for field, text_ in (("serial", identity.serial), ("model", identity.model),
                         ("firmware", identity.firmware)):
        if not text_.isascii() or not text_.isprintable():
            raise ValueError(f"{field} must be printable ASCII")
    return DriveSpec(kind, path, readonly, _CACHE_MODES[cache], identity)


class _DriveAction(argparse.Action):
    """Keep --disk and --cdrom in one list, in command-line (port) order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        drives = list(getattr(namespace, "drives", None) or [])
        drives.append(((option_string or "--disk").lstrip("-"), values))
        namespace.drives = drives


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=NAME, description="Serve an emulated AHCI SATA controller (Intel ICH9, "
        "8086:2922) over vfio-user. Each --disk or --cdrom is one port, in order.",
        epilog="disk options: file=IMAGE (raw, sparse ok), readonly=on|off, "
               "cache=writeback|writethrough|none|directsync|unsafe (writethrough and "
               "directsync start with the drive's write cache off: every write is durable "
               "on completion), serial=STR (20), model=STR (40), firmware=STR (8). "
               "cdrom options: file=ISO (omit for an empty drive), serial, model, firmware.")
    add_server_arguments(p)
    p.set_defaults(drives=[])
    p.add_argument("--disk", action=_DriveAction, metavar="SPEC",
                   help="add an ATA disk port: file=IMAGE[,readonly=on][,cache=...][,serial=...]")
    p.add_argument("--cdrom", action=_DriveAction, metavar="SPEC",
                   help="add an ATAPI CD/DVD port: [file=]ISO[,serial=...][,model=...]")
    p.add_argument("--ports", type=int, metavar="N",
                   help=f"number of ports, 1-{MAX_PORTS} (default: one per drive, at least 1)")
    return p


def parse(argv: list[str]) -> Config:
    p = parser()
    args = p.parse_args(expand_config(argv))
    try:
        drives = tuple(parse_drive(kind, text) for kind, text in args.drives)
    except ValueError as exc:
        p.error(str(exc))
    ports = args.ports if args.ports is not None else max(1, len(drives))
    if not max(1, len(drives)) <= ports <= MAX_PORTS:
        p.error(f"--ports {ports}: need 1-{MAX_PORTS} ports and one per drive ({len(drives)})")
    return Config(args.socket, args.fd, drives, ports,
                  tuple(args.allow_uid) if args.allow_uid else None, args.log_level, args.engine,
                  args.xen_foreign_dma, args.xen_ioreq)


def open_drive(spec: DriveSpec) -> AtaDisk | AtapiCdrom:
    if spec.kind == "cdrom":
        disk = DiskImage(DiskSpec(spec.path, readonly=True)) if spec.path else None
        return AtapiCdrom(disk, spec.identity)
    assert spec.path is not None  # parse_drive requires it for disks
    return AtaDisk(DiskImage(DiskSpec(spec.path, spec.readonly, spec.writeback)), spec.identity)


def build(config: Config) -> AhciDevice:
    """The device for ``config`` (opens the images; OSError if one cannot be opened)."""
    drives: list[AtaDisk | AtapiCdrom | None] = []
    try:
        for spec in config.drives:
            drives.append(open_drive(spec))
    except OSError:
        for d in drives:
            if d is not None and d.disk is not None:
                d.disk.close()
        raise
    drives += [None] * (config.ports - len(drives))
    return AhciDevice(drives)


def main(argv: list[str] | None = None) -> int:
    config = parse(list(sys.argv[1:] if argv is None else argv))
    setup_logging(config.log_level, NAME)
    try:
        device = build(config)
    except OSError as exc:
        print(f"{NAME}: cannot open {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    for i, spec in enumerate(config.drives):
        log.info("port %d: %s %s%s", i, spec.kind, spec.path or "(empty)",
                 " read-only" if spec.readonly and spec.kind == "disk" else "")
    try:
        listener = listener_from(config.socket, config.fd)
    except BaseException:
        device.close()
        raise
    return run_server(device, listener, name=NAME,
                      allowed_uids=list(config.allow_uid) if config.allow_uid else None,
                      cleanup=device.close, engine=config.engine,
                      xen_foreign_dma=config.xen_foreign_dma, xen_ioreq=config.xen_ioreq)


if __name__ == "__main__":
    raise SystemExit(main())
