"""The server suite against xdev's own test device: every check passes."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conformance_helpers import run_suite

from xdevproto.conformance import cli
from xdevproto.conformance.catalog import server_checks
from xdevproto.conformance.model import Level, Outcome


def test_every_check_passes_against_the_test_device(testdev_socket: str) -> None:
    report = run_suite(testdev_socket)
    bad = [(r.check.id, r.outcome.value, r.message) for r in report.results
           if r.outcome is not Outcome.PASS]
    assert bad == []
    assert report.exit_status == 0
    assert len(report.results) == len(server_checks())


def test_checks_are_declared_completely() -> None:
    ids = [c.id for c in server_checks()]
    assert len(ids) == len(set(ids))
    for c in server_checks():
        assert c.title and c.section and c.group
        assert isinstance(c.level, Level)
    groups = {c.group for c in server_checks()}
    assert {"version", "header", "region", "access", "dma", "irq", "reset", "migration",
            "dirty", "malformed", "fds", "disconnect"} <= groups


def test_cli_writes_table_json_and_junit(testdev_socket: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_xml = tmp_path / "r.json", tmp_path / "r.xml"
    rc = cli.main(["server", "--socket", testdev_socket, "--group", "version",
                   "--group", "dma", "--json", str(out_json), "--junit", str(out_xml)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["exit_status"] == 0
    ids = {r["id"] for r in data["results"]}
    assert "dma.overlap" in ids and "version.reply" in ids
    assert all(r["group"] in ("version", "dma") for r in data["results"])
    suite = ET.parse(out_xml).getroot()
    assert suite.tag == "testsuite" and int(suite.get("tests", "0")) == len(ids)
    assert suite.find("testcase/failure") is None


def test_exec_mode_restarts_a_server_that_exits_on_disconnect(tmp_path: Path) -> None:
    # The server exits after each client, as libvfio-user's samples do.
    script = tmp_path / "one_client.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})\n"
        "from xdevproto.server import Server\n"
        "from xdevproto.testdev import TestDevice\n"
        "from xdevproto.transport import listen\n"
        "Server(TestDevice()).serve(listen(sys.argv[1]), max_sessions=1)\n")
    out_json = tmp_path / "r.json"
    rc = cli.main(["server", "--exec", f"{sys.executable} {script} {{socket}}",
                   "--only", "version.reply", "--only", "info.device",
                   "--only", "disconnect.*", "--json", str(out_json)])
    results = {r["id"]: r for r in json.loads(out_json.read_text())["results"]}
    assert rc == 0
    assert results["version.reply"]["outcome"] == "pass"
    assert results["info.device"]["outcome"] == "pass"
    assert results["disconnect.reconnect"]["outcome"] == "n/a"
    assert "exits" in results["disconnect.reconnect"]["message"]
    assert results["disconnect.irq-fds-closed"]["outcome"] == "pass"


def test_exec_mode_reports_a_crash_as_a_failure(tmp_path: Path) -> None:
    script = tmp_path / "crashy.py"
    script.write_text(
        "import os, signal, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "c, _ = s.accept(); c.recv(64)\n"
        "os.kill(os.getpid(), signal.SIGSEGV)\n")
    out_json = tmp_path / "r.json"
    rc = cli.main(["server", "--exec", f"{sys.executable} {script} {{socket}}",
                   "--only", "version.reply", "--json", str(out_json)])
    [result] = json.loads(out_json.read_text())["results"]
    assert rc == 1
    assert result["outcome"] == "fail"
    assert "SIGSEGV" in result["message"]


def test_a_server_that_cannot_start_is_not_a_list_of_failures(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    rc = cli.main(["server", "--exec", f"{sys.executable} -c 'raise SystemExit(3)' {{socket}}"])
    assert rc == 2
    assert "exited with status 3" in capsys.readouterr().err
