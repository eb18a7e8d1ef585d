"""What a conformance check is, and what running one produces.

A check is a small declared object: an id, a title, the spec section it
tests, its level (the spec's MUST/SHOULD/MAY), a group, and a function.
The function returns normally to pass, raises :class:`CheckFailed` to fail
and :class:`NotApplicable` when the peer lacks what the check needs. Every
byte sent and received during a check is kept in its transcript, so a
failure shows the exchange that caused it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Level(enum.Enum):
    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    NA = "n/a"
    #: failed, and the failure is a documented divergence of the selected peer
    DIVERGENCE = "divergence"
    #: the check itself broke (a bug in the suite, reported, never raised)
    ERROR = "error"


class CheckFailed(Exception):
    """The peer did something the check forbids."""


class NotApplicable(Exception):
    """The peer lacks what the check exercises (no migration, no IRQs...)."""


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    section: str
    level: Level
    group: str
    func: Callable[[Any], None]
    #: "server" (we are the client) or "client" (we are the server)
    mode: str = "server"


@dataclass
class Exchange:
    """One message or chunk on the wire, in the order it happened."""

    direction: str  # "sent" | "received" | "note"
    data: bytes = b""
    fds: int = 0
    text: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"direction": self.direction}
        if self.data:
            out["hex"] = self.data.hex()
        if self.fds:
            out["fds"] = self.fds
        if self.text:
            out["text"] = self.text
        return out

    def render(self, limit: int = 96) -> str:
        if self.direction == "note":
            return f"  -- {self.text}"
        arrow = ">>" if self.direction == "sent" else "<<"
        hx = self.data[:limit].hex(" ")
        more = f" ... (+{len(self.data) - limit} bytes)" if len(self.data) > limit else ""
        fds = f" [+{self.fds} fds]" if self.fds else ""
        return f"  {arrow} {hx}{more}{fds}"


@dataclass
class Transcript:
    items: list[Exchange] = field(default_factory=list)
    limit: int = 200

    def add(self, direction: str, data: bytes = b"", fds: int = 0, text: str = "") -> None:
        if len(self.items) < self.limit:
            self.items.append(Exchange(direction, bytes(data[:4096]), fds, text))

    def note(self, text: str) -> None:
        self.add("note", text=text)


@dataclass
class Result:
    check: Check
    outcome: Outcome
    message: str = ""
    transcript: list[Exchange] = field(default_factory=list)
    divergence: str = ""
    seconds: float = 0.0

    @property
    def counts_as_failure(self) -> bool:
        return self.outcome in (Outcome.FAIL, Outcome.ERROR)

    def to_json(self) -> dict[str, Any]:
        c = self.check
        out: dict[str, Any] = {
            "id": c.id, "title": c.title, "section": c.section, "level": c.level.value,
            "group": c.group, "mode": c.mode, "outcome": self.outcome.value,
            "message": self.message, "seconds": round(self.seconds, 4),
        }
        if self.divergence:
            out["divergence"] = self.divergence
        if self.outcome is not Outcome.PASS:
            out["transcript"] = [e.to_json() for e in self.transcript]
        return out


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Registry:
    """An ordered set of checks; ids are unique."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.checks: list[Check] = []

    def __call__(self, id: str, title: str, section: str, level: Level,
                 group: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
        def add(func: Callable[[Any], None]) -> Callable[[Any], None]:
            if any(c.id == id for c in self.checks):
                raise ValueError(f"duplicate check id {id}")
            self.checks.append(Check(id, title, section, level, group, func, self.mode))
            return func
        return add

    def select(self, ids: set[str] | None = None, groups: set[str] | None = None,
               levels: set[Level] | None = None) -> list[Check]:
        return [c for c in self.checks
                if (not ids or c.id in ids) and (not groups or c.group in groups)
                and (not levels or c.level in levels)]
