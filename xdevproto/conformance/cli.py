"""``xdev-conformance``: run the vfio-user conformance suite.

    xdev-conformance server --socket PATH
    xdev-conformance server --exec 'CMD ... {socket} ...' [--peer libvfio-user]
    xdev-conformance client [--timeout S] -- CMD ... {socket} ...
    xdev-conformance list

Options common to both modes: ``--json OUT``, ``--junit OUT``, ``-v`` (show
the bytes of every failure). Exit status: 0 when every MUST check passed
(divergences documented for ``--peer`` do not count), 1 otherwise, 2 when
the suite could not run.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .catalog import client_checks, server_checks
from .divergences import PEERS
from .model import Check, Level, Result
from .report import MARK, render_table, write_json, write_junit
from .runner import Report, run_server_suite
from .target import ExecTarget, Target, TargetError


@dataclass(frozen=True)
class Config:
    mode: str
    socket: str | None
    exec_cmd: str | None
    client_cmd: tuple[str, ...]
    peer: str | None
    json_out: str | None
    junit_out: str | None
    only: tuple[str, ...]
    groups: tuple[str, ...]
    levels: tuple[str, ...]
    timeout: float
    verbose: bool
    progress: bool
    fresh: bool = False


def parse(argv: Sequence[str] | None) -> Config:
    ap = argparse.ArgumentParser(prog="xdev-conformance",
                                 description="vfio-user protocol conformance suite")
    sub = ap.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", dest="json_out", metavar="OUT", help="write a JSON report")
    common.add_argument("--junit", dest="junit_out", metavar="OUT", help="write JUnit XML")
    common.add_argument("--peer", choices=sorted(PEERS),
                        help="report this peer's documented divergences as such")
    common.add_argument("--only", action="append", default=[], metavar="ID",
                        help="run only checks whose id matches (glob; repeatable)")
    common.add_argument("--group", action="append", default=[], help="run only this group")
    common.add_argument("--level", action="append", default=[],
                        choices=[lv.value for lv in Level], help="run only this level")
    common.add_argument("--timeout", type=float, default=2.0,
                        help="seconds to wait for any one reply (client mode: for the client)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show the bytes exchanged by failing checks")
    common.add_argument("--progress", action="store_true", help="print each result as it ends")
    srv = sub.add_parser("server", parents=[common], help="check a vfio-user server")
    where = srv.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="the server's listening UNIX socket")
    where.add_argument("--exec", dest="exec_cmd",
                       help="command that starts the server; {socket} becomes a temp path")
    srv.add_argument("--fresh-server", action="store_true",
                     help="with --exec: start a new server for every check (for servers "
                          "that serve one client and then stop accepting)")
    cli = sub.add_parser("client", parents=[common], help="check a vfio-user client")
    cli.add_argument("command", nargs=argparse.REMAINDER,
                     help="-- CMD ARGS; {socket} becomes the checking server's socket "
                          "(appended when absent)")
    sub.add_parser("list", help="list the checks")
    ns = ap.parse_args(argv)
    cmd = tuple(getattr(ns, "command", ()) or ())
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if ns.mode == "client" and not cmd:
        ap.error("client mode needs the client command after --")
    return Config(ns.mode, getattr(ns, "socket", None), getattr(ns, "exec_cmd", None), cmd,
                  getattr(ns, "peer", None), getattr(ns, "json_out", None),
                  getattr(ns, "junit_out", None), tuple(getattr(ns, "only", ())),
                  tuple(getattr(ns, "group", ())), tuple(getattr(ns, "level", ())),
                  getattr(ns, "timeout", 2.0), getattr(ns, "verbose", False),
                  getattr(ns, "progress", False), getattr(ns, "fresh_server", False))


def select(checks: list[Check], cfg: Config) -> list[Check]:
    return [c for c in checks
            if (not cfg.only or any(fnmatch.fnmatch(c.id, p) for p in cfg.only))
            and (not cfg.groups or c.group in cfg.groups)
            and (not cfg.levels or c.level.value in cfg.levels)]


def _progress(result: Result) -> None:
    print(f"{MARK[result.outcome]:4} {result.check.id} {result.message}", file=sys.stderr)


def run(cfg: Config) -> Report:
    if cfg.mode == "server":
        target: Target = (ExecTarget(cfg.exec_cmd, fresh=cfg.fresh) if cfg.exec_cmd
                          else Target(cfg.socket or ""))
        try:
            return run_server_suite(target, select(server_checks(), cfg), peer=cfg.peer,
                                    timeout=cfg.timeout,
                                    progress=_progress if cfg.progress else None)
        finally:
            target.close()
    from .checks_client import run_client_checks
    from .client_mode import exec_launcher, observe
    wanted = {c.id for c in select(client_checks(), cfg)}
    obs = observe(exec_launcher(list(cfg.client_cmd)), timeout=max(cfg.timeout, 5.0))
    report = run_client_checks(obs, " ".join(cfg.client_cmd), cfg.peer)
    report.results = [r for r in report.results if r.check.id in wanted]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse(argv)
    if cfg.mode == "list":
        for c in server_checks() + client_checks():
            print(f"{c.mode:6} {c.level.value:6} {c.group:12} {c.id:34} {c.title} "
                  f"[{c.section}]")
        return 0
    try:
        report = run(cfg)
    except TargetError as exc:
        print(f"xdev-conformance: {exc}", file=sys.stderr)
        return 2
    print(render_table(report, verbose=cfg.verbose))
    if cfg.json_out:
        write_json(report, cfg.json_out)
    if cfg.junit_out:
        write_junit(report, cfg.junit_out)
    return report.exit_status
