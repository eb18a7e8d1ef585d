"""The systemd units: systemd's own verifier and security analysis accept
them, and each device server starts under systemd-socket-activate with a
socket it did not create, announces readiness and serves a device."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xdevproto.client import Client
from xdevproto.units import install, unit_names
from xdevproto.wire import PciRegion

REPO = Path(__file__).resolve().parents[2]
DEVICE_SERVERS = ("xdev-ahci@.service", "xdev-e1000@.service")
MAX_EXPOSURE = 2.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install systemd (./run setup does)")
    return path


def _bindir_with_commands(tmp_path: Path) -> Path:
    """The units' ExecStart commands, as an installed xdev provides them."""
    bindir = Path(sys.executable).parent
    if all((bindir / c).exists() for c in ("xdev-ahci", "xdev-e1000", "xdev-bridge")):
        return bindir
    # Running from a checkout without the console scripts installed: make
    # the same commands from the modules, so verify sees executables.
    out = tmp_path / "bin"
    out.mkdir()
    for cmd, mod in (("xdev-ahci", "servers.ahci"), ("xdev-e1000", "servers.e1000.cli"),
                     ("xdev-bridge", "bridge.cli")):
        script = out / cmd
        script.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m {mod} \"$@\"\n")
        script.chmod(0o755)
    return out


@pytest.fixture
def units(tmp_path: Path) -> Path:
    dest = tmp_path / "units"
    install(dest, str(_bindir_with_commands(tmp_path)), str(REPO / "docs"), None)
    return dest


def test_every_unit_passes_systemd_analyze_verify(units: Path) -> None:
    tool = _tool("systemd-analyze")
    names = unit_names()
    assert {"xdev-ahci@.socket", "xdev-ahci@.service", "xdev-e1000@.socket",
            "xdev-e1000@.service", "xdev-bridge@.service"} <= set(names)
    # Templates are verified through an instance of each.
    for name in names:
        (units / name.replace("@.", "@ci.")).write_text((units / name).read_text())
    instances = [str(units / n.replace("@.", "@ci.")) for n in names]
    proc = subprocess.run([tool, "verify", *instances], capture_output=True, text=True,
                          cwd=units, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "xdev" not in proc.stderr, proc.stderr  # no warning about our units either


def test_security_exposure(units: Path) -> None:
    tool = _tool("systemd-analyze")
    scores = {}
    for name in (*DEVICE_SERVERS, "xdev-bridge@.service"):
        proc = subprocess.run([tool, "security", "--offline=true", name], cwd=units,
                              capture_output=True, text=True, timeout=120)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
        assert m, proc.stdout + proc.stderr
        scores[name] = float(m.group(1))
    print("exposure:", scores)
    for name in DEVICE_SERVERS:
        assert scores[name] <= MAX_EXPOSURE, scores


@pytest.mark.parametrize("argv", [
    ["-m", "servers.ahci", "--disk", "file={image}"],
    ["-m", "servers.e1000.cli", "--netdev", "null"],
], ids=["ahci", "e1000"])
def test_server_under_systemd_socket_activate(tmp_path: Path, argv: list[str]) -> None:
    tool = _tool("systemd-socket-activate")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    sock_path = tmp_path / "act.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO), NOTIFY_SOCKET=str(tmp_path / "notify"))
    args = [a.format(image=image) for a in argv]
    proc = subprocess.Popen([tool, "-l", str(sock_path), "-E", "NOTIFY_SOCKET",
                             sys.executable, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        # The socket is systemd-socket-activate's; the server starts on the
        # first connection and takes it from LISTEN_FDS.
        with Client.connect(str(sock_path), timeout=30) as c:
            vendor, device = struct.unpack("<HH", c.region_read(PciRegion.CONFIG, 0, 4))
            assert vendor == 0x8086 and device in (0x2922, 0x100E)
            c.region_write(PciRegion.CONFIG, 4, b"\x06\x00")  # memory + bus master
            assert c.region_read(PciRegion.CONFIG, 4, 2) == b"\x06\x00"
            messages = []
            while "READY=1" not in messages:
                messages.append(notify.recv(4096).decode())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        notify.close()
    assert proc.returncode == 0, err.decode()
