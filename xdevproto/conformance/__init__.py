"""vfio-user conformance suite: checks a server or a client against the spec.

Entry points: :func:`xdevproto.conformance.cli.main` (``xdev-conformance``),
:func:`run_server_suite`, :func:`observe` plus :func:`run_client_checks`, and
the pytest plugin :mod:`xdevproto.conformance.pytest_plugin`.
See docs/conformance.md.
"""

from .catalog import client_checks, server_checks
from .model import Check, Level, Outcome, Result
from .runner import Report, run_server_suite
from .target import ExecTarget, Target

__all__ = ["Check", "ExecTarget", "Level", "Outcome", "Report", "Result", "Target",
           "client_checks", "run_server_suite", "server_checks"]
