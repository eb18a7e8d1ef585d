"""Build and cache the emulated Xen host's image.

Steps (each needs root, which the harness has on developer machines and CI):

1. ``debootstrap --variant=minbase --include=PACKAGES SUITE rootfs [MIRROR]``;
   the mirror is the host's own Debian mirror from its apt sources, or
   debootstrap's default when none is configured.
2. Lay the recipe's overlay files over the rootfs, enable its units, clear
   root's password (the disk only ever boots under ``-snapshot``).
3. Take out what QEMU and the guests need from the host side: Xen
   (``/boot/xen-*.gz``, gunzipped: QEMU's multiboot loader wants an ELF),
   dom0's kernel and initrd, the static busybox and ``/lib/modules``.
4. ``mkfs.ext4 -d rootfs`` makes the root disk without loop mounts.

The result lives in ``CACHE/images/DIGEST/`` with a ``manifest.json``; a
half-built image never has one, so it is never used. A lock file serialises
concurrent builds of the same recipe (several test sessions on one machine).
"""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from bridge.emuhost.errors import ImageBuildError, MissingHostTool
from bridge.emuhost.recipe import Recipe

Log = Callable[[str], None]

#: Host programs each phase runs, with the Debian package providing each.
BUILD_TOOLS = {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs"}
BOOT_TOOLS = {"qemu-system-x86_64": "qemu-system-x86"}

_MANIFEST = "manifest.json"


def check_host_tools(tools: dict[str, str]) -> None:
    """Raise :class:`MissingHostTool` naming the packages of absent programs."""
    # debootstrap and mkfs live in /usr/sbin, which a non-login PATH may lack.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = {tool: pkg for tool, pkg in tools.items() if shutil.which(tool, path=search) is None}
    if missing:
        raise MissingHostTool(missing)


def _tool(name: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search) or name


def default_cache_dir() -> Path:
    """``$XDEV_EMUHOST_CACHE``, else ``$XDG_CACHE_HOME/xdev/emuhost``, else ``~/.cache/...``."""
    explicit = os.environ.get("XDEV_EMUHOST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xdev" / "emuhost"


def find_mirror(sources: Iterable[str], suite: str) -> str | None:
    """The first Debian mirror URI serving ``suite``'s main component.

    ``sources`` are the texts of apt source files in either format
    (sources.list(5): one-line ``deb URI SUITE COMPONENTS`` and deb822
    ``.sources`` stanzas with ``Types``/``URIs``/``Suites``/``Components``).
    """
    for text in sources:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
                return words[1]
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, list[str]] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
            if (
                "deb" in fields.get("types", [])
                and suite in fields.get("suites", [])
                and "main" in fields.get("components", [])
                and fields.get("uris")
            ):
                return fields["uris"][0]
    return None


def host_apt_sources(root: Path = Path("/etc/apt")) -> list[str]:
    """Texts of the host's apt source files (missing or unreadable ones skipped)."""
    paths = [root / "sources.list"]
    listdir = root / "sources.list.d"
    if listdir.is_dir():
        paths += sorted(p for p in listdir.iterdir() if p.suffix in (".list", ".sources"))
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    return texts


@dataclass(frozen=True)
class Image:
    """A built image; every path is on the host."""

    directory: Path
    recipe_digest: str
    kernel_version: str
    built_at: float
    build_seconds: float

    @property
    def xen(self) -> Path:
        return self.directory / "xen"

    @property
    def dom0_kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def dom0_initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def root_disk(self) -> Path:
        return self.directory / "root.img"

    @property
    def busybox(self) -> Path:
        return self.directory / "busybox"

    @property
    def modules_dir(self) -> Path:
        return self.directory / "modules" / self.kernel_version

    @property
    def dom0_kernel_path(self) -> str:
        """The kernel's path inside dom0, for guests that boot the same kernel."""
        return f"/boot/vmlinuz-{self.kernel_version}"

    @classmethod
    def load(cls, directory: Path) -> Image:
        data = json.loads((directory / _MANIFEST).read_text())
        return cls(
            directory=directory,
            recipe_digest=data["recipe_digest"],
            kernel_version=data["kernel_version"],
            built_at=data["built_at"],
            build_seconds=data["build_seconds"],
        )

    def save(self) -> None:
        data = asdict(self)
        del data["directory"]
        (self.directory / _MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def cached_image(recipe: Recipe, cache_dir: Path) -> Image | None:
    """The finished image for ``recipe`` if it is in the cache."""
    directory = cache_dir / "images" / recipe.digest()
    if (directory / _MANIFEST).is_file():
        return Image.load(directory)
    return None


def build_image(
    recipe: Recipe, cache_dir: Path, *, force: bool = False, log: Log = print
) -> Image:
    """Return the cached image for ``recipe``, building it first if needed."""
    images = cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    digest = recipe.digest()
    with open(images / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it
        existing = cached_image(recipe, cache_dir)
        if existing is not None and not force:
            return existing
        check_host_tools(BUILD_TOOLS)
        work = images / f"{digest}.build"
        _remove_tree(work)
        work.mkdir()
        started = time.monotonic()
        version = _build_into(recipe, work, log)
        image = Image(work, digest, version, time.time(), time.monotonic() - started)
        image.save()
        final = images / digest
        _remove_tree(final)
        work.rename(final)
        log(f"image {digest} built in {image.build_seconds:.0f} s at {final}")
        return Image.load(final)


def _build_into(recipe: Recipe, work: Path, log: Log) -> str:
    rootfs = work / "rootfs"
    mirror = find_mirror(host_apt_sources(), recipe.suite)
    command = [
        _tool("debootstrap"),
        "--variant=minbase",
        "--include=" + ",".join(recipe.packages),
        recipe.suite,
        str(rootfs),
    ]
    if mirror:
        command.append(mirror)
    log(f"debootstrap {recipe.suite} from {mirror or 'the default mirror'} (a few minutes)")
    _run(command, work / "debootstrap.log", rootfs)
    _apply_overlay(recipe, rootfs)
    version = _extract_boot_files(rootfs, work)
    size_mb = _tree_size_mb(rootfs) + recipe.headroom_mb
    log(f"making the {size_mb} MiB root disk")
    _run(
        [_tool("mkfs.ext4"), "-q", "-F", "-L", "xdev-root", "-d", str(rootfs),
         str(work / "root.img"), f"{size_mb}M"],
        work / "mkfs.log",
        rootfs,
    )
    _remove_tree(rootfs)
    return version


def _run(command: list[str], logfile: Path, rootfs: Path) -> None:
    with open(logfile, "wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        _unmount_below(rootfs)
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        raise ImageBuildError(
            f"{Path(command[0]).name} failed with status {result.returncode}; "
            f"log {logfile}:\n" + "\n".join(tail)
        )


def _apply_overlay(recipe: Recipe, rootfs: Path) -> None:
    for item in recipe.overlay:
        target = rootfs / item.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(item.content)
        target.chmod(item.mode)
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in recipe.enable_units:
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    shadow = rootfs / "etc/shadow"
    lines = shadow.read_text().splitlines(keepends=True)
    shadow.write_text("".join(re.sub(r"^root:[^:]*:", "root::", line) for line in lines))


def _extract_boot_files(rootfs: Path, work: Path) -> str:
    boot = rootfs / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    xens = sorted(boot.glob("xen-*.gz"))
    if len(kernels) != 1 or not xens:
        raise ImageBuildError(f"expected one kernel and a xen.gz in {boot}, found {kernels} {xens}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = boot / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ImageBuildError(f"no initrd for kernel {version} in {boot}")
    shutil.copyfile(kernels[0], work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")
    # xen-4.17-amd64.gz sorts before xen-4.17.x-amd64.gz variants; any one will do.
    with gzip.open(xens[0]) as compressed, open(work / "xen", "wb") as plain:
        shutil.copyfileobj(compressed, plain)
    shutil.copyfile(rootfs / "bin/busybox", work / "busybox")
    (work / "busybox").chmod(0o755)
    (work / "modules").mkdir()
    shutil.copytree(rootfs / "lib/modules" / version, work / "modules" / version, symlinks=True)
    return version


def _tree_size_mb(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size + 4096
            except OSError:
                continue
    return total // (1 << 20) + 1


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)


def _unmount_below(path: Path) -> None:
    """Undo mounts debootstrap may leave behind when it fails half-way."""
    if not path.exists():
        return
    for point in _mounts_below(path):
        subprocess.run(["umount", "-l", point], check=False)


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    _unmount_below(path)
    if _mounts_below(path):
        raise ImageBuildError(f"refusing to delete {path}: something is still mounted below it")
    shutil.rmtree(path)
