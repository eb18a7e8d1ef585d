"""Running checks: one result per check, whatever the peer does.

A check that crashes the server under test fails; a check whose own code
breaks is reported as an error. Nothing a peer does escapes as an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .context import Ctx
from .divergences import divergence
from .model import Check, CheckFailed, Level, NotApplicable, Outcome, Result, Stopwatch
from .target import Target, TargetError

log = logging.getLogger(__name__)


@dataclass
class Report:
    mode: str
    target: str
    peer: str | None
    results: list[Result] = field(default_factory=list)

    def count(self, outcome: Outcome, level: Level | None = None) -> int:
        return sum(1 for r in self.results if r.outcome is outcome
                   and (level is None or r.check.level is level))

    @property
    def must_failures(self) -> list[Result]:
        return [r for r in self.results if r.counts_as_failure and r.check.level is Level.MUST]

    @property
    def exit_status(self) -> int:
        return 1 if self.must_failures else 0


def run_check(ctx: Ctx, check: Check, peer: str | None = None) -> Result:
    ctx.begin()
    watch = Stopwatch()
    try:
        ctx.target.begin_check()
        check.func(ctx)
        outcome, message = Outcome.PASS, ""
    except NotApplicable as exc:
        outcome, message = Outcome.NA, str(exc)
    except CheckFailed as exc:
        outcome, message = Outcome.FAIL, str(exc)
    except TargetError as exc:
        outcome, message = Outcome.FAIL, f"server under test: {exc}"
    except Exception as exc:  # the suite's own bug: report it, keep going
        log.exception("check %s broke", check.id)
        outcome, message = Outcome.ERROR, f"{type(exc).__name__}: {exc}"
    finally:
        ctx.end()
    crash = ctx.target.settle(ctx.hung_up)
    if crash:
        outcome, message = Outcome.FAIL, f"{crash}" + (f" ({message})" if message else "")
    result = Result(check, outcome, message, list(ctx.transcript.items), seconds=watch.elapsed())
    if outcome is Outcome.FAIL:
        why = divergence(peer, check.id, message)
        if why:
            result.outcome, result.divergence = Outcome.DIVERGENCE, why
    return result


def run_server_suite(target: Target, checks: Iterable[Check], *, peer: str | None = None,
                     timeout: float = 2.0,
                     progress: Callable[[Result], None] | None = None) -> Report:
    report = Report("server", target.describe(), peer)
    target.ensure_up()  # a server that cannot start at all is not a list of failures
    ctx = Ctx(target, timeout)
    for check in checks:
        result = run_check(ctx, check, peer)
        report.results.append(result)
        if progress is not None:
            progress(result)
    return report
