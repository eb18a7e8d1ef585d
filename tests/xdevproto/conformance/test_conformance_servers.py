"""The server suite against xdev's device servers, once they can be run.

Each server is started as ``python -m <module> <args>`` from SERVERS (the
owners of each server keep it current). A server whose module does not exist
yet is skipped; one that cannot start fails, with its output.
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
#: name -> (module, arguments); {socket} is the suite's socket path
SERVERS = {
    "ahci": ("servers.ahci.cli", "--socket {socket}"),
    "e1000": ("servers.e1000.cli", "--socket {socket} --netdev null"),
}


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_device_server_passes_every_must(name: str) -> None:
    module, args = SERVERS[name]
    target = ExecTarget(f"{shlex.quote(sys.executable)} -m {module} {args}")
    try:
        report = run_server_suite(target, server_checks(), timeout=2.0)
    except TargetError as exc:
        pytest.fail(f"{module} did not start (update SERVERS?): {exc}")
    finally:
        target.close()
    failed = [(r.check.id, r.message) for r in report.results
              if r.check.level is Level.MUST and r.outcome in (Outcome.FAIL, Outcome.ERROR)]
    assert failed == []
