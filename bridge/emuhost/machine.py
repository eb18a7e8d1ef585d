"""The emulated machine: QEMU's command line for Xen + dom0 under TCG.

QEMU loads Xen (multiboot, ``-kernel``) with dom0's kernel and initrd as
modules (``-initrd "KERNEL ARGS,INITRD"``), the root disk under
``snapshot=on`` (every boot starts from the same image), and 9p shares that
dom0 mounts under /xdev.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bridge.emuhost.errors import BootError
from bridge.emuhost.image import Image

TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
RESERVED_TAGS = frozenset({"xdevrun", "xdevrepo", "run", "repo"})


def repo_root() -> Path:
    """The checkout this package runs from (shared read-only into dom0)."""
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Share:
    """A host directory shared into dom0 over 9p, mounted at ``/xdev/TAG``."""

    path: Path
    readonly: bool = True


#: The emulated CPU. Without -smap,-smep dom0 (PV) crashes under TCG.
#: Without -xsave, dom0's programs see their memory and registers change
#: under them while an HVM guest runs (docs/emuhost.md, "Is the emulated
#: host sound?"); with it Xen, dom0 and the guest save FPU/SSE state with
#: FXSAVE and nobody uses AVX.
DEFAULT_CPU = "max,-smap,-smep,-xsave"


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
    #: TCG's threading: "multi" (one host thread per vCPU, the default) or
    #: "single" (one thread for all; slower). $XDEV_EMUHOST_TCG picks it,
    #: to tell emulator faults from xdev's (docs/emuhost.md).
    tcg_threads: str = field(default_factory=lambda: os.environ.get("XDEV_EMUHOST_TCG", "multi"))
    #: The emulated CPU: $XDEV_EMUHOST_CPU, else :data:`DEFAULT_CPU`.
    cpu: str = field(default_factory=lambda: os.environ.get("XDEV_EMUHOST_CPU", DEFAULT_CPU))
    #: More Xen command-line options, from $XDEV_EMUHOST_XEN_ARGS (spaces
    #: between them), for the same purpose.
    more_xen_args: tuple[str, ...] = field(
        default_factory=lambda: tuple(os.environ.get("XDEV_EMUHOST_XEN_ARGS", "").split()))
    #: From QEMU's start to dom0 ready for jobs: ~30 s idle, 120 s seen with
    #: two emulated hosts sharing two cores.
    boot_timeout_s: float = 420.0
    #: Queue behind other emulated hosts using the same cache (see
    #: session.MachineLock); how long to wait for them.
    exclusive: bool = True
    exclusive_wait_s: float = 3600.0

    def xen_cmdline(self) -> str:
        mem = f"dom0_mem={self.dom0_memory_mb}M,max:{self.dom0_memory_mb}M"
        return " ".join([*self.xen_args, mem, *self.more_xen_args])


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
    if boot.tcg_threads not in ("multi", "single"):
        raise BootError(f"TCG threading must be multi or single, not {boot.tcg_threads!r}")
    if "," in dom0 or "," in str(image.dom0_initrd):
        # -initrd separates multiboot modules with commas.
        raise BootError("dom0 kernel arguments and paths must not contain ','")
    argv = [
        boot.qemu,
        "-machine", "pc",
        "-accel", f"tcg,thread={boot.tcg_threads}",
        "-cpu", boot.cpu,
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


def check_shares(shares: Mapping[str, Share]) -> dict[str, Share]:
    """Validate caller-given shares (tags QEMU and 9p accept, existing dirs)."""
    checked = {}
    for tag, share in shares.items():
        if not tag or set(tag) - TAG_CHARS or tag in RESERVED_TAGS or len(tag) > 31:
            raise BootError(f"bad share tag {tag!r} (lower-case letters, digits, _)")
        if not share.path.is_dir():
            raise BootError(f"share {tag}: {share.path} is not a directory")
        if "," in str(share.path):
            raise BootError(f"share {tag}: QEMU cannot take a path with ',': {share.path}")
        checked[tag] = Share(share.path.resolve(), share.readonly)
    return checked
