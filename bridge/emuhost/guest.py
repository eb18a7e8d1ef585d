"""HVM guests for the emulated Xen host: ``xl`` configs and busybox initramfs images.

An :class:`HvmGuest` describes one guest. The host side renders it into two
files that dom0 reads from the run share: ``NAME.cfg`` (an ``xl.cfg(5)``
domain config) and ``NAME.initrd`` (a gzip'd newc cpio holding a static
busybox, the requested kernel modules and the caller's ``/init`` script).

Choices that matter under emulation (measured on the TCG host, see issue 6):

* ``tsc_mode="native"``: with the default mode the guest kernel hangs on
  RDTSCP under emulated SVM.
* ``serial="file:..."``: a ``pty`` serial is not logged anywhere we can read;
  a file in the run share comes back to the host as it is written.
* ``nox2apic`` on the guest kernel's command line: three of the four guest
  triple faults seen in the Xen tier on 2026-11-26/27 stopped at the
  kernel's x2APIC end-of-interrupt (``wrmsr`` to MSR 0x80b, on an exception
  stack), the fourth at a user-space MMIO write: something in the emulated
  SVM's MSR intercepts or event injection goes wrong now and then. The
  xAPIC's memory-mapped registers take another path through Xen.
* ``xen_platform_pci=0`` by default: with the platform device a Linux guest
  unplugs QEMU's emulated disks and NICs in favour of PV drivers, which would
  hide the emulated baselines the tests compare against.
"""

from __future__ import annotations

import lzma
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.emuhost.cpio import CpioWriter

#: The guest kernel's command line. no_timer_check and tsc=reliable skip the
#: IO-APIC timer check and the TSC watchdog, which misjudge a starved
#: emulated CPU (seen 13.7 s vs 17.2 s to user space); the TSC is native
#: (tsc_mode) so it is reliable here. nox2apic: see the module's docstring.
DEFAULT_CMDLINE = "console=ttyS0 quiet no_timer_check tsc=reliable nox2apic"

#: Where the run share is mounted in dom0 (see ``dom0/boot.sh``).
DOM0_RUN_DIR = "/xdev/run"
#: Sub-directory of a job's directory holding guest configs, initrds and serial logs.
GUESTS_SUBDIR = "guests"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: Runs before the caller's script: a usable busybox userland and the modules.
_INIT_PROLOGUE = """#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Debian's static busybox has no lspci applet; this prints what "lspci -n"
# would, from sysfs: "0000:00:01.0 0601: 8086:7000".
command -v lspci >/dev/null 2>&1 || lspci() {
    for d in /sys/bus/pci/devices/*; do
        echo "${d##*/} $(cut -c3-6 "$d/class"): $(cut -c3- "$d/vendor"):$(cut -c3- "$d/device")"
    done
}
"""

_INIT_EPILOGUE = """
echo "xdev-guest: init script exited with status $?"
sync
poweroff -f
"""


class GuestConfigError(ValueError):
    """A guest description cannot be rendered (bad name, unsafe value, missing module)."""


def _xl_string(value: str) -> str:
    """Quote ``value`` for xl.cfg; refuse what its lexer would misread."""
    if any(ch in value for ch in '"\\\n\r'):
        raise GuestConfigError(f"value not representable in xl.cfg: {value!r}")
    return f'"{value}"'


def _xl_list(values: Iterable[str]) -> str:
    return "[ " + ", ".join(_xl_string(v) for v in values) + " ]"


@dataclass(frozen=True)
class HvmGuest:
    """One HVM guest booted straight into a kernel and a busybox initramfs.

    ``init_script`` is a busybox ``sh`` script run as the guest's init after
    /proc, /sys and /dev are mounted and ``modules`` are loaded; what it prints
    goes to the serial file. The guest powers off when it returns.
    ``disks`` and ``nics`` are xl.cfg ``disk``/``vif`` spec strings (dom0
    paths); ``extra`` adds raw ``(key, value)`` lines for anything else, the
    value in xl.cfg syntax (``("hdtype", '"ahci"')``).
    """

    name: str
    init_script: str
    memory_mb: int = 256
    vcpus: int = 1
    cmdline: str = DEFAULT_CMDLINE
    modules: tuple[str, ...] = ()
    disks: tuple[str, ...] = ()
    nics: tuple[str, ...] = ()
    device_model_args: tuple[str, ...] = ()
    xen_platform_pci: bool = False
    extra: tuple[tuple[str, str], ...] = ()
    #: dom0 path of the guest kernel; None means dom0's own kernel.
    kernel: str | None = None
    #: (guest path, host path) pairs copied into the initramfs: tools busybox
    #: lacks (mkfs.ext4, e2fsck) with their shared libraries and loader.
    files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise GuestConfigError(f"bad guest name {self.name!r}")
        if self.memory_mb < 32 or self.vcpus < 1:
            raise GuestConfigError("guest needs at least 32 MiB and one vCPU")

    def dom0_path(self, run_dir: str, suffix: str) -> str:
        """Where dom0 finds this guest's ``.cfg``/``.initrd``/``.serial`` for a job."""
        return f"{run_dir}/{GUESTS_SUBDIR}/{self.name}.{suffix}"

    def xl_config(self, default_kernel: str, run_dir: str = DOM0_RUN_DIR) -> str:
        """Render the xl.cfg(5) text.

        ``default_kernel`` is dom0's kernel path; ``run_dir`` the job's
        directory in dom0, where the initrd is and the serial log goes.
        """
        lines = [
            f"name = {_xl_string(self.name)}",
            'type = "hvm"',
            f"memory = {self.memory_mb}",
            f"vcpus = {self.vcpus}",
            f"kernel = {_xl_string(self.kernel or default_kernel)}",
            f"ramdisk = {_xl_string(self.dom0_path(run_dir, 'initrd'))}",
            f"cmdline = {_xl_string(self.cmdline)}",
            f"serial = {_xl_string('file:' + self.dom0_path(run_dir, 'serial'))}",
            'tsc_mode = "native"',
            "vnc = 0",
            "sdl = 0",
            f"xen_platform_pci = {int(self.xen_platform_pci)}",
            'on_poweroff = "destroy"',
            'on_reboot = "destroy"',
            'on_crash = "destroy"',
        ]
        if self.disks:
            lines.append(f"disk = {_xl_list(self.disks)}")
        if self.nics:
            lines.append(f"vif = {_xl_list(self.nics)}")
        if self.device_model_args:
            lines.append(f"device_model_args = {_xl_list(self.device_model_args)}")
        for key, value in self.extra:
            if not re.match(r"^[a-z_][a-z0-9_]*$", key) or "\n" in value:
                raise GuestConfigError(f"bad extra xl.cfg line {key!r} = {value!r}")
            lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"

    def initramfs(self, busybox: bytes, modules_dir: Path | None) -> bytes:
        """Build the guest's gzip'd cpio: busybox, ``modules`` and /init."""
        archive = CpioWriter()
        for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp"):
            archive.add_dir(directory, parents=True)
        archive.add_file("bin/busybox", busybox, 0o755)
        load_lines: list[str] = []
        if self.modules:
            if modules_dir is None:
                raise GuestConfigError("modules requested but no kernel modules are available")
            archive.add_dir("modules")
            for index, (stem, data) in enumerate(resolve_modules(modules_dir, self.modules)):
                member = f"modules/{index:03d}-{stem}.ko"
                archive.add_file(member, data)
                load_lines.append(f"insmod /{member} || echo 'xdev-guest: insmod {stem} failed'")
        for guest_path, host_path in self.files:
            parent = guest_path.strip("/").rpartition("/")[0]
            if parent:
                archive.add_dir(parent, parents=True)
            source = Path(host_path)
            archive.add_file(guest_path, source.read_bytes(), source.stat().st_mode & 0o777)
        script = _INIT_PROLOGUE + "\n".join(load_lines) + "\n(\n" + self.init_script
        script += "\n)" + _INIT_EPILOGUE
        archive.add_file("init", script.encode(), 0o755)
        return archive.render_gzip()


def _module_stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse ``modules.dep``: stem -> (relative path, dependency paths).

    Format (kmod's depmod(8)): ``path: dep-path dep-path ...`` per line, with
    each module's full dependency closure listed in load-reverse order.
    """
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        table[_module_stem(path)] = (path.strip(), deps.split())
    return table


def _read_module(path: Path) -> bytes:
    if path.name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko"):
        return path.read_bytes()
    raise GuestConfigError(f"cannot load compressed module {path.name} (only .ko and .ko.xz)")


def resolve_modules(modules_dir: Path, names: Sequence[str]) -> list[tuple[str, bytes]]:
    """Modules ``names`` and their dependencies, in a valid insmod order.

    ``modules_dir`` is a ``/lib/modules/VERSION`` tree. Modules built into the
    kernel (listed in ``modules.builtin``) are skipped, not an error.
    """
    deps = parse_modules_dep((modules_dir / "modules.dep").read_text())
    builtin_file = modules_dir / "modules.builtin"
    builtin = {
        _module_stem(line) for line in builtin_file.read_text().split()
    } if builtin_file.exists() else set()
    order: list[str] = []
    for name in names:
        stem = _module_stem(name)
        if stem in builtin:
            continue
        if stem not in deps:
            raise GuestConfigError(f"kernel module {name!r} not found in {modules_dir}")
        path, dep_paths = deps[stem]
        # depmod lists the closure with the deepest dependency last.
        for dep in [*reversed(dep_paths), path]:
            if dep not in order:
                order.append(dep)
    return [(_module_stem(p), _read_module(modules_dir / p)) for p in order]
