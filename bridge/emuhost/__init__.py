"""The emulated Xen host: Xen 4.17 + a Debian dom0 under QEMU TCG.

Used by the Xen test tier (``tests/e2e/xen``) and by the main job where no
real Xen host is present. See ``host.EmuHost`` for the API and
``python -m bridge.emuhost --help`` for the command line.
"""

from bridge.emuhost.errors import BootError, EmuHostError, ImageBuildError, MissingHostTool
from bridge.emuhost.guest import GuestConfigError, HvmGuest
from bridge.emuhost.host import EmuHost
from bridge.emuhost.image import Image, default_cache_dir
from bridge.emuhost.machine import BootConfig, Share
from bridge.emuhost.recipe import Recipe
from bridge.emuhost.session import HostSession, RunResult

__all__ = [
    "BootConfig",
    "BootError",
    "EmuHost",
    "EmuHostError",
    "GuestConfigError",
    "HostSession",
    "HvmGuest",
    "Image",
    "ImageBuildError",
    "MissingHostTool",
    "Recipe",
    "RunResult",
    "Share",
    "default_cache_dir",
]
