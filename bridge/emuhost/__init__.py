"""The emulated Xen host: Xen 4.17 + a Debian dom0 under QEMU TCG.

Used by the Xen test tier (``tests/e2e/xen``) and by the main job where no
real Xen host is present. See ``host.EmuHost`` for the API and
``python -m bridge.emuhost --help`` for the command line.
"""

from bridge.emuhost.errors import BootError, EmuHostError, ImageBuildError, MissingHostTool
from bridge.emuhost.guest import GuestConfigError, HvmGuest
from bridge.emuhost.host import BootConfig, EmuHost, RunResult, Share
from bridge.emuhost.image import Image, default_cache_dir
from bridge.emuhost.recipe import Recipe

__all__ = [
    "BootConfig",
    "BootError",
    "EmuHost",
    "EmuHostError",
    "GuestConfigError",
    "HvmGuest",
    "Image",
    "ImageBuildError",
    "MissingHostTool",
    "Recipe",
    "RunResult",
    "Share",
    "default_cache_dir",
]
