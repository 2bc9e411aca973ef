"""Shared fixtures: real daemons (in-process and as subprocesses) and the real models.

Third-party models come from ``../shared/models`` beside the project; tests that need one
skip with a reason when it is absent. The project's own default models are in ``models/``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance import config as config_mod
from appliance.server import Server

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"
DEFAULT_MODELS = ROOT / "models"
STORIES = SHARED_MODELS / "stories260K.gguf"

# The loop and leak guards every test runs under (tests/guards.py); pytester proves them
# in tests/test_guards.py.
pytest_plugins = ["tests.guards", "pytester"]

_LISTENING = re.compile(r"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


@pytest.fixture(autouse=True, scope="session")
def _own_state_directory() -> Iterator[None]:
    """In-process servers keep state (the GGUF prompt cache) in a directory of the test
    run's own, never the machine's; subprocess daemons get one each (start_daemon)."""
    state = tempfile.mkdtemp(prefix="appliance-test-state-")
    before = os.environ.get("STATE_DIRECTORY")
    os.environ["STATE_DIRECTORY"] = state
    yield
    if before is None:
        os.environ.pop("STATE_DIRECTORY", None)
    else:
        os.environ["STATE_DIRECTORY"] = before
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def stories_gguf() -> Path:
    """The 260K-parameter TinyStories GGUF model (third-party, read from ../shared/models)."""
    if not STORIES.is_file():
        pytest.skip(f"{STORIES} is not present (third-party test model)")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    return STORIES


@pytest.fixture(scope="session")
def default_models() -> Path:
    assert (DEFAULT_MODELS / "sensor-anomaly" / "manifest.toml").is_file()
    return DEFAULT_MODELS


def make_config(**sections: dict[str, Any]) -> config_mod.Config:
    """A config bound to loopback on a free port, with the given section overrides."""
    overrides: dict[str, dict[str, Any]] = {"http": {"host": "127.0.0.1", "port": 0}}
    if "mdns" not in sections:
        # Never announce on the machine's real interfaces; mDNS tests name theirs.
        overrides["mdns"] = {"enabled": False}
    if "mqtt" not in sections:
        # Never talk to a broker the machine happens to run; MQTT tests start their own.
        overrides["mqtt"] = {"enabled": False}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return config_mod.load(env={}, overrides=overrides)


@asynccontextmanager
async def serving(config: config_mod.Config, *, wait_loaded: bool = True) -> AsyncIterator[Server]:
    """An in-process daemon on a free loopback port; stopped (gracefully) on exit."""
    server = Server(config)
    await server.startup()
    try:
        if wait_loaded:
            assert server.core is not None
            await server.core.models.wait_loaded()
        yield server
    finally:
        await server.shutdown()


def base_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


ServingFactory = Callable[..., Any]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class DaemonProcess:
    """``python -m appliance run`` as a real subprocess; its output is drained into ``log``."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.url = ""
        self.log: list[str] = []
        self.state_dir: str | None = None  # made for it, removed when it stops
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._drain, name="daemon-log", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self.url:
                self.url = f"{match.group(1)}://{match.group(2)}:{match.group(3)}"
                self._listening.set()
        self._listening.set()  # the process ended: stop waiting

    def wait_listening(self, timeout: float) -> str:
        self._listening.wait(timeout)
        if not self.url:
            self.stop()
            raise AssertionError("daemon did not start:\n" + "\n".join(self.log))
        return self.url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.proc.returncode


def start_daemon(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
    """Start ``python -m appliance run`` on a free loopback port (not yet waited for)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    # Never announce on the machine's real interfaces; mDNS tests name theirs.
    full_env["APPLIANCE_MDNS__ENABLED"] = "false"
    full_env["APPLIANCE_MQTT__ENABLED"] = "false"  # MQTT tests name their own broker
    # A state directory of its own (the daemon locks it): never the machine's.
    state = None
    if "STATE_DIRECTORY" not in (env or {}):
        state = full_env["STATE_DIRECTORY"] = tempfile.mkdtemp(prefix="appliance-state-")
    full_env.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=ROOT,
    )
    handle = DaemonProcess(proc)
    handle.state_dir = state
    return handle


@contextmanager
def daemon(
    *args: str, env: dict[str, str] | None = None, ready: bool = True, timeout: float = 60
) -> Iterator[DaemonProcess]:
    """A daemon subprocess that is listening (and, with ``ready``, healthy); stopped on exit."""
    handle = start_daemon(*args, env=env)
    deadline = time.monotonic() + timeout
    try:
        handle.wait_listening(timeout)
        if ready:
            _wait_healthy(handle.url, deadline)
        yield handle
    finally:
        handle.stop()


def _wait_healthy(url: str, deadline: float) -> None:
    import urllib.error
    import urllib.request

    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/health did not become ready")


async def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
