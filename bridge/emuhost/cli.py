"""Command line: build the image, run a script in dom0, or open a shell.

    python -m bridge.emuhost build [--force]
    python -m bridge.emuhost run SCRIPT [--timeout S] [--share TAG=DIR[:rw]]
                                        [--guest NAME=INIT_SCRIPT]

SCRIPT runs as root in dom0 (sh) with $XDEV_RUN as its cwd; each --guest is an
HVM guest whose busybox /init runs INIT_SCRIPT, prepared as $XDEV_RUN/guests/
NAME.cfg (start it with: . "$XDEV_LIB"; xdev_guest_run NAME MARKER).
    python -m bridge.emuhost shell
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from bridge.emuhost.errors import EmuHostError
from bridge.emuhost.guest import GuestConfigError, HvmGuest
from bridge.emuhost.host import EmuHost
from bridge.emuhost.image import default_cache_dir
from bridge.emuhost.machine import Share


@dataclass(frozen=True)
class Config:
    command: str
    cache_dir: Path
    force: bool
    script: Path | None
    timeout: float
    shares: dict[str, Share]
    results_dir: Path | None
    guests: tuple[HvmGuest, ...]


def _share(text: str) -> tuple[str, Share]:
    tag, sep, rest = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected TAG=DIR[:rw], got {text!r}")
    readonly = True
    if rest.endswith(":rw"):
        rest, readonly = rest[:-3], False
    return tag, Share(Path(rest), readonly)


def _guest(text: str) -> HvmGuest:
    name, sep, path = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=INIT_SCRIPT, got {text!r}")
    try:
        return HvmGuest(name=name, init_script=Path(path).read_text())
    except (OSError, GuestConfigError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bridge.emuhost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="image cache (default: $XDEV_EMUHOST_CACHE or "
                             "$XDG_CACHE_HOME/xdev/emuhost)")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the image unless cached")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    run = sub.add_parser("run", help="boot, run SCRIPT (sh) in dom0, power off")
    run.add_argument("script", type=Path)
    run.add_argument("--timeout", type=float, default=900)
    run.add_argument("--share", type=_share, action="append", default=[],
                     help="extra 9p share TAG=DIR[:rw], mounted at /xdev/TAG")
    run.add_argument("--results-dir", type=Path, default=None)
    run.add_argument("--guest", type=_guest, action="append", default=[],
                     help="HVM guest NAME whose busybox init runs INIT_SCRIPT")
    shell = sub.add_parser("shell", help="interactive root shell on the Xen console")
    shell.add_argument("--share", type=_share, action="append", default=[])
    args = parser.parse_args(argv)
    return Config(
        command=args.command,
        cache_dir=args.cache_dir or default_cache_dir(),
        force=getattr(args, "force", False),
        script=getattr(args, "script", None),
        timeout=getattr(args, "timeout", 900),
        shares=dict(getattr(args, "share", [])),
        results_dir=getattr(args, "results_dir", None),
        guests=tuple(getattr(args, "guest", [])),
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    host = EmuHost(cache_dir=config.cache_dir, log=lambda m: print(m, file=sys.stderr))
    try:
        if config.command == "build":
            image = host.ensure_image(force=config.force)
            print(image.directory)
            return 0
        if config.command == "shell":
            return host.shell(shares=config.shares)
        assert config.script is not None  # argparse requires it for "run"
        result = host.run(config.script.read_text(), shares=config.shares, guests=config.guests,
                          timeout=config.timeout, results_dir=config.results_dir)
    except (EmuHostError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.output)
    print(f"results: {result.results_dir}", file=sys.stderr)
    if result.exit_status is None:
        print(result.describe(), file=sys.stderr)
        return 124 if result.timed_out else 2
    return result.exit_status
