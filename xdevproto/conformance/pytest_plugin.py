"""pytest plugin: run the vfio-user conformance suite inside a project's tests.

Enable it with ``-p xdevproto.conformance.pytest_plugin`` (or the ``pytest11``
entry point ``xdev_conformance``). Mark a test and ask for the
``vfio_user_check`` fixture; the test is parametrised with one case per check::

    @pytest.mark.vfio_user_server(exec="my-server --socket {socket}")
    def test_conformance(vfio_user_check):
        pass

Marker arguments: ``socket=PATH`` or ``exec=CMD`` or ``fixture=NAME`` (a
fixture returning a socket path or a :class:`~.target.Target`), and optionally
``peer=``, ``groups=[...]``, ``only=[...]`` (ids), ``levels=["MUST"]`` (which
levels fail the test; others are reported as skips) and ``timeout=``.

A check that is not applicable, or fails with a documented divergence of
``peer``, is skipped with the reason. The fixture's value is the
:class:`~.model.Result`.
"""

from __future__ import annotations

from typing import Any

import pytest

from .catalog import server_checks
from .context import Ctx
from .model import Level, Outcome, Result
from .runner import run_check
from .target import ExecTarget, Target

MARKER = "vfio_user_server"
_CTX_KEY = pytest.StashKey[dict[Any, Ctx]]()
_FAILURE_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(socket=None, exec=None, fixture=None, peer=None, groups=None, "
        "only=None, levels=None, timeout=2.0): run the vfio-user conformance suite against "
        "a server, one test per check (use the vfio_user_check fixture)")
    config.stash[_CTX_KEY] = {}


def pytest_unconfigure(config: pytest.Config) -> None:
    for ctx in config.stash.get(_CTX_KEY, {}).values():
        ctx.target.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vfio_user_check" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        raise pytest.UsageError(f"vfio_user_check needs @pytest.mark.{MARKER}(...)")
    kw = marker.kwargs
    groups, only = set(kw.get("groups") or ()), set(kw.get("only") or ())
    checks = [c for c in server_checks()
              if (not groups or c.group in groups) and (not only or c.id in only)]
    metafunc.parametrize("vfio_user_check", checks, ids=[c.id for c in checks], indirect=True)


def _context(request: pytest.FixtureRequest, kw: dict[str, Any]) -> Ctx:
    cache = request.config.stash[_CTX_KEY]
    timeout = float(kw.get("timeout", 2.0))
    value: Any = None
    if kw.get("fixture"):
        value = request.getfixturevalue(kw["fixture"])
        key: Any = ("fixture", id(value))
    elif kw.get("exec"):
        key = ("exec", kw["exec"])
    elif kw.get("socket"):
        key = ("socket", kw["socket"])
    else:
        raise pytest.UsageError(f"@pytest.mark.{MARKER} needs socket=, exec= or fixture=")
    ctx = cache.get(key)
    if ctx is None:
        if isinstance(value, Target):
            target = value
        elif value is not None:
            target = Target(str(value))
        elif kw.get("exec"):
            target = ExecTarget(kw["exec"])
        else:
            target = Target(kw["socket"])
        ctx = cache[key] = Ctx(target, timeout)
    return ctx


@pytest.fixture
def vfio_user_check(request: pytest.FixtureRequest) -> Result:
    """Run one conformance check (the parameter) against the marked server."""
    marker = request.node.get_closest_marker(MARKER)
    assert marker is not None  # pytest_generate_tests only parametrises marked tests
    kw = marker.kwargs
    ctx = _context(request, kw)
    result = run_check(ctx, request.param, kw.get("peer"))
    levels = {Level(v) for v in kw.get("levels") or [lv.value for lv in Level]}
    check = result.check
    where = f"{check.id} [{check.level.value}, {check.section}]"
    if result.outcome is Outcome.NA:
        pytest.skip(f"{where}: not applicable: {result.message}")
    if result.outcome is Outcome.DIVERGENCE:
        pytest.skip(f"{where}: documented divergence of {kw.get('peer')}: {result.divergence}")
    if result.counts_as_failure:
        if check.level not in levels:
            pytest.skip(f"{where}: failed (level not enforced): {result.message}")
        text = "\n".join(e.render() for e in result.transcript)
        # Reported in the call phase (a failure, not a setup error).
        request.node.stash[_FAILURE_KEY] = f"{where}: {result.message}\n{text}"
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    failure = item.stash.get(_FAILURE_KEY, None)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
