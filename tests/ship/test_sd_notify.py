"""sd_notify spoken by the real daemon and hub (subprocesses) to a real datagram socket.

The test plays systemd: it binds the ``$NOTIFY_SOCKET`` and sets ``$WATCHDOG_USEC``, then
checks the protocol the units rely on — READY=1 only once /health is 200, WATCHDOG=1 pings
from the event loop (a stopped process sends none), RELOADING=1/READY=1 on SIGHUP,
STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_daemon

WATCHDOG_USEC = 200_000  # pings every 0.1 s


class FakeSystemd:
    """A bound ``AF_UNIX`` datagram socket collecting every notification, in order."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # sun_path is short
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[list[str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="fake-systemd", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode().split("\n"))
                self._cond.notify_all()

    def count(self, assignment: str) -> int:
        with self._cond:
            return sum(assignment in m for m in self.messages)

    def wait_for(self, assignment: str, *, after: int = 0, timeout: float = 60) -> list[str]:
        """The first message at index >= ``after`` containing ``assignment``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages[after:]:
                    if assignment in message:
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {assignment} in {self.messages}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self._dir)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    fake = FakeSystemd()
    try:
        yield fake
    finally:
        fake.close()


def health_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_daemon_ready_watchdog_reload_and_stop(systemd: FakeSystemd) -> None:
    proc = start_daemon(env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        url = proc.wait_listening(60)
        ready = systemd.wait_for("READY=1")
        # READY=1 comes only when the box serves: /health is already 200 at that moment.
        assert health_status(url) == 200
        status = next(a for a in ready if a.startswith("STATUS="))
        assert re.match(r"STATUS=serving (\d+)/\1 models on http://127\.0\.0\.1:\d+", status)
        index = len(systemd.messages)
        assert systemd.messages.index(ready) < index
        assert not any("STOPPING=1" in m for m in systemd.messages)

        # Pings keep coming from the loop.
        pings = systemd.count("WATCHDOG=1")
        systemd.wait_for("WATCHDOG=1", after=len(systemd.messages))
        systemd.wait_for("WATCHDOG=1", after=len(systemd.messages))
        assert systemd.count("WATCHDOG=1") >= pings + 2

        # systemctl reload: RELOADING=1 (with the monotonic stamp), then READY=1 again.
        mark = len(systemd.messages)
        proc.proc.send_signal(signal.SIGHUP)
        reloading = systemd.wait_for("RELOADING=1", after=mark)
        assert any(a.startswith("MONOTONIC_USEC=") for a in reloading)
        systemd.wait_for("READY=1", after=systemd.messages.index(reloading) + 1)
        assert health_status(url) == 200  # still serving

        mark = len(systemd.messages)
        assert proc.stop(signal.SIGTERM) == 0
        stopping = systemd.wait_for("STOPPING=1", after=mark, timeout=5)
        assert "STATUS=stopping" in stopping
    finally:
        proc.stop()


def test_a_stopped_loop_sends_no_watchdog_pings(systemd: FakeSystemd) -> None:
    """SIGSTOP freezes the process as a blocked loop would: pings stop, and resume after."""
    proc = start_daemon(env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        proc.wait_listening(60)
        systemd.wait_for("READY=1")
        systemd.wait_for("WATCHDOG=1", after=len(systemd.messages))
        proc.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)  # let datagrams already sent arrive
        frozen = systemd.count("WATCHDOG=1")
        time.sleep(1.0)  # ten ping intervals
        assert systemd.count("WATCHDOG=1") == frozen
        proc.proc.send_signal(signal.SIGCONT)
        systemd.wait_for("WATCHDOG=1", after=len(systemd.messages))
        assert systemd.count("WATCHDOG=1") > frozen
    finally:
        proc.proc.send_signal(signal.SIGCONT)
        proc.stop()


def test_watchdog_meant_for_another_process_is_left_alone(systemd: FakeSystemd) -> None:
    env = {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "1"}
    proc = start_daemon(env=env)
    try:
        proc.wait_listening(60)
        systemd.wait_for("READY=1")
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    assert systemd.count("WATCHDOG=1") == 0
    assert systemd.count("STOPPING=1") == 1


def test_hub_ready_and_stopping(systemd: FakeSystemd, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(NOTIFY_SOCKET=systemd.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
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
            "0",
            "--storage",
            f"sqlite:///{tmp_path / 'hub.db'}",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = systemd.wait_for("READY=1")
        assert any(
            a.startswith("STATUS=sqlite storage; listening on http://127.0.0.1:") for a in ready
        )
        systemd.wait_for("WATCHDOG=1", after=len(systemd.messages))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        systemd.wait_for("STOPPING=1", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_journald_lines_carry_priority_and_no_timestamp(tmp_path: Path) -> None:
    """With stderr being the journal stream systemd connected, lines start with <N>."""
    log = tmp_path / "stderr"
    code = (
        "import logging; from appliance.ops import logs; logs.setup('info'); "
        "logging.getLogger('t').warning('w'); logging.getLogger('t').info('i'); "
        "logging.getLogger('t').debug('d')"
    )
    with log.open("w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True, cwd=ROOT)
    assert log.read_text().splitlines() == ["<4>WARNING t: w", "<6>INFO t: i"]
    # Not the journal (JOURNAL_STREAM inherited, stderr elsewhere): timestamps, no prefix.
    with log.open("w") as err:
        env = dict(os.environ, JOURNAL_STREAM="1:2")
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True, cwd=ROOT)
    first = log.read_text().splitlines()[0]
    assert first.endswith("WARNING t: w") and not first.startswith("<")
