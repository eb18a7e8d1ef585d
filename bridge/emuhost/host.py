"""Boot the emulated Xen host under QEMU TCG and run a script in its dom0.

A run is one boot: QEMU loads Xen (multiboot, ``-kernel``) with dom0's kernel
and initrd as modules, the root disk under ``-snapshot`` (every run starts
from the same image), and 9p shares: ``xdevrun`` (the run directory, read-
write, mounted at /xdev/run), ``xdevrepo`` (the checkout, read-only, at
/xdev/repo, on ``PYTHONPATH``) and any the caller adds (at /xdev/TAG).

Results never travel over the console (the Xen serial console drops
characters under load): dom0's ``boot.sh`` writes them into the run
directory and ``exit_status`` last. The console is still saved to
``console.log`` for people debugging a run.

QEMU is always ended: on timeout, on error, on Ctrl-C, and when dom0 wrote
its exit status but the machine did not power off within a grace period.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bridge.emuhost.errors import BootError
from bridge.emuhost.guest import GUESTS_SUBDIR, HvmGuest
from bridge.emuhost.image import (
    BOOT_TOOLS,
    Image,
    Log,
    build_image,
    cached_image,
    check_host_tools,
    default_cache_dir,
)
from bridge.emuhost.recipe import Recipe

_TAG_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_RESERVED_TAGS = frozenset({"xdevrun", "xdevrepo", "run", "repo"})


def repo_root() -> Path:
    """The checkout this package runs from (shared read-only into dom0)."""
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Share:
    """A host directory shared into dom0 over 9p, mounted at ``/xdev/TAG``."""

    path: Path
    readonly: bool = True


@dataclass(frozen=True)
class BootConfig:
    """How the machine boots; none of this needs an image rebuild."""

    memory_mb: int = 3072
    cpus: int = 2
    dom0_memory_mb: int = 1024
    xen_args: tuple[str, ...] = ("console=com1", "com1=115200,8n1", "loglvl=all",
                                 "guest_loglvl=all")
    dom0_args: tuple[str, ...] = ("root=/dev/vda", "ro", "console=hvc0", "quiet")
    qemu: str = "qemu-system-x86_64"

    def xen_cmdline(self) -> str:
        mem = f"dom0_mem={self.dom0_memory_mb}M,max:{self.dom0_memory_mb}M"
        return " ".join([*self.xen_args, mem])


def qemu_command(
    image: Image,
    boot: BootConfig,
    shares: Mapping[str, Share],
    *,
    console: str,
) -> list[str]:
    """QEMU's argv. ``console`` is a chardev spec for the serial line
    (``file:PATH`` for runs, ``mon:stdio`` for an interactive shell)."""
    dom0 = f"{image.dom0_kernel} {' '.join(boot.dom0_args)}"
    if "," in dom0 or "," in str(image.dom0_initrd):
        # -initrd separates multiboot modules with commas.
        raise BootError("dom0 kernel arguments and paths must not contain ','")
    argv = [
        boot.qemu,
        "-machine", "pc",
        "-accel", "tcg,thread=multi",
        # Without -smap,-smep dom0 (PV) crashes under TCG's emulated CPU.
        "-cpu", "max,-smap,-smep",
        "-smp", str(boot.cpus),
        "-m", str(boot.memory_mb),
        "-kernel", str(image.xen),
        "-append", boot.xen_cmdline(),
        "-initrd", f"{dom0},{image.dom0_initrd}",
        "-drive", f"file={image.root_disk},if=virtio,format=raw,snapshot=on",
        "-nic", "none",
        "-display", "none",
        "-vga", "none",
        "-no-reboot",
        "-serial", console,
    ]
    if console != "mon:stdio":
        argv += ["-monitor", "none"]
    for tag, share in shares.items():
        spec = f"local,path={share.path},mount_tag={tag},security_model=none"
        argv += ["-virtfs", spec + (",readonly=on" if share.readonly else "")]
    return argv


@dataclass(frozen=True)
class RunResult:
    """What one run produced. ``exit_status`` is None when run.sh never finished."""

    exit_status: int | None
    results_dir: Path
    console_log: Path
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def output(self) -> str:
        """run.sh's stdout and stderr."""
        return _read(self.results_dir / "output.log")

    def file(self, name: str) -> str:
        return _read(self.results_dir / name)

    def guest_serial(self, guest: str) -> str:
        return _read(self.results_dir / GUESTS_SUBDIR / f"{guest}.serial")

    def describe(self) -> str:
        """A failure message with the tails of the logs worth reading first."""
        parts = [
            f"exit status {self.exit_status}, timed out: {self.timed_out}, "
            f"{self.seconds:.0f} s, results in {self.results_dir}"
        ]
        for name in ("output.log", "boot.log", "console.log"):
            text = _read(self.results_dir / name)
            if text:
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(text.splitlines()[-30:]))
        return "\n".join(parts)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@dataclass
class EmuHost:
    """The emulated Xen host: its cached image and how it boots.

    >>> host = EmuHost()
    >>> host.ensure_image()                          # first time: a few minutes
    >>> result = host.run("xl info | grep virt_caps", timeout=300)
    >>> result.ok, result.output
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    recipe: Recipe = field(default_factory=Recipe)
    boot: BootConfig = field(default_factory=BootConfig)
    log: Log = print

    def image(self) -> Image | None:
        """The cached image, or None if it still has to be built."""
        return cached_image(self.recipe, self.cache_dir)

    def ensure_image(self, *, force: bool = False) -> Image:
        return build_image(self.recipe, self.cache_dir, force=force, log=self.log)

    def new_results_dir(self) -> Path:
        runs = self.cache_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            candidate = runs / f"{stamp}-{os.getpid()}-{n}"
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                continue
        raise BootError(f"cannot make a results directory under {runs}")

    def prepare(
        self,
        script: str,
        results_dir: Path,
        *,
        guests: Sequence[HvmGuest] = (),
        shares: Mapping[str, Share] | None = None,
        env: Mapping[str, str] | None = None,
        script_timeout: float = 600,
        image: Image | None = None,
    ) -> dict[str, Share]:
        """Fill ``results_dir`` with what dom0 reads; return every share to attach."""
        image = image or self.ensure_image()
        all_shares = _check_shares(shares or {})
        results_dir.mkdir(parents=True, exist_ok=True)
        for name in ("boot.sh", "emuhost.sh"):
            data = resources.files("bridge.emuhost").joinpath("dom0", name).read_bytes()
            target = results_dir / ("lib/emuhost.sh" if name == "emuhost.sh" else name)
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(data)
        (results_dir / "run.sh").write_text(script)
        variables = {
            "XDEV_RUN": "/xdev/run",
            "XDEV_REPO": "/xdev/repo",
            "XDEV_LIB": "/xdev/run/lib/emuhost.sh",
            "XDEV_GUEST_KERNEL": image.dom0_kernel_path,
            "XDEV_SCRIPT_TIMEOUT": str(int(script_timeout)),
            "PYTHONPATH": "/xdev/repo",
            **(env or {}),
        }
        (results_dir / "env").write_text(
            "".join(f"export {key}={shlex.quote(value)}\n" for key, value in variables.items())
        )
        (results_dir / "shares").write_text(
            "xdevrepo /xdev/repo ro\n"
            + "".join(
                f"{tag} /xdev/{tag} {'ro' if s.readonly else 'rw'}\n"
                for tag, s in all_shares.items()
            )
        )
        guest_dir = results_dir / GUESTS_SUBDIR
        guest_dir.mkdir(exist_ok=True)
        busybox = image.busybox.read_bytes() if guests else b""
        for guest in guests:
            (guest_dir / f"{guest.name}.cfg").write_text(guest.xl_config(image.dom0_kernel_path))
            (guest_dir / f"{guest.name}.initrd").write_bytes(
                guest.initramfs(busybox, image.modules_dir)
            )
        return {
            "xdevrun": Share(results_dir, readonly=False),
            "xdevrepo": Share(repo_root(), readonly=True),
            **all_shares,
        }

    def run(
        self,
        script: str,
        *,
        guests: Sequence[HvmGuest] = (),
        shares: Mapping[str, Share] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 900,
        results_dir: Path | None = None,
    ) -> RunResult:
        """Boot the host, run ``script`` (sh) in dom0, power off; never leaves QEMU running.

        ``timeout`` bounds the whole boot; run.sh itself gets 60 s less so that
        dom0 still has time to collect logs.
        """
        check_host_tools({self.boot.qemu: BOOT_TOOLS.get(self.boot.qemu, "qemu-system-x86")})
        image = self.ensure_image()
        results = results_dir or self.new_results_dir()
        attach = self.prepare(
            script, results, guests=guests, shares=shares, env=env,
            script_timeout=max(30.0, timeout - 60), image=image,
        )
        console = results / "console.log"
        argv = qemu_command(image, self.boot, attach, console=f"file:{console}")
        (results / "qemu-argv.txt").write_text(shlex.join(argv) + "\n")
        self.log(f"booting the emulated Xen host; results in {results}")
        started = time.monotonic()
        timed_out = _run_qemu(argv, results, timeout)
        status = _read(results / "exit_status").strip()
        return RunResult(
            exit_status=int(status) if status.lstrip("-").isdigit() else None,
            results_dir=results,
            console_log=console,
            timed_out=timed_out,
            seconds=time.monotonic() - started,
        )

    def shell(self, *, shares: Mapping[str, Share] | None = None) -> int:
        """Boot interactively on this terminal (root shell on the Xen console).

        Ctrl-A X quits QEMU. The repo is shared at /xdev/repo once mounted
        with ``mount -t 9p -o trans=virtio xdevrepo /xdev/repo``.
        """
        check_host_tools({self.boot.qemu: BOOT_TOOLS.get(self.boot.qemu, "qemu-system-x86")})
        image = self.ensure_image()
        attach = {"xdevrepo": Share(repo_root()), **_check_shares(shares or {})}
        return subprocess.call(qemu_command(image, self.boot, attach, console="mon:stdio"))


def _check_shares(shares: Mapping[str, Share]) -> dict[str, Share]:
    checked = {}
    for tag, share in shares.items():
        if not tag or set(tag) - _TAG_OK or tag in _RESERVED_TAGS or len(tag) > 31:
            raise BootError(f"bad share tag {tag!r} (lower-case letters, digits, _)")
        if not share.path.is_dir():
            raise BootError(f"share {tag}: {share.path} is not a directory")
        if "," in str(share.path):
            raise BootError(f"share {tag}: QEMU cannot take a path with ',': {share.path}")
        checked[tag] = Share(share.path.resolve(), share.readonly)
    return checked


#: How long dom0 gets to power off after writing exit_status.
POWEROFF_GRACE_S = 20.0


def _run_qemu(argv: list[str], results: Path, timeout: float) -> bool:
    """Run QEMU to completion or kill it; True if the timeout struck."""
    with open(results / "qemu-stderr.log", "wb") as stderr:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True,  # its own process group, killed as one
            )
        except OSError as exc:
            raise BootError(f"cannot start {argv[0]}: {exc}") from exc
    deadline = time.monotonic() + timeout
    finished_at: float | None = None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                return True
            if finished_at is None and (results / "exit_status").exists():
                finished_at = now
            if finished_at is not None and now - finished_at > POWEROFF_GRACE_S:
                return False
            time.sleep(0.5)
        if proc.returncode != 0 and not (results / "exit_status").exists():
            raise BootError(
                f"QEMU exited with status {proc.returncode}: "
                + _read(results / "qemu-stderr.log")[-2000:]
            )
        return False
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
