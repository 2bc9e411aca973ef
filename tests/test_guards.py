"""The guards of tests/guards.py can fail: each kind of fault fails a test, a clean test
passes.

The scenarios run in a pytest of their own (pytester, in a subprocess so its blockbuster
and leaked threads stay there) under the guards plugin, with a small package standing in
for the daemon (``loop_guard_packages = fakedaemon``): the guard must tell a package's own
blocking calls from the test's, and no code in ``appliance/`` blocks on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import appliance
from tests.guards import GRACE, _Frames

ROOT = Path(__file__).resolve().parent.parent

FAKE_DAEMON = '''
"""Stands in for the daemon: each function does what a guard must catch, or must not."""

import asyncio
import threading
import time

_tasks = []


async def nap():
    time.sleep(0.01)


async def read(path):
    with open(path, "rb") as file:
        return file.read()


async def careful():
    try:
        time.sleep(0.01)
    except Exception:  # swallows the BlockingError, as careless code would
        pass


def read_sync(path):
    with open(path, "rb") as file:
        return file.read()


async def offload(path):
    return await asyncio.to_thread(read_sync, path)


def start_thread(seconds):
    thread = threading.Thread(target=time.sleep, args=(seconds,), name="fake-worker")
    thread.daemon = True
    thread.start()
    return thread


async def start_task():
    _tasks.append(asyncio.get_running_loop().create_task(asyncio.sleep(30), name="fake-ticker"))
'''

SCENARIOS = f"""
import time

import pytest

import fakedaemon


async def test_sleep_in_daemon_fails():
    await fakedaemon.nap()


async def test_blocking_read_in_daemon_fails(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")  # the test's own set-up may block
    await fakedaemon.read(path)


async def test_swallowed_blocking_error_still_fails():
    await fakedaemon.careful()


@pytest.mark.allow_blocking("this scenario proves the marker exempts a test")
async def test_allowed_blocking_passes():
    await fakedaemon.nap()


def test_leaked_thread_fails():
    fakedaemon.start_thread({GRACE * 3})


async def test_leaked_task_fails():
    await fakedaemon.start_task()


async def test_clean_test_passes(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"weights")
    time.sleep(0.01)  # the test's own code, not the daemon's
    assert fakedaemon.read_sync(path) == b"weights"  # the daemon's sync API, called by a test
    assert await fakedaemon.offload(path) == b"weights"  # the daemon's I/O off the loop
    fakedaemon.start_thread(0.2).join(0)  # finishes within the grace
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose subprocess can import ``tests.guards`` from this tree."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), path])))
    monkeypatch.setenv("COLUMNS", "400")  # summary lines whole, to match them
    return pytester


def test_guards_fail_each_fault_and_pass_a_clean_test(inner: pytest.Pytester) -> None:
    pytester = inner
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        loop_guard_packages = fakedaemon
        markers =
            allow_blocking(reason): may block the event loop
        filterwarnings = error
        """
    )
    pytester.mkpydir("fakedaemon").joinpath("__init__.py").write_text(FAKE_DAEMON)
    pytester.makepyfile(test_scenarios=SCENARIOS)
    result = pytester.runpytest_subprocess("-p", "tests.guards", "-rA", "-p", "no:cacheprovider")

    result.stdout.fnmatch_lines_random(
        [
            "FAILED test_scenarios.py::test_sleep_in_daemon_fails - *"
            "BlockingError: Blocking call to time.sleep",
            "FAILED test_scenarios.py::test_blocking_read_in_daemon_fails - *"
            "BlockingError: Blocking call to io.BufferedReader.read",
            "ERROR test_scenarios.py::test_swallowed_blocking_error_still_fails - "
            "*blocking calls on the event loop*",
            "PASSED test_scenarios.py::test_allowed_blocking_passes",
            "ERROR test_scenarios.py::test_leaked_thread_fails - *threads left running*",
            "ERROR test_scenarios.py::test_leaked_task_fails - *asyncio tasks left running*",
            "PASSED test_scenarios.py::test_clean_test_passes",
        ]
    )
    # The swallowed call is reported with the daemon's frame that made it.
    result.stdout.fnmatch_lines(["  time.sleep on the event loop, from:", "*fakedaemon*careful"])
    # A test failed by a guard at teardown counts as passed (its call) and as an error.
    result.assert_outcomes(passed=5, failed=2, errors=3)


def test_allow_blocking_needs_a_reason(inner: pytest.Pytester) -> None:
    pytester = inner
    pytester.makeini(
        """
        [pytest]
        markers =
            allow_blocking(reason): may block the event loop
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.allow_blocking()
        def test_no_reason():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "tests.guards", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*allow_blocking needs a reason*"])
    assert result.ret != 0


def test_the_guarded_daemon_is_appliance(pytestconfig: pytest.Config) -> None:
    assert _Frames.of(pytestconfig).daemon == (os.path.join(Path(appliance.__file__).parent, ""),)
