"""Daemon plumbing: socket activation by systemd's own tool, the readiness
protocol, config files, journald priorities."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdevproto.client import Client
from xdevproto.daemon import JournalFormatter, expand_config
from xdevproto.testdev import ID_VALUE
from xdevproto.wire import PciRegion

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _wait_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)


def test_socket_activation_with_systemd_socket_activate(tmp_path: Path) -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is missing: install systemd")
    sock_path = tmp_path / "act.sock"
    proc = subprocess.Popen(
        [tool, "-l", str(sock_path), sys.executable, "-m", "xdevproto.testdev"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_path(sock_path)
        # The server did not create this socket: systemd-socket-activate did,
        # and starts the server on the first connection.
        with Client.connect(str(sock_path)) as c:
            assert c.region_read(PciRegion.BAR0, 0, 4) == ID_VALUE.to_bytes(4, "little")
            c.region_write(PciRegion.BAR0, 4, b"sock")
            assert c.region_read(PciRegion.BAR0, 4, 4) == b"sock"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


def test_readiness_protocol(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify"
    notify.bind(str(notify_path))
    notify.settimeout(10)
    sock_path = tmp_path / "dev.sock"
    proc = subprocess.Popen([sys.executable, "-m", "xdevproto.testdev", "--socket",
                             str(sock_path)], env=_env(NOTIFY_SOCKET=str(notify_path)),
                            stderr=subprocess.PIPE)
    messages: list[str] = []
    try:
        while "READY=1" not in messages:
            messages.append(notify.recv(4096).decode())
        # READY only once the socket accepts clients.
        with Client.connect(str(sock_path)) as c:
            c.device_info()
            while not any("client connected" in m for m in messages):
                messages.append(notify.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.append(notify.recv(4096).decode())
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert proc.returncode == 0
    assert any(m.startswith("STATUS=xdev-testdev: waiting") for m in messages)


def test_config_file_expansion(tmp_path: Path) -> None:
    conf = tmp_path / "x.conf"
    conf.write_text("# a comment\n--socket /run/x.sock\n\n--allow-uid 5  # trailing\n")
    assert expand_config(["--config", str(conf), "--log-level", "debug"]) == [
        "--socket", "/run/x.sock", "--allow-uid", "5", "--log-level", "debug"]
    with pytest.raises(SystemExit):
        expand_config(["--config", str(tmp_path / "missing")])


def test_journal_priority_prefixes() -> None:
    import logging

    rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "two\nlines", None, None)
    assert JournalFormatter("%(message)s").format(rec) == "<3>two\n<3>lines"


def test_xen_foreign_dma_reaches_the_server_as_the_bridges_mapper(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from bridge.direct import IOREQ_ATTACHERS
    from bridge.foreign import GUEST_MAPPERS, KIND
    from servers.ahci.cli import parse as parse_ahci
    from servers.e1000.cli import parse as parse_e1000
    from xdevproto import daemon
    from xdevproto.testdev import TestDevice

    assert parse_ahci(["--socket", "s", "--xen-foreign-dma"]).xen_foreign_dma
    assert not parse_ahci(["--socket", "s"]).xen_foreign_dma
    assert parse_e1000(["--socket", "s", "--netdev", "null", "--xen-foreign-dma"]).xen_foreign_dma
    assert parse_ahci(["--socket", "s", "--xen-ioreq"]).xen_ioreq
    assert not parse_ahci(["--socket", "s"]).xen_ioreq
    assert parse_e1000(["--socket", "s", "--netdev", "null", "--xen-ioreq"]).xen_ioreq

    made: list[dict[str, object]] = []

    class Recording:
        def __init__(self, device: object, **kw: object) -> None:
            made.append(kw)
            self.on_state = None

        def serve(self, listener: socket.socket) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(daemon, "Server", Recording)
    for flag in (True, False):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / f"l{flag}"))
        assert daemon.run_server(TestDevice(), listener, name="t", xen_foreign_dma=flag,
                                 xen_ioreq=flag) == 0
    assert made[0]["guest_mappers"] is GUEST_MAPPERS and KIND in GUEST_MAPPERS
    assert made[0]["ioreq_attachers"] is IOREQ_ATTACHERS and "xen" in IOREQ_ATTACHERS
    assert made[1]["guest_mappers"] is None and made[1]["ioreq_attachers"] is None

    closed: list[bool] = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "lvu"))
    with pytest.raises(SystemExit, match="needs the native engine"):
        daemon.run_server(TestDevice(), listener, name="t", engine="libvfio-user",
                          xen_foreign_dma=True, cleanup=lambda: closed.append(True))
    assert closed == [True] and listener.fileno() == -1
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "lvu2"))
    with pytest.raises(SystemExit, match="--xen-ioreq needs the native engine"):
        daemon.run_server(TestDevice(), listener, name="t", engine="libvfio-user",
                          xen_ioreq=True)
