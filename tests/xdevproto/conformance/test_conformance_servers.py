"""The server suite against xdev's device servers, once they can be run.

Each server is started as ``python -m servers.<name>`` with the arguments in
SERVER_ARGS (the owners of each server keep them current). A server without a
``__main__`` module is skipped; one that cannot start fails, with its output.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from xdevproto.conformance.catalog import server_checks
from xdevproto.conformance.model import Level, Outcome
from xdevproto.conformance.runner import run_server_suite
from xdevproto.conformance.target import ExecTarget, TargetError

REPO = Path(__file__).resolve().parents[3]
#: command-line arguments of each server; {socket} is the suite's socket path
SERVER_ARGS = {
    "ahci": "--socket {socket}",
    "e1000": "--socket {socket}",
}


@pytest.mark.parametrize("name", sorted(SERVER_ARGS))
def test_device_server_passes_every_must(name: str) -> None:
    if not (REPO / "servers" / name / "__main__.py").exists():
        pytest.skip(f"servers/{name} has no runnable CLI (__main__.py) yet")
    target = ExecTarget(f"{shlex.quote(sys.executable)} -m servers.{name} "
                        f"{SERVER_ARGS[name]}")
    try:
        report = run_server_suite(target, server_checks(), timeout=2.0)
    except TargetError as exc:
        pytest.fail(f"servers.{name} did not start (update SERVER_ARGS?): {exc}")
    finally:
        target.close()
    failed = [(r.check.id, r.message) for r in report.results
              if r.check.level is Level.MUST and r.outcome in (Outcome.FAIL, Outcome.ERROR)]
    assert failed == []
