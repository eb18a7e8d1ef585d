"""The conformance suite gives the same results on both engines, check by check.

Each device server (the test device, xdev-e1000, xdev-ahci) is started
through its command line, once with ``--engine native`` and once with
``--engine libvfio-user``, and the whole server suite runs against each.
Every check must end the same way on both, unless the libvfio-user outcome
is a documented libvfio-user divergence
(:mod:`xdevproto.conformance.divergences`) or a documented non-failing
difference (:mod:`xdevproto.lvu.differences`). Needs libvfio-user.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from xdevproto.conformance.catalog import server_checks
from xdevproto.conformance.model import Outcome, Result
from xdevproto.conformance.runner import run_server_suite
from xdevproto.conformance.target import ExecTarget
from xdevproto.lvu.differences import NOT_APPLICABLE
from xdevproto.lvu.loader import unavailable_reason

pytestmark = pytest.mark.lvu

_reason = unavailable_reason()
if _reason is not None:
    pytest.skip(f"libvfio-user unavailable: {_reason}", allow_module_level=True)

PY = shlex.quote(sys.executable)
DEVICES = {
    "testdev": f"{PY} -m xdevproto.testdev --socket {{socket}}",
    "e1000": f"{PY} -m servers.e1000.cli --socket {{socket}}",
    "ahci": f"{PY} -m servers.ahci --socket {{socket}} --disk file={{disk}}",
}
CHECK_IDS = [c.id for c in server_checks()]


def _suite(command: str) -> dict[str, Result]:
    target = ExecTarget(command)
    try:
        report = run_server_suite(target, server_checks(), peer="libvfio-user")
    finally:
        target.close()
    return {r.check.id: r for r in report.results}


@pytest.fixture(scope="module", params=sorted(DEVICES))
def both(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Result]]:
    disk = tmp_path_factory.mktemp("disk") / "disk.img"
    with Path(disk).open("wb") as f:
        f.truncate(1 << 20)
    command = DEVICES[request.param].replace("{disk}", shlex.quote(str(disk)))
    return {engine: _suite(f"{command} --engine {engine}")
            for engine in ("native", "libvfio-user")}


@pytest.mark.parametrize("check_id", CHECK_IDS)
def test_same_outcome_on_both_engines(both: dict[str, dict[str, Result]],
                                      check_id: str) -> None:
    native, lvu = both["native"][check_id], both["libvfio-user"][check_id]
    # the native engine is the reference: nothing it does may fail
    assert native.outcome in (Outcome.PASS, Outcome.NA), native.message
    if lvu.outcome is native.outcome:
        return
    if lvu.outcome is Outcome.DIVERGENCE:
        assert lvu.divergence  # explained by divergences.py
        return
    assert lvu.outcome is Outcome.NA and check_id in NOT_APPLICABLE, (
        f"native {native.outcome.value}, libvfio-user {lvu.outcome.value}: {lvu.message}")


def test_the_engines_really_served(both: dict[str, dict[str, Result]]) -> None:
    for results in both.values():
        passed = sum(r.outcome is Outcome.PASS for r in results.values())
        assert passed > len(results) * 3 // 4
        for core in ("access.read", "dma.map-unmap", "irq.eventfd-trigger", "reset.reply",
                     "disconnect.second-client", "dirty.start-report-stop"):
            assert results[core].outcome in (Outcome.PASS, Outcome.NA), core
