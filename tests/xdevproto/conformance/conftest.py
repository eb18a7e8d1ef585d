"""Fixtures for the conformance tests (helpers live in conformance_helpers)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conformance_helpers import FULL_CAPS, serving

from xdevproto.server import Server
from xdevproto.testdev import TestDevice


@pytest.fixture(scope="module")
def testdev_socket() -> Iterator[str]:
    with serving(Server(TestDevice(), capabilities=FULL_CAPS)) as path:
        yield path
