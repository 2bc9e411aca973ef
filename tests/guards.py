"""Guards every test runs under: the daemon's code never blocks the event loop, and no test
leaves threads or asyncio tasks behind.

A pytest plugin (``tests/conftest.py`` loads it; ``tests/test_guards.py`` proves it can fail):

- **Blocking on the loop.** blockbuster wraps the blocking calls of the standard library
  (``time.sleep``, file and socket I/O, ``os.stat``, lock waits, sqlite3 ...). A call made
  on a thread that runs an event loop counts when the daemon's own code made it: the
  nearest project frame above the call is in a daemon package (``loop_guard_packages``,
  ``appliance``) and the daemon is running there as loop code (one of its coroutines or
  async generators is on the stack, or a loop callback called it with no test frame
  between). A test's own set-up calling the daemon's synchronous API, and third-party
  libraries on their own, do not count. Each counted call raises blockbuster's
  ``BlockingError`` where it happens and is recorded, so one the code under test caught
  still fails the test at teardown. ``@pytest.mark.allow_blocking("reason")`` exempts a
  test; the reason is required.
- **Leaked threads.** Threads alive after the test's fixtures are torn down that were not
  there before fail it, after a grace of ``GRACE`` seconds for threads that are finishing.
  ``LONG_LIVED`` names the process-wide threads libraries keep on purpose.
- **Leaked tasks.** For an async test on a loop of its own (pytest-asyncio's default
  function scope), tasks of that loop that were not there before and are still pending
  after teardown (and the grace) fail it; they are cancelled then. A loop shared by a
  module is not judged: its tasks belong to the module's fixtures too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.thread import _worker as _pool_worker
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import pytest
from blockbuster import BlockBuster, BlockingError

GRACE = 2.0  # seconds a thread or task may take to finish after teardown

# Threads that libraries start once and keep for the whole process, by name. Each is
# shared by every test that touches the library, so its first user must not be blamed.
LONG_LIVED: dict[str, str] = {
    # The loop's default executor (asyncio.to_thread, getaddrinfo): pytest-asyncio's runner
    # joins these when it closes the loop, which happens after this guard's teardown (and
    # only at the end of the module for a module-scoped loop).
    r"asyncio_\d+": "default executor of a loop pytest-asyncio closes after the guard",
}

# Where the daemon may block, beside blockbuster's own list (imports, pytest's rewriting):
# (file name ending, function names), each with why.
CAN_BLOCK_IN: list[tuple[str, set[str]]] = [
    # The daemon logs to stderr (journald under systemd), which blockbuster lets through;
    # a handler set up by an earlier test may still hold that test's captured stderr.
    ("logging/__init__.py", {"emit", "flush"}),
    # asyncpg itself looks for libpq's password file (~/.pgpass: a stat, perhaps a read)
    # while it parses the DSN of each new pool connection; the library's choice, inside
    # its own connect, that the hub cannot move off the loop.
    ("asyncpg/connect_utils.py", {"_parse_connect_dsn_and_args"}),
]

_CODE_ASYNC = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
_LIBRARY_PARTS = ("site-packages", "dist-packages")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "loop_guard_packages",
        "packages whose code must never block the event loop (tests/guards.py)",
        type="args",
        default=["appliance"],
    )


@dataclass
class _Frames:
    """Tells the daemon's frames from the project's other (test) frames."""

    daemon: tuple[str, ...]
    project: str

    @classmethod
    def of(cls, config: pytest.Config) -> _Frames:
        dirs: list[str] = []
        for name in config.getini("loop_guard_packages"):
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise pytest.UsageError(f"loop_guard_packages: {name!r} is not a package")
            dirs.extend(os.path.join(d, "") for d in spec.submodule_search_locations)
        return cls(tuple(dirs), os.path.join(str(config.rootpath), ""))

    def daemon_blocks(self, frame: FrameType | None) -> bool:
        """Whether the call whose caller is ``frame`` is the daemon's, made as loop code."""
        nearest: str | None = None  # "daemon" or "test": the project frame nearest the call
        daemon_async = test_frame = False
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(self.daemon):
                nearest = nearest or "daemon"
                daemon_async = daemon_async or bool(frame.f_code.co_flags & _CODE_ASYNC)
            elif name.startswith(self.project) and not any(p in name for p in _LIBRARY_PARTS):
                nearest = nearest or "test"
                test_frame = True
            frame = frame.f_back
        return nearest == "daemon" and (daemon_async or not test_frame)

    def describe(self, frame: FrameType | None) -> str:
        """The project's frames of a stack, innermost last, for the failure message."""
        lines = [
            f"    {entry.filename}:{entry.lineno} in {entry.name}"
            for entry in traceback.extract_stack(frame)
            if entry.filename.startswith(self.project)
            and not any(p in entry.filename for p in _LIBRARY_PARTS)
        ]
        return "\n".join(lines[-8:])


def _allowed_in(frame: FrameType | None, functions: Iterable[tuple[str, Iterable[str]]]) -> bool:
    """blockbuster's own list of places where blocking is expected (imports, pytest)."""
    allowed = list(functions)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if any(name.endswith(f) and frame.f_code.co_name in names for f, names in allowed):
            return True
        frame = frame.f_back
    return False


@dataclass
class _Recorder:
    """The counted blocking calls of one test."""

    frames: _Frames
    calls: list[str] = field(default_factory=list)

    def predicate(
        self, name: str, original: Callable[..., bool], allowed: list[tuple[str, Iterable[str]]]
    ) -> Callable[..., bool]:
        # blockbuster asks this before raising; True lets the call through. Run with
        # blockbuster's per-thread re-entry flag set, so inspecting the stack is safe.
        def can_block(*args: Any, **kwargs: Any) -> bool:
            if original(*args, **kwargs):
                return True
            caller = inspect.currentframe()
            caller = caller.f_back if caller is not None else None  # blockbuster's wrapper
            if not self.frames.daemon_blocks(caller) or _allowed_in(caller, allowed):
                return True
            self.calls.append(f"  {name} on the event loop, from:\n{self.frames.describe(caller)}")
            return False

        return can_block

    def blockbuster(self) -> BlockBuster:
        # Scanning every module: the predicate above decides, so stacks without the
        # daemon's frames are let through there.
        buster = BlockBuster()
        for name, function in buster.functions.items():
            function.can_block_predicate = self.predicate(
                name, function.can_block_predicate, [*function.can_block_functions, *CAN_BLOCK_IN]
            )
        return buster


_CALL_RAISED_BLOCKING = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None] | Any:
    report = yield
    if call.when == "call" and call.excinfo is not None:
        # The test already failed with the BlockingError: teardown need not say it again.
        item.stash[_CALL_RAISED_BLOCKING] = call.excinfo.errisinstance(BlockingError)
    return report


def _allow_blocking(item: pytest.Item) -> bool:
    marker = item.get_closest_marker("allow_blocking")
    if marker is None:
        return False
    reason = marker.args[0] if marker.args else marker.kwargs.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise pytest.UsageError(f"{item.nodeid}: allow_blocking needs a reason")
    return True


def _long_lived(thread: threading.Thread) -> bool:
    return any(re.fullmatch(pattern, thread.name) for pattern in LONG_LIVED)


def _grown_pool(thread: threading.Thread, before: set[threading.Thread]) -> bool:
    """A worker a thread pool that predates the test added (pools start workers on demand),
    e.g. a module-scoped server's runtime: the pool's owner outlives the test."""
    args = getattr(thread, "_args", ())  # concurrent.futures' _worker(executor_ref, ...)
    if getattr(thread, "_target", None) is not _pool_worker or not args:
        return False
    executor = args[0]() if callable(args[0]) else None
    threads = getattr(executor, "_threads", ())
    return any(t in before for t in threads)


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    deadline = time.monotonic() + GRACE
    while True:
        new = [
            t
            for t in threading.enumerate()
            if t not in before
            and t.is_alive()
            and not _long_lived(t)
            and not _grown_pool(t, before)
        ]
        if not new or time.monotonic() >= deadline:
            return new
        time.sleep(0.02)


def _test_loop(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoop | None:
    """The loop an async test runs on (pytest-asyncio's runner for its loop scope)."""
    marker = request.node.get_closest_marker("asyncio")
    if marker is None or not inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        return None
    scope = (
        marker.kwargs.get("loop_scope")
        or marker.kwargs.get("scope")
        or request.config.getini("asyncio_default_test_loop_scope")
        or "function"
    )
    if scope != "function":
        # A shared loop's tasks belong to its module's fixtures too (a server's handlers
        # of the keep-alive connections a module-scoped client holds): not judged here,
        # and never cancelled under the next test.
        return None
    # Requested here, before the test's own fixtures: the runner then closes the loop
    # only after this guard's teardown has looked at it.
    runner = request.getfixturevalue("_function_scoped_runner")
    loop: asyncio.AbstractEventLoop = runner.get_loop()
    return loop


def _leaked_tasks(loop: asyncio.AbstractEventLoop, before: set[asyncio.Task[Any]]) -> list[str]:
    if loop.is_closed():
        return []
    leaked = [t for t in asyncio.all_tasks(loop) if t not in before and not t.done()]
    if not leaked:
        return []
    loop.run_until_complete(asyncio.wait(leaked, timeout=GRACE))
    pending = [t for t in leaked if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=GRACE))
    return [f"  {t.get_name()}: {t.get_coro()!r}" for t in pending]


@pytest.fixture(autouse=True)
def _guards(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test that blocks the loop in the daemon's code or leaks threads or tasks."""
    loop = _test_loop(request)
    tasks_before = set(asyncio.all_tasks(loop)) if loop is not None else set()
    threads_before = set(threading.enumerate())
    recorder = _Recorder(_Frames.of(request.config))
    buster = None if _allow_blocking(request.node) else recorder.blockbuster()
    if buster is not None:
        buster.activate()
    try:
        yield
    finally:
        if buster is not None:
            buster.deactivate()
    problems: list[str] = []
    if recorder.calls and not request.node.stash.get(_CALL_RAISED_BLOCKING, False):
        problems.append(
            "blocking calls on the event loop (the code may have caught the BlockingError; "
            "move the work off the loop, or mark the test allow_blocking with a reason):\n"
            + "\n".join(recorder.calls)
        )
    if loop is not None and (tasks := _leaked_tasks(loop, tasks_before)):
        problems.append("asyncio tasks left running (cancelled now):\n" + "\n".join(tasks))
    if threads := _new_threads(threads_before):
        problems.append(
            f"threads left running {GRACE:g} s after teardown:\n"
            + "\n".join(f"  {t.name} (daemon={t.daemon}, target={_target(t)})" for t in threads)
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _target(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)
    return getattr(target, "__qualname__", repr(target)) if target is not None else "-"


__all__ = ["CAN_BLOCK_IN", "GRACE", "LONG_LIVED", "BlockingError"]
