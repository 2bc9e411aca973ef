"""SIGKILL a real appliance again and again while it writes its outbox.

The daemon runs with a hub that is not there, a heartbeat every 50 ms (each one a durable
commit) and debug logging, which prints "stored <kind> record <seq>" only once a record's
commit returned. After every kill: ``PRAGMA integrity_check`` is ok, every record the
daemon acknowledged is in the file, and the next run numbers on from above them.
"""

from __future__ import annotations

import random
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, start_daemon
from tests.hub.conftest import free_port

pytestmark = pytest.mark.timeout(120)

STORED = re.compile(r"outbox: stored (\w+) record (\d+)")


def acknowledged(proc: DaemonProcess) -> list[int]:
    return [int(m.group(2)) for line in list(proc.log) if (m := STORED.search(line))]


def wait_acks(proc: DaemonProcess, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(acknowledged(proc)) < count:
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("daemon stopped acknowledging records:\n" + "\n".join(proc.log))
        time.sleep(0.01)


def test_sigkill_during_outbox_writes_loses_no_acknowledged_record(tmp_path: Path) -> None:
    outbox = tmp_path / "state" / "outbox.db"
    (tmp_path / "models").mkdir()  # no models: a fast start, heartbeats all the same
    env = {
        "APPLIANCE_DEVICE__ID": "kill-test",
        "APPLIANCE_HUB__URL": f"http://127.0.0.1:{free_port()}",  # nobody listens
        "APPLIANCE_HUB__TOKEN": "unused",
        "APPLIANCE_HUB__OUTBOX_PATH": str(outbox),
        "APPLIANCE_HUB__HEARTBEAT_INTERVAL": "0.05",
        "APPLIANCE_HUB__BACKOFF_INITIAL": "30",
        "APPLIANCE_HEALTH__INTERVAL": "0.05",
    }
    rng = random.Random(7)
    all_acked: list[int] = []
    for _ in range(4):
        proc = start_daemon(
            "--models-dir", str(tmp_path / "models"), "--log-level", "debug", env=env
        )
        try:
            wait_acks(proc, rng.randint(8, 20))
            time.sleep(rng.uniform(0, 0.05))  # land anywhere in the next commit
            proc.proc.send_signal(signal.SIGKILL)
        finally:
            code = proc.stop()
        assert code == -signal.SIGKILL
        acked = acknowledged(proc)
        # Numbering continues strictly above everything acknowledged before.
        assert acked == sorted(acked) and len(set(acked)) == len(acked)
        if all_acked:
            assert acked[0] > all_acked[-1]
        all_acked += acked

        with sqlite3.connect(outbox) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            stored = {row[0] for row in conn.execute("SELECT seq FROM records")}
        missing = sorted(set(all_acked) - stored)
        assert not missing, f"acknowledged records lost: {missing}"
    assert len(all_acked) >= 32
    assert not list(outbox.parent.glob("*.corrupt-*")), "a kill must never corrupt the outbox"
