"""Hub fixtures: the hub as a real subprocess, and a private PostgreSQL server.

PostgreSQL runs from Debian's binaries as the ``postgres`` user (``initdb`` refuses root) in
a temporary directory, on a free loopback port, for the whole session; each test gets a
database of its own. Tests that need it skip, with the reason, only when the binaries are
not installed.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from appliance.hub.storage import from_url
from appliance.hub.storage.base import Storage
from tests.conftest import ROOT, DaemonProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hub_env(storage_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_HUB_STORAGE__URL"] = storage_url
    env.update(extra)
    return env


_LISTENING = re.compile(r"listening on (https?)://([^\s:]+|\[[^\]]+\]):(\d+)")


class HubProcess(DaemonProcess):
    """A hub subprocess; ``url`` is https:// when the hub serves TLS."""

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self.url:
                self.url = f"{match.group(1)}://{match.group(2)}:{match.group(3)}"
                self._listening.set()
        self._listening.set()


def start_hub(
    storage_url: str, *, port: int = 0, env: dict[str, str] | None = None
) -> DaemonProcess:
    """``python -m appliance hub run`` (the hub logs "listening on" like the daemon)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "hub",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=hub_env(storage_url, **(env or {})),
        cwd=ROOT,
    )
    return HubProcess(proc)


@contextmanager
def hub(
    storage_url: str, *, port: int = 0, env: dict[str, str] | None = None, timeout: float = 30
) -> Iterator[DaemonProcess]:
    """A listening hub subprocess; stopped with SIGTERM on exit."""
    handle = start_hub(storage_url, port=port, env=env)
    try:
        handle.wait_listening(timeout)
        yield handle
    finally:
        handle.stop()


def hub_cli(storage_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "hub", *args],
        capture_output=True,
        text=True,
        env=hub_env(storage_url),
        cwd=ROOT,
        timeout=60,
    )


def enroll(storage_url: str, device: str, name: str = "") -> str:
    """Enrol through the real CLI; returns the printed token."""
    args = ["enroll", device] + (["--name", name] if name else [])
    result = hub_cli(storage_url, *args)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("aph_"), result.stdout
    return token


def enroll_direct(storage_url: str, device: str, name: str = "") -> str:
    """Enrol through the storage API in-process (the CLI does the same, slower)."""
    from appliance.hub.tokens import hash_token, new_token

    token = new_token()

    async def run() -> None:
        store = from_url(storage_url)
        await store.open()
        try:
            await store.enroll(device, name, hash_token(token), time.time())
        finally:
            await store.close()

    asyncio.run(run())
    return token


def get_json(url: str, timeout: float = 5) -> Any:
    import json

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


# ------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL server for the session; yields its admin URL."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (base, sock):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    started = False
    try:
        subprocess.run(
            _as_postgres(
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            _as_postgres(
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off",
                "start",
            ),
            check=True,
            capture_output=True,
            timeout=90,
        )
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        if started:
            subprocess.run(
                _as_postgres(
                    str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"
                ),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


async def _admin(server: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{server}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server, f"CREATE DATABASE {name}"))
    try:
        yield f"{server}/{name}"
    finally:
        asyncio.run(_admin(server, f"DROP DATABASE {name} WITH (FORCE)"))


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    with fresh_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests run against both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    url = request.getfixturevalue("postgres_url")
    assert isinstance(url, str)
    return url


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[Storage]:
    store = from_url(storage_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def no_leaked_db_threads() -> Iterator[None]:
    """Fail a test that leaves an outbox or aiosqlite worker thread running."""
    import threading

    yield
    deadline = time.monotonic() + 5
    while True:
        alive = [
            t.name
            for t in threading.enumerate()
            if t.is_alive()
            and (t.name.startswith("appliance-outbox") or "_connection_worker" in t.name)
        ]
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"threads left running: {alive}")
        time.sleep(0.02)


async def wait_until(predicate: Any, timeout: float = 20, interval: float = 0.05) -> None:
    """Poll an async or plain predicate until true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
