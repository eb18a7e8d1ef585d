"""What goes into the emulated Xen host's image, and the hash that names it.

The image is rebuilt when, and only when, the recipe changes: the digest
covers the Debian suite, the package list, the files laid over the rootfs and
a format number bumped whenever the build steps in ``image.py`` change
meaning. Boot-time settings (Xen and dom0 command lines, memory) are not part
of it: they change without a rebuild.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources

#: Bump when image.py builds a different image from the same recipe.
BUILD_FORMAT = 1

#: dom0 packages. Notes on the less obvious ones:
#: * xen-hypervisor-4.17-amd64 is installed only so that its xen.gz can be
#:   taken from the rootfs; the host boots it with QEMU's -kernel.
#: * busybox-static (not busybox): its binary also goes into guest initramfs
#:   images, which have no libc.
#: * python3-ply: debootstrap's resolver does not follow virtual packages, and
#:   python3-pycparser (for python3-cffi) depends on ply's virtual names.
#: * python3-construct (2.10.68) and python3-pyxs match pyproject's runtime
#:   dependencies, so no wheels need copying in.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "xen-utils-4.17",
    "xen-hypervisor-4.17-amd64",
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "python3",
    "python3-cffi",
    "python3-ply",
    "python3-construct",
    "python3-pyxs",
    "libatomic1",  # atomic ring pointers for the ioreq server's buffered ring
    "qemu-system-xen",
    "busybox-static",
    "iproute2",
    "pciutils",
    "e2fsprogs",
    "procps",
)


def _dom0_file(name: str) -> bytes:
    return resources.files("bridge.emuhost").joinpath("dom0", name).read_bytes()


@dataclass(frozen=True)
class OverlayFile:
    """A file written into the rootfs after debootstrap (path is absolute in dom0)."""

    path: str
    content: bytes
    mode: int = 0o644


def default_overlay() -> tuple[OverlayFile, ...]:
    """Files that make dom0 boot into the run share's script, or to a root shell."""
    return (
        OverlayFile("/etc/hostname", b"xdev-dom0\n"),
        OverlayFile("/etc/fstab", b"/dev/vda / ext4 rw,errors=remount-ro 0 1\n"),
        OverlayFile(
            "/etc/modules-load.d/xdev-emuhost.conf",
            b"# 9p for the host shares; Xen back ends for guests\n"
            b"9pnet_virtio\n9p\nxen-evtchn\nxen-gntdev\nxen-gntalloc\nxen-privcmd\n"
            b"xen-blkback\nxen-netback\n",
        ),
        OverlayFile(
            "/etc/systemd/system/xdev-emuhost.service", _dom0_file("xdev-emuhost.service")
        ),
        OverlayFile("/usr/local/sbin/xdev-emuhost-stub", _dom0_file("xdev-emuhost-stub"), 0o755),
        OverlayFile(
            "/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf",
            _dom0_file("autologin.conf"),
        ),
        # The journal stays in RAM: the root disk is a -snapshot overlay anyway.
        OverlayFile(
            "/etc/systemd/journald.conf.d/xdev-emuhost.conf", b"[Journal]\nStorage=volatile\n"
        ),
    )


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the image's content."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    overlay: tuple[OverlayFile, ...] = field(default_factory=default_overlay)
    #: Units enabled by symlinking them into multi-user.target.wants.
    enable_units: tuple[str, ...] = ("xdev-emuhost.service",)
    #: Free space left in the root file system beyond what the rootfs uses.
    headroom_mb: int = 1024

    def canonical(self) -> dict[str, object]:
        """A JSON-able description; equal recipes give equal documents."""
        return {
            "build_format": BUILD_FORMAT,
            "suite": self.suite,
            "packages": sorted(self.packages),
            "overlay": [
                {
                    "path": f.path,
                    "mode": f.mode,
                    "sha256": hashlib.sha256(f.content).hexdigest(),
                }
                for f in sorted(self.overlay, key=lambda f: f.path)
            ],
            "enable_units": sorted(self.enable_units),
            "headroom_mb": self.headroom_mb,
        }

    def digest(self) -> str:
        """Short content hash naming the cached image directory."""
        document = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(document.encode()).hexdigest()[:16]
