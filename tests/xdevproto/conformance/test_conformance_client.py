"""Client mode: xdev's own client passes; every client check catches the
misbehaviour it exists for."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from conformance_clients import CLIENT_FAULT_FOR, bridge_client, raw_client, xdev_client

from xdevproto.conformance import cli
from xdevproto.conformance.catalog import client_checks
from xdevproto.conformance.checks_client import run_client_checks
from xdevproto.conformance.client_mode import observe, thread_launcher
from xdevproto.conformance.model import Outcome

REPO = Path(__file__).resolve().parents[3]


def test_xdev_client_passes() -> None:
    report = run_client_checks(observe(thread_launcher(xdev_client), timeout=5), "xdev")
    outcomes = {r.check.id: r.outcome for r in report.results}
    assert set(outcomes.values()) == {Outcome.PASS}, {
        r.check.id: r.message for r in report.results if r.outcome is not Outcome.PASS}
    assert report.exit_status == 0


def test_bridge_client_side_passes() -> None:
    report = run_client_checks(observe(thread_launcher(bridge_client), timeout=5), "bridge")
    bad = {r.check.id: r.message for r in report.results
           if r.outcome not in (Outcome.PASS, Outcome.NA)}
    assert bad == {}
    assert report.exit_status == 0


def test_well_behaved_raw_client_passes() -> None:
    run = cast(Callable[[str], object], raw_client("none"))
    report = run_client_checks(observe(thread_launcher(run), timeout=5), "raw")
    assert [(r.check.id, r.message) for r in report.results
            if r.outcome is not Outcome.PASS] == []


def test_every_client_check_has_a_fault() -> None:
    assert set(CLIENT_FAULT_FOR) == {c.id for c in client_checks()}


@pytest.mark.parametrize("check_id", sorted(CLIENT_FAULT_FOR))
def test_client_fault_is_detected(check_id: str) -> None:
    run = cast(Callable[[str], object], raw_client(CLIENT_FAULT_FOR[check_id]))
    report = run_client_checks(observe(thread_launcher(run), timeout=3), "raw")
    result = next(r for r in report.results if r.check.id == check_id)
    assert result.outcome is Outcome.FAIL, (result.outcome, result.message)


def test_client_that_never_connects_fails_cleanly() -> None:
    report = run_client_checks(observe(thread_launcher(lambda path: None), timeout=0.5), "idle")
    first = next(r for r in report.results if r.check.id == "client.version-first")
    assert first.outcome is Outcome.FAIL and "connect" in first.message


def test_cli_client_mode_runs_a_command(tmp_path: Path) -> None:
    script = tmp_path / "drive.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n"
        "from conformance_clients import xdev_client\n"
        "xdev_client(sys.argv[1])\n")
    out = tmp_path / "client.json"
    rc = cli.main(["client", "--json", str(out), "--", sys.executable, str(script),
                   "{socket}"])
    data = json.loads(out.read_text())
    assert rc == 0, data
    assert {r["outcome"] for r in data["results"]} == {"pass"}
