"""All checks, in report order (importing the check modules registers them)."""

from __future__ import annotations

from . import (  # noqa: F401  (importing registers the checks)
    checks_device,
    checks_dma_irq,
    checks_migration,
    checks_robustness,
    checks_session,
)
from .model import Check
from .registry import CLIENT, SERVER

SERVER_GROUPS = ("version", "header", "info", "region", "access", "dma", "irq", "reset",
                 "write-multi", "migration", "dirty", "malformed", "fds", "disconnect")


def server_checks() -> list[Check]:
    order = {g: i for i, g in enumerate(SERVER_GROUPS)}
    return sorted(SERVER.checks, key=lambda c: order.get(c.group, len(order)))


def client_checks() -> list[Check]:
    from . import checks_client  # noqa: F401  (registers the client checks)
    return list(CLIENT.checks)


__all__ = ["CLIENT", "SERVER", "client_checks", "server_checks"]
