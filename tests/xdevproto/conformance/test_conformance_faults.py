"""Every server check has been seen to fail: each runs against a server
with a fault it must catch (conformance_faults.FAULT_FOR)."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance_faults import FAULT_FOR, FAULTS, FaultyServer, kill_first_client
from conformance_helpers import run_suite, serving

from xdevproto import server as srv
from xdevproto.conformance.catalog import server_checks
from xdevproto.conformance.divergences import divergence
from xdevproto.conformance.model import Outcome
from xdevproto.conformance.report import render_table, write_junit

#: faults that change the server for the clients after the first: a fresh
#: server for every check
STATEFUL = {"dies-after-a-client", "leaks-client-state", "second-client-kills-first"}


@pytest.fixture(scope="module")
def shared() -> Iterator[dict[str, str]]:
    """One server per stateless fault, shared by the checks that use it."""
    servers: list[FaultyServer] = []
    with contextlib.ExitStack() as stack:

        class Lazy(dict[str, str]):
            def __missing__(self, fault: str) -> str:
                servers.append(FaultyServer(FAULTS[fault]))
                self[fault] = stack.enter_context(serving(servers[-1]))
                return self[fault]
        yield Lazy()
        for server in servers:  # all at once: each takes a poll interval to stop
            server.stop()


def test_every_server_check_has_a_fault() -> None:
    assert set(FAULT_FOR) == {c.id for c in server_checks()}
    assert set(FAULT_FOR.values()) <= set(FAULTS)


@pytest.mark.parametrize("check_id", sorted(FAULT_FOR))
def test_fault_is_detected(check_id: str, shared: dict[str, str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    fault = FAULT_FOR[check_id]
    if fault in STATEFUL:
        server = FaultyServer(FAULTS[fault])
        if fault == "second-client-kills-first":
            monkeypatch.setattr(srv, "refuse_busy", kill_first_client(server))
        with serving(server) as path:
            [result] = run_suite(path, {check_id}).results
    else:
        [result] = run_suite(shared[fault], {check_id}).results
    assert result.outcome is Outcome.FAIL, (fault, result.outcome, result.message)
    assert result.message
    assert result.transcript  # the bytes that show the failure


def test_libvfio_user_rules_are_reported_as_its_divergences(tmp_path: Path) -> None:
    with serving(FaultyServer(FAULTS["dma-lvu-rules"])) as path:
        report = run_suite(path, {"dma.remap-identical", "dma.overlap"}, peer="libvfio-user")
        plain = run_suite(path, {"dma.overlap"})
    assert [r.outcome for r in report.results] == [Outcome.DIVERGENCE] * 2
    assert all("libvfio-user" in r.divergence for r in report.results)
    assert report.exit_status == 0  # documented, so not an unexplained MUST failure
    assert plain.results[0].outcome is Outcome.FAIL and plain.exit_status == 1
    # Still visible in every output.
    assert "DIVG" in render_table(report) and "documented divergence" in render_table(report)
    write_junit(report, str(tmp_path / "r.xml"))
    skipped = ET.parse(tmp_path / "r.xml").getroot().findall("testcase/skipped")
    assert len(skipped) == 2 and "documented divergence" in skipped[0].get("message", "")


def test_a_divergence_explains_only_its_own_failure() -> None:
    # dma.overlap failing because the server hangs up is not the documented EINVAL.
    assert divergence("libvfio-user", "dma.overlap", "error EINVAL, the spec requires EEXIST")
    assert not divergence("libvfio-user", "dma.overlap", "peer closed the connection")
    assert not divergence(None, "dma.overlap", "error EINVAL, the spec requires EEXIST")
