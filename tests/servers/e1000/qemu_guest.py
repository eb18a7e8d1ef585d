"""A small Linux guest for QEMU in tests: Debian's kernel, a busybox initramfs.

Nothing is installed on the host. ``apt-get download`` fetches Debian's
current ``linux-image-*-amd64`` (the one ``linux-image-amd64`` depends on)
and ``busybox-static``; ``dpkg-deb --fsys-tarfile`` feeds tar, which takes out
only the kernel, the requested modules and busybox. The result is cached
under ``$XDG_CACHE_HOME/xdev/qemu-guest/PACKAGE/`` (``~/.cache`` without
XDG_CACHE_HOME); a ``complete`` marker written last means a half-extracted
tree is never used, and a lock serialises concurrent test sessions.

The Debian package carries no ``modules.dep`` (depmod runs at install
time), so module dependencies come from each module's ``.modinfo``
``depends=`` field (kmod's modinfo(8) reads the same string).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bridge.emuhost.guest import HvmGuest

KERNEL_META = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"


class GuestBuildError(RuntimeError):
    """The guest kernel, modules or busybox could not be obtained."""


@dataclass(frozen=True)
class GuestKernel:
    """An extracted Debian kernel: ``vmlinuz``, its module tree and busybox."""

    directory: Path
    version: str

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules_dir(self) -> Path:
        return self.directory / "lib" / "modules" / self.version

    @property
    def busybox(self) -> Path:
        return self.directory / "bin" / "busybox"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xdev" / "qemu-guest"


def _run(command: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False,
                                timeout=600)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{command[0]} not found: the guest kernel and busybox come "
                              "from Debian's archive through apt") from exc
    if result.returncode != 0:
        raise GuestBuildError(f"{' '.join(command)} failed ({result.returncode}): "
                              f"{result.stderr.strip()[-2000:]}")
    return result.stdout


def kernel_package() -> str:
    """The versioned image package ``linux-image-amd64`` depends on right now."""
    out = _run(["apt-cache", "depends", KERNEL_META])
    names = re.findall(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if not names:
        raise GuestBuildError(f"apt-cache names no kernel behind {KERNEL_META}: {out!r}")
    return names[0]


def _download(package: str, into: Path) -> Path:
    _run(["apt-get", "download", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {package} left no .deb in {into}")
    return debs[-1]


def _extract(deb: Path, into: Path, patterns: list[str]) -> None:
    """Unpack the members of ``deb`` matching tar ``patterns`` into ``into``."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as dpkg:
        tar = subprocess.run(["tar", "-x", "-C", str(into), "--wildcards", *patterns],
                             stdin=dpkg.stdout, capture_output=True, text=True, check=False)
    if dpkg.returncode != 0 or tar.returncode != 0:
        raise GuestBuildError(f"extracting {patterns} from {deb.name}: {tar.stderr.strip()}")


def module_depends(data: bytes) -> list[str]:
    """Names in a module's ``depends=`` modinfo string (empty when it has none)."""
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if match is None:
        return []
    return [name.decode() for name in match.group(1).split(b",") if name]


def _write_modules_dep(modules_dir: Path) -> None:
    """A ``modules.dep`` over the extracted modules, for emuhost's resolver."""
    lines = []
    stems = {p.name.removesuffix(".ko").replace("-", "_"): p for p in modules_dir.rglob("*.ko")}
    for stem, path in sorted(stems.items()):
        closure: list[str] = []
        pending = module_depends(path.read_bytes())
        while pending:
            name = pending.pop(0).replace("-", "_")
            if name not in stems:
                raise GuestBuildError(f"{stem} needs module {name}, which was not extracted")
            rel = str(stems[name].relative_to(modules_dir))
            if rel not in closure:
                closure.append(rel)
                pending += module_depends(stems[name].read_bytes())
        lines.append(f"{path.relative_to(modules_dir)}: {' '.join(closure)}".rstrip())
    (modules_dir / "modules.dep").write_text("\n".join(lines) + "\n")


def debian_kernel(module_paths: tuple[str, ...]) -> GuestKernel:
    """The cached kernel with ``module_paths`` (globs below ``kernel/``), fetching it once.

    ``module_paths`` must include every dependency of the wanted modules;
    a missing one is an error naming it, found when the cache is built.
    """
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    key = package + "+" + "+".join(p.replace("/", "_").replace("*", "") for p in module_paths)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    directory = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (directory / "complete").is_file():
            return GuestKernel(directory, version)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            debs = Path(scratch)
            kernel_deb = _download(package, debs)
            _extract(kernel_deb, directory, [
                f"./boot/vmlinuz-{version}", f"./lib/modules/{version}/modules.builtin",
                *(f"./lib/modules/{version}/kernel/{p}" for p in module_paths)])
            _extract(_download(BUSYBOX_PACKAGE, debs), directory, ["./bin/busybox"])
        kernel = GuestKernel(directory, version)
        for path in (kernel.vmlinuz, kernel.busybox):
            if not path.is_file():
                raise GuestBuildError(f"{path} missing after extraction")
        _write_modules_dep(kernel.modules_dir)
        (directory / "complete").write_text(package + "\n")
        return kernel


def initramfs(kernel: GuestKernel, init_script: str, modules: tuple[str, ...]) -> bytes:
    """A gzip'd newc initramfs: busybox, ``modules`` (with dependencies), /init.

    The layout and the init prologue are emuhost's (:class:`HvmGuest`); the
    guest powers off when ``init_script`` returns.
    """
    guest = HvmGuest(name="qemu-wire", init_script=init_script, modules=modules)
    return guest.initramfs(kernel.busybox.read_bytes(), kernel.modules_dir)
