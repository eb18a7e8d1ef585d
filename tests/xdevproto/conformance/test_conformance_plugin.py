"""The pytest plugin: one test per check against a marked server."""

from __future__ import annotations

import pytest

INNER = '''
import pytest

@pytest.mark.vfio_user_server(socket={path!r}, groups=["version", "dma"])
def test_conformance(vfio_user_check):
    assert vfio_user_check.outcome.value == "pass"

@pytest.mark.vfio_user_server(socket={path!r}, only=["write-multi.negotiated"])
def test_write_multi(vfio_user_check):
    assert vfio_user_check.check.level.value == "MUST"
'''


def test_plugin_parametrises_one_test_per_check(pytester: pytest.Pytester,
                                                 testdev_socket: str) -> None:
    pytester.makepyfile(INNER.format(path=testdev_socket))
    result = pytester.runpytest_inprocess("-p", "xdevproto.conformance.pytest_plugin", "-v")
    # 11 version checks, 9 DMA checks, 1 write-multi check
    result.assert_outcomes(passed=21)
    result.stdout.fnmatch_lines(["*test_conformance?dma.overlap? PASSED*"])


def test_plugin_fails_a_check_the_server_breaks(pytester: pytest.Pytester) -> None:
    # A "server" that accepts connections and never answers: every check
    # that needs a reply fails, with the spec section in the message.
    pytester.makeconftest('''
import socket, tempfile, os, pytest

@pytest.fixture(scope="session")
def mute_server():
    d = tempfile.mkdtemp()
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.path.join(d, "s")); s.listen(64)
    yield os.path.join(d, "s")
    s.close()
''')
    pytester.makepyfile('''
import pytest

@pytest.mark.vfio_user_server(fixture="mute_server", only=["version.reply"], timeout=0.2)
def test_conformance(vfio_user_check):
    pass
''')
    result = pytester.runpytest_inprocess("-p", "xdevproto.conformance.pytest_plugin")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*version.reply ?MUST, VFIO_USER_VERSION?*"])
