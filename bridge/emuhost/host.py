"""The emulated Xen host: Xen 4.17 and a Debian dom0 under QEMU TCG.

:class:`EmuHost` ties the cached image (``image.py``), the machine
(``machine.py``) and boots (``session.py``) together:

* ``ensure_image()`` builds the image once per recipe (a few minutes);
* ``run(script)`` boots, runs one dom0 script, powers off -- a pristine dom0;
* ``session()`` boots once for several scripts (saves ~30 s of boot each);
* ``shell()`` boots on the terminal for people.

In dom0, run scripts see ``$XDEV_RUN`` (their job directory, also their cwd,
read back on the host as ``RunResult.results_dir``), ``$XDEV_LIB`` (shell
helpers: ``xdev_guest_start/wait/destroy/run``), the checkout at
``/xdev/repo`` on ``PYTHONPATH``, and extra shares at ``/xdev/TAG``.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bridge.emuhost.errors import BootError
from bridge.emuhost.guest import HvmGuest
from bridge.emuhost.image import (
    BOOT_TOOLS,
    Image,
    Log,
    build_image,
    cached_image,
    check_host_tools,
    default_cache_dir,
)
from bridge.emuhost.machine import BootConfig, Share, check_shares, qemu_command, repo_root
from bridge.emuhost.recipe import Recipe
from bridge.emuhost.session import HostSession, MachineLock, RunResult


@dataclass
class EmuHost:
    """The emulated Xen host: its cached image and how it boots.

    >>> host = EmuHost()
    >>> result = host.run("xl info > info.txt", timeout=300)
    >>> result.ok, result.file("info.txt")
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

    def _check_qemu(self) -> None:
        check_host_tools({self.boot.qemu: BOOT_TOOLS.get(self.boot.qemu, "qemu-system-x86")})

    def session(
        self,
        *,
        shares: Mapping[str, Share] | None = None,
        results_dir: Path | None = None,
    ) -> HostSession:
        """Boot the host; jobs go to the returned session (close it, or use ``with``)."""
        self._check_qemu()
        image = self.ensure_image()
        checked = check_shares(shares or {})
        directory = results_dir or self.new_results_dir()
        lock = None
        if self.boot.exclusive:
            lock = MachineLock(self.cache_dir / "machine.lock",
                               wait_s=self.boot.exclusive_wait_s, log=self.log)
        return HostSession(image, self.boot, directory, checked, log=self.log, lock=lock)

    def run(
        self,
        script: str,
        *,
        guests: Sequence[HvmGuest] = (),
        shares: Mapping[str, Share] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
        results_dir: Path | None = None,
    ) -> RunResult:
        """Boot, run ``script`` (sh, as root) in dom0, power off; QEMU never outlives it.

        ``timeout`` bounds the script once dom0 is up (booting has its own
        limit, ``BootConfig.boot_timeout_s``).
        """
        with self.session(shares=shares, results_dir=results_dir) as session:
            return session.run(script, guests=guests, env=env, timeout=timeout)

    def shell(self, *, shares: Mapping[str, Share] | None = None) -> int:
        """Boot interactively on this terminal: a root shell on the Xen console.

        Ctrl-A X quits QEMU. Mount the checkout with
        ``mkdir -p /xdev/repo; mount -t 9p -o trans=virtio xdevrepo /xdev/repo``.
        """
        self._check_qemu()
        image = self.ensure_image()
        attach = {"xdevrepo": Share(repo_root()), **check_shares(shares or {})}
        return subprocess.call(qemu_command(image, self.boot, attach, console="mon:stdio"))
