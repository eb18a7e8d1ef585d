"""systemd units for the xdev daemons, and their installer.

    xdev-units install [--dest DIR] [--bindir DIR] [--docdir DIR]
    xdev-units list

The unit files in this package name ``@BINDIR@`` (where the ``xdev-*``
console scripts are: by default the directory of the running Python, i.e.
``/usr/bin`` or a virtualenv's ``bin``) and ``@DOCDIR@``; ``install``
writes them with those filled in (default destination
``/etc/systemd/system``) and creates ``/etc/xdev`` for the per-instance
configuration files. See docs/xdev-systemd.md.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

UNIT_SUFFIXES = (".service", ".socket")


def unit_names() -> list[str]:
    root = resources.files(__name__)
    return sorted(p.name for p in root.iterdir() if p.name.endswith(UNIT_SUFFIXES))


def render(name: str, bindir: str, docdir: str) -> str:
    text = resources.files(__name__).joinpath(name).read_text()
    return text.replace("@BINDIR@", bindir).replace("@DOCDIR@", docdir)


def install(dest: Path, bindir: str, docdir: str, config_dir: Path | None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in unit_names():
        path = dest / name
        path.write_text(render(name, bindir, docdir))
        path.chmod(0o644)
        written.append(path)
    if config_dir is not None:
        config_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    return written


def default_docdir() -> str:
    here = Path(__file__).resolve().parents[2] / "docs"
    return str(here if here.is_dir() else Path(sys.prefix) / "share" / "doc" / "xdev")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xdev-units", description="install xdev's systemd units")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the unit files")
    inst = sub.add_parser("install", help="write the unit files")
    inst.add_argument("--dest", default="/etc/systemd/system", type=Path)
    inst.add_argument("--bindir", default=str(Path(sys.executable).parent))
    inst.add_argument("--docdir", default=default_docdir())
    inst.add_argument("--config-dir", default="/etc/xdev", type=Path)
    inst.add_argument("--no-config-dir", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(unit_names()))
        return 0
    for path in install(args.dest, args.bindir, args.docdir,
                        None if args.no_config_dir else args.config_dir):
        print(path)
    print("now: systemctl daemon-reload", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
