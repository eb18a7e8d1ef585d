"""Serve one Xen guest's disk and NIC from xdev device servers (run in dom0).

    python3 -m bridge.serve --config demo.toml [--report report.json]

The dom0 half of ``xdev-demo``: on a real Xen host it is what the demo runs,
and inside the emulated host it is what the demo and the Xen test tier run
in dom0, so both take the same path. In order:

1. checks: root, ``xl``, a Xen control domain (``/proc/xen/capabilities``);
2. the NIC's tap device (created if missing, with the dom0 address);
3. the device servers: ``xdev-ahci`` and ``xdev-e1000``, as the systemd
   units ``xdev-ahci@INSTANCE.socket``/``xdev-e1000@INSTANCE.socket``
   (``launcher = "systemd"``; config files written to /etc/xdev) or as
   child processes (``launcher = "process"``);
4. ``xl create -p`` (paused, so that SeaBIOS and Linux enumerate the xdev
   functions like any other), then the bridge (``xdev-bridge@INSTANCE`` or
   a child process) claims 00:05.0/00:06.0, then ``xl unpause``;
5. waits until the guest prints ``marker`` on its serial file, or is gone;
6. tears everything down in reverse order, whatever happened.

The config file format is documented in docs/xdev-demo.md. Each step's
time goes into the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xdevproto.daemon import ENGINES

IMAGE_DIR = Path("/var/lib/xdev/images")
CONF_DIR = Path("/etc/xdev")
TAP_USER = "xdev-net"


LOG_LEVELS = ("debug", "info", "warning", "error")


class ServeError(Exception):
    """Something the operator must fix; the message says what."""


@dataclass(frozen=True)
class Plan:
    """One guest and its xdev devices (from the TOML config, see docs/xdev-demo.md)."""

    xl_config: Path
    name: str
    instance: str = "demo"
    launcher: str = "process"
    #: protocol engine per device server kind ("ahci", "e1000"): native unless set
    engines: dict[str, str] = field(default_factory=dict)
    #: "process" servers map the guest themselves (--xen-foreign-dma); off
    #: by default, see docs/xdev-demo.md
    foreign_dma: bool = False
    #: "process" servers serve their BARs' ioreqs themselves (--xen-ioreq)
    direct_ioreq: bool = False
    disk: str | None = None
    cdrom: str | None = None
    ahci_bdf: str = "00:05.0"
    tap: str | None = None
    mac: str = "52:54:00:12:34:56"
    host_address: str | None = None
    e1000_bdf: str = "00:06.0"
    serial: Path | None = None
    marker: str | None = None
    timeout_s: float = 900.0
    log_dir: Path = Path("/run/xdev/logs")
    python: str = sys.executable
    #: --log-level per daemon ("ahci", "e1000", "bridge"): info unless set
    log_levels: dict[str, str] = field(default_factory=dict)


def _xl_name(xl_config: Path) -> str:
    for line in xl_config.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "name":
            return value.strip().strip("\"'")
    raise ServeError(f"{xl_config}: no name = \"...\" line")


def load_plan(path: Path) -> Plan:
    """Read the TOML config; unknown keys are an error (typos must not pass silently)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ServeError(f"cannot read {path}: {exc}") from None
    known = {"guest": {"xl_config", "name", "serial", "marker", "timeout_s"},
             "disk": {"image", "cdrom", "bdf", "engine", "log_level"},
             "nic": {"tap", "mac", "host_address", "bdf", "engine", "log_level"},
             "run": {"instance", "launcher", "engine", "log_dir", "python", "foreign_dma",
                     "direct_ioreq", "log_level"}}
    for section, values in data.items():
        if section not in known or not isinstance(values, dict):
            raise ServeError(f"{path}: unknown section [{section}]")
        extra = set(values) - known[section]
        if extra:
            raise ServeError(f"{path}: unknown key(s) in [{section}]: {', '.join(sorted(extra))}")
    guest, disk, nic, run = (data.get(s, {}) for s in ("guest", "disk", "nic", "run"))
    if "xl_config" not in guest:
        raise ServeError(f"{path}: [guest] needs xl_config")
    xl_config = Path(guest["xl_config"])
    if not xl_config.is_file():
        raise ServeError(f"guest config {xl_config} does not exist")
    plan = Plan(
        xl_config=xl_config, name=guest.get("name") or _xl_name(xl_config),
        serial=Path(guest["serial"]) if "serial" in guest else None,
        marker=guest.get("marker"), timeout_s=float(guest.get("timeout_s", 900)),
        disk=disk.get("image"), cdrom=disk.get("cdrom"), ahci_bdf=disk.get("bdf", "00:05.0"),
        tap=nic.get("tap"), mac=nic.get("mac", "52:54:00:12:34:56"),
        host_address=nic.get("host_address"), e1000_bdf=nic.get("bdf", "00:06.0"),
        instance=run.get("instance", "demo"), launcher=run.get("launcher", "process"),
        engines={kind: section.get("engine", run.get("engine", "native"))
                 for kind, section in (("ahci", disk), ("e1000", nic))},
        log_dir=Path(run.get("log_dir", "/run/xdev/logs")),
        foreign_dma=run.get("foreign_dma", False),
        direct_ioreq=run.get("direct_ioreq", False),
        python=run.get("python", sys.executable),
        log_levels={kind: section.get("log_level", run.get("log_level", "info"))
                    for kind, section in (("ahci", disk), ("e1000", nic), ("bridge", run))},
    )
    if plan.launcher not in ("process", "systemd"):
        raise ServeError(f"{path}: launcher must be \"process\" or \"systemd\"")
    if not isinstance(plan.foreign_dma, bool):
        raise ServeError(f"{path}: foreign_dma must be true or false")
    if plan.foreign_dma and plan.launcher != "process":
        raise ServeError(f"{path}: foreign_dma needs launcher = \"process\" (the units' "
                         "sandbox may not map the guest)")
    if not isinstance(plan.direct_ioreq, bool):
        raise ServeError(f"{path}: direct_ioreq must be true or false")
    if plan.direct_ioreq and plan.launcher != "process":
        raise ServeError(f"{path}: direct_ioreq needs launcher = \"process\" (the units' "
                         "sandbox may not serve the guest's ioreqs)")
    for level in plan.log_levels.values():
        if level not in LOG_LEVELS:
            raise ServeError(f"{path}: log_level must be one of {', '.join(LOG_LEVELS)}")
    for engine in plan.engines.values():
        if engine not in ENGINES:
            raise ServeError(f"{path}: engine must be one of {', '.join(ENGINES)}")
    if plan.disk is None and plan.tap is None:
        raise ServeError(f"{path}: nothing to serve (no [disk] image and no [nic] tap)")
    if plan.launcher == "systemd" and plan.disk and Path(plan.disk).parent != IMAGE_DIR:
        raise ServeError(f"under systemd the disk image must be in {IMAGE_DIR} "
                         "(the xdev-ahci@ unit's only writable directory)")
    return plan


def check_host() -> None:
    """Root, ``xl`` and a Xen control domain, or a message saying which is missing."""
    if os.geteuid() != 0:
        raise ServeError("run as root (xl and the bridge need /dev/xen/*)")
    if shutil.which("xl") is None:
        raise ServeError("xl not found: install the Xen tools (Debian: xen-utils)")
    try:
        caps = Path("/proc/xen/capabilities").read_text()
    except OSError:
        raise ServeError("this is not a Xen dom0 (/proc/xen/capabilities is missing)") from None
    if "control_d" not in caps:
        raise ServeError("this domain is not Xen's control domain (no control_d)")


def sh(*argv: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        # errors="replace": xl has printed bytes that are not UTF-8 on stderr,
        # and a decoding error must not end the run that only polled it.
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServeError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from None
    if check and done.returncode != 0:
        raise ServeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass
class Report:
    steps: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def step(self, what: str) -> None:
        at = time.monotonic() - self.started
        self.steps.append((what, round(at, 1)))
        print(f"[{at:6.1f} s] {what}", flush=True)

    def as_json(self) -> dict[str, object]:
        return {"steps": self.steps, "notes": self.notes}


def server_argv(plan: Plan, kind: str) -> list[str]:
    """Options for one device server (also the body of its /etc/xdev config)."""
    chosen = plan.engines.get(kind, "native")
    engine = [] if chosen == "native" else ["--engine", chosen]
    engine += _log_level(plan, kind)
    if chosen == "native" and plan.foreign_dma:
        # Root in dom0 may map the guest: DMA without messages through the
        # bridge. Asked for only, until its clean record on the mended
        # emulated host is longer (docs/xdev-demo.md).
        engine.append("--xen-foreign-dma")
    if chosen == "native" and plan.direct_ioreq:
        # The guest's BAR accesses straight from Xen, not through the bridge.
        engine.append("--xen-ioreq")
    if kind == "ahci":
        argv = [] if plan.disk is None else ["--disk", f"file={plan.disk}"]
        if plan.cdrom:
            argv += ["--cdrom", f"file={plan.cdrom}"]
        return argv + engine
    return ["--mac", plan.mac, "--netdev", f"tap,ifname={plan.tap}", *engine]


def kinds(plan: Plan) -> list[tuple[str, str]]:
    out = []
    if plan.disk is not None:
        out.append(("ahci", plan.ahci_bdf))
    if plan.tap is not None:
        out.append(("e1000", plan.e1000_bdf))
    return out


def socket_path(plan: Plan, kind: str) -> str:
    # The path the xdev-*@.socket units listen on (xdevproto/units).
    return f"/run/xdev/{kind}-{plan.instance}.sock"


def _log_level(plan: Plan, kind: str) -> list[str]:
    level = plan.log_levels.get(kind, "info")
    return [] if level == "info" else ["--log-level", level]


def bridge_argv(plan: Plan) -> list[str]:
    argv = ["--domain", plan.name, *_log_level(plan, "bridge")]
    for kind, bdf in kinds(plan):
        argv += ["--device", f"{bdf}=unix:{socket_path(plan, kind)}"]
    return argv


class ProcessLauncher:
    """Device servers and the bridge as child processes of this one."""

    modules = {"ahci": "servers.ahci", "e1000": "servers.e1000.cli", "bridge": "bridge.cli"}

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _spawn(self, what: str, argv: list[str], ready: Callable[[], bool]) -> None:
        # Python start-up has been seen to die under TCG while a guest boots:
        # one retry, then give up with the log's tail.
        self.plan.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.plan.log_dir / f"{what}.log"
        for _attempt in range(3):
            with open(log_path, "ab") as log_file:
                proc = subprocess.Popen([self.plan.python, "-m", self.modules[what], *argv],
                                        stdout=log_file, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None and not ready():
                time.sleep(0.3)
            if proc.poll() is None and ready():
                self.children.append((what, proc))
                return
            proc.kill()
            proc.wait()
        tail = log_path.read_text(errors="replace")[-1500:]
        raise ServeError(f"{what} did not start; its log ({log_path}) ends:\n{tail}")

    def start_servers(self) -> None:
        for kind, _bdf in kinds(self.plan):
            path = socket_path(self.plan, kind)
            Path(path).unlink(missing_ok=True)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._spawn(kind, ["--socket", path, *server_argv(self.plan, kind)],
                        lambda p=path: Path(p).exists())  # type: ignore[misc]

    def start_bridge(self) -> None:
        domid = sh("xl", "domid", self.plan.name).stdout.strip()
        key = f"/local/domain/0/xdev/{domid}/state"

        def running() -> bool:
            return sh("xenstore-read", key, check=False, timeout=30).stdout.strip() == "running"

        self._spawn("bridge", bridge_argv(self.plan), running)

    def stop(self) -> None:
        for what, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
            else:  # died under the guest: say how (a negative code is a signal)
                print(f"xdev: {what} had exited with status {proc.returncode}", file=sys.stderr)
        for what, proc in reversed(self.children):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"{what} ignored SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()
        self.children.clear()


class SystemdLauncher:
    """The units from xdevproto/units, configured under /etc/xdev."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.started: list[str] = []

    def _conf(self, name: str, argv: list[str]) -> None:
        CONF_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        lines = [" ".join(_quote(a) for a in argv[i:i + 2]) for i in range(0, len(argv), 2)]
        (CONF_DIR / f"{name}-{self.plan.instance}.conf").write_text(
            "# written by xdev-demo (bridge/serve.py)\n" + "\n".join(lines) + "\n")

    def _start(self, *units: str) -> None:
        self.started += units
        done = sh("systemctl", "start", *units, timeout=400, check=False)
        if done.returncode != 0:
            status = sh("systemctl", "status", "--no-pager", "-l", *units, check=False).stdout
            raise ServeError(f"systemctl start {' '.join(units)} failed: "
                             f"{done.stderr.strip()}\n{status}")

    def start_servers(self) -> None:
        if sh("systemctl", "cat", f"xdev-bridge@{self.plan.instance}.service",
              check=False).returncode != 0:
            raise ServeError("the xdev units are not installed: run xdev-units install "
                             "(see docs/xdev-systemd.md)")
        if self.plan.disk:
            # The unit's StateDirectory= may have moved the directory to
            # /var/lib/private (DynamicUser=); the image goes in either way.
            IMAGE_DIR.mkdir(parents=True, exist_ok=True)
        units = []
        for kind, _bdf in kinds(self.plan):
            self._conf(kind, server_argv(self.plan, kind))
            units += [f"xdev-{kind}@{self.plan.instance}.socket",
                      f"xdev-{kind}@{self.plan.instance}.service"]
        # The services too, not only their sockets: started together they
        # come up in parallel (Type=notify: systemctl returns at READY=1),
        # instead of one after the other as the bridge connects to each.
        self._start(*units)

    def start_bridge(self) -> None:
        self._conf("bridge", bridge_argv(self.plan))
        # Python starts slowly on an emulated host (40 s seen under TCG):
        # more than the default 90 s start timeout with the connects.
        dropin = Path(f"/run/systemd/system/xdev-bridge@{self.plan.instance}.service.d")
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "xdev-serve.conf").write_text("[Service]\nTimeoutStartSec=300\n")
        sh("systemctl", "daemon-reload")
        self._start(f"xdev-bridge@{self.plan.instance}.service")  # Type=notify: returns at READY

    def stop(self) -> None:
        # The bridge first, then the servers (they flush on SIGTERM), then sockets.
        order = sorted(self.started, key=lambda u: ("bridge" not in u, u.endswith(".socket")))
        for unit in dict.fromkeys(order):
            sh("systemctl", "stop", unit, check=False, timeout=120)
        self.started.clear()


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=:,./@" for c in arg) else json.dumps(arg)


def setup_tap(plan: Plan, systemd: bool) -> bool:
    """Create the tap device (owned by the servers' user) unless it exists; True if created."""
    assert plan.tap is not None
    if Path(f"/sys/class/net/{plan.tap}").exists():
        return False
    owner: list[str] = []
    if systemd:
        # DynamicUser= picks a fresh uid at every start, and a persistent tap
        # admits only its owner: the unit's drop-in names a static user.
        if sh("getent", "passwd", TAP_USER, check=False).returncode != 0:
            sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
               TAP_USER)
        owner = ["user", TAP_USER]
        dropin = Path(f"/run/systemd/system/xdev-e1000@{plan.instance}.service.d")
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "tap-user.conf").write_text(f"[Service]\nUser={TAP_USER}\n")
        sh("systemctl", "daemon-reload")
    sh("ip", "tuntap", "add", "dev", plan.tap, "mode", "tap", *owner)
    if plan.host_address:
        sh("ip", "addr", "add", plan.host_address, "dev", plan.tap)
    sh("ip", "link", "set", plan.tap, "up")
    return True


def tap_counters(ifname: str) -> str:
    """dom0's packet counters of the tap (its rx is what the guest sent)."""
    stats = Path(f"/sys/class/net/{ifname}/statistics")
    try:
        return ", ".join(f"{name} {(stats / name).read_text().strip()}" for name in (
            "rx_packets", "tx_packets", "rx_dropped", "tx_dropped"))
    except OSError as exc:
        return f"no counters ({exc.strerror})"


def domain_exists(name: str) -> bool | None:
    """Whether xl knows the guest; None when xl did not answer in time (a
    starved dom0 has kept it 60 s), which says nothing either way."""
    try:
        return sh("xl", "domid", name, check=False, timeout=60).returncode == 0
    except ServeError as exc:
        print(f"xdev: {exc}", file=sys.stderr)
        return None


def wait_for_guest(plan: Plan, report: Report) -> str:
    """Until the marker is on the serial file, the guest is gone, or the timeout."""
    deadline = time.monotonic() + plan.timeout_s
    misses = 0
    while time.monotonic() < deadline:
        if plan.marker and plan.serial and plan.serial.exists() and \
                plan.marker in plan.serial.read_text(errors="replace"):
            report.step(f"guest printed {plan.marker}")
            return "marker"
        # xl can fail transiently in a starved dom0: three misses in a row.
        exists = domain_exists(plan.name)
        if exists is not None:
            misses = 0 if exists else misses + 1
        if misses >= 3:
            report.step("guest is gone")
            return "gone"
        time.sleep(1)
    report.step(f"timeout after {plan.timeout_s:.0f} s")
    return "timeout"


def serve(plan: Plan, report: Report) -> str:
    """Steps 2-6 of the module docstring; returns how the wait ended."""
    launcher = SystemdLauncher(plan) if plan.launcher == "systemd" else ProcessLauncher(plan)
    tap_created = False
    created = False
    try:
        if plan.tap:
            tap_created = setup_tap(plan, plan.launcher == "systemd")
            report.step(f"tap {plan.tap} {'created' if tap_created else 'exists'}"
                        + (f" with {plan.host_address}" if plan.host_address else ""))
        launcher.start_servers()
        report.step(f"device servers started ({plan.launcher}): "
                    + ", ".join(f"{k} at {b}" for k, b in kinds(plan)))
        sh("xl", "create", "-p", str(plan.xl_config), timeout=300)
        created = True
        report.step(f"guest {plan.name} created paused")
        launcher.start_bridge()
        report.step("bridge serving the guest")
        sh("xl", "unpause", plan.name, timeout=120)
        report.step("guest unpaused")
        return wait_for_guest(plan, report)
    finally:
        if created and domain_exists(plan.name):
            sh("xl", "destroy", plan.name, check=False)
        launcher.stop()
        if plan.tap:
            report.step(f"tap {plan.tap}: {tap_counters(plan.tap)}")
        if tap_created and plan.tap:
            sh("ip", "link", "del", plan.tap, check=False)
        report.step("torn down")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bridge.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, type=Path,
                    help="the TOML config (docs/xdev-demo.md)")
    ap.add_argument("--report", type=Path, help="write step timings as JSON here")
    args = ap.parse_args(argv)
    report = Report()
    status = 1
    try:
        check_host()
        plan = load_plan(args.config)
        outcome = serve(plan, report)
        status = 0 if outcome in ("marker", "gone") else 3
        report.notes.append(f"outcome: {outcome}")
    except ServeError as exc:
        print(f"xdev: {exc}", file=sys.stderr)
        report.notes.append(f"error: {exc}")
    except KeyboardInterrupt:
        report.notes.append("interrupted")
        status = 130
    if args.report:
        args.report.write_text(json.dumps(report.as_json(), indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
