"""Errors of the emulated Xen host harness."""

from __future__ import annotations


class EmuHostError(Exception):
    """Base class for everything the harness reports."""


class MissingHostTool(EmuHostError):
    """A program the harness runs on the host is not installed.

    The message names the Debian packages that provide the missing programs.
    """

    def __init__(self, missing: dict[str, str]) -> None:
        self.missing = dict(missing)
        packages = " ".join(sorted(set(missing.values())))
        tools = ", ".join(sorted(missing))
        super().__init__(f"missing host tools: {tools} (install: apt-get install {packages})")


class ImageBuildError(EmuHostError):
    """Building the dom0 image failed; the message ends with the failing step's log."""


class BootError(EmuHostError):
    """QEMU could not be started, or the host never reached the run script."""
