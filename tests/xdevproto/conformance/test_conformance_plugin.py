"""The pytest plugin: one test per check against a marked server (run in a
separate pytest process, as a project would)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

INNER = '''
import pytest

@pytest.mark.vfio_user_server(socket={path!r}, groups=["version", "dma"])
def test_conformance(vfio_user_check):
    assert vfio_user_check.outcome.value == "pass"

@pytest.mark.vfio_user_server(socket={path!r}, only=["write-multi.negotiated"])
def test_write_multi(vfio_user_check):
    assert vfio_user_check.check.level.value == "MUST"
'''

MUTE_CONFTEST = '''
import os, socket, tempfile, pytest

@pytest.fixture(scope="session")
def mute_server():
    d = tempfile.mkdtemp()
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(d, "s")); s.listen(64)
    yield os.path.join(d, "s")
    s.close()
'''

MUTE_TEST = '''
import pytest

@pytest.mark.vfio_user_server(fixture="mute_server", only=["version.reply"], timeout=0.2)
def test_conformance(vfio_user_check):
    pass
'''


def plugin_args() -> list[str]:
    """``-p`` the plugin, unless an installed pytest11 entry point loads it."""
    module = "xdevproto.conformance.pytest_plugin"
    if any(ep.value == module for ep in importlib.metadata.entry_points(group="pytest11")):
        return []
    return ["-p", module]


def run_pytest(where: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *plugin_args(),
         "--rootdir", str(where), str(where)],
        cwd=where, env=env, capture_output=True, text=True, timeout=120)


def test_plugin_parametrises_one_test_per_check(tmp_path: Path, testdev_socket: str) -> None:
    (tmp_path / "test_inner.py").write_text(INNER.format(path=testdev_socket))
    out = run_pytest(tmp_path)
    # 11 version checks, 9 DMA checks, 1 write-multi check
    assert "21 passed" in out.stdout, out.stdout + out.stderr
    assert "test_conformance[dma.overlap] PASSED" in out.stdout


def test_plugin_fails_a_check_the_server_breaks(tmp_path: Path) -> None:
    # A "server" that accepts connections and never answers.
    (tmp_path / "conftest.py").write_text(MUTE_CONFTEST)
    (tmp_path / "test_mute.py").write_text(MUTE_TEST)
    out = run_pytest(tmp_path)
    assert "1 failed" in out.stdout, out.stdout + out.stderr
    assert "version.reply [MUST, VFIO_USER_VERSION]" in out.stdout
