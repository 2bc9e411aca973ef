"""Rollout gaps closed: devices away when their wave starts (skipped for good, or caught
up when back), canaries that get no traffic, and a daemon killed between install and the
canary's verdict.

Real hub, real daemons, real model files (see test_rollout.py).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.hub.conftest import hub
from tests.hub.rollout_parts import (
    build_version,
    call,
    fleet,
    hub_cli,
    poll,
    restart,
    rollout_hub_env,
    traffic,
)

pytestmark = pytest.mark.timeout(240)


def status(env: dict[str, str], rollout: str) -> dict[str, Any]:
    result = hub_cli(env, "rollout", "status", rollout, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def rows(env: dict[str, str], rollout: str) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in status(env, rollout)["devices"]}


def prepare(tmp_path: Path) -> tuple[str, dict[str, str], str, str]:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    env = rollout_hub_env(storage, tmp_path)
    result = hub_cli(env, "publish", str(build_version(tmp_path / "v2", "2")))
    assert result.returncode == 0, result.stderr
    key = hub_cli(env, "public-key").stdout.strip()
    return storage, env, result.stdout.strip(), key


def start(env: dict[str, str], artifact: str, *args: str) -> str:
    result = hub_cli(env, "rollout", "start", artifact, "--all", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_offline_device_is_skipped_when_its_wave_starts_and_catches_up(tmp_path: Path) -> None:
    storage, env, artifact, key = prepare(tmp_path)
    with (
        hub(storage, env=env) as proc,
        fleet(tmp_path, env, proc.url, ["dev-a", "dev-b"]) as devices,
        traffic(devices),
    ):
        a, b = devices
        assert b.proc is not None
        b.proc.stop()
        time.sleep(4.5)  # fleet.offline_after = 3: the hub counts dev-b offline
        rollout = start(env, artifact, "--waves", "1,100%", "--soak", "1", "--offline", "catch-up")
        first = rows(env, rollout)
        # Wave 2 has not started: dev-b is not skipped yet, and its row says what will happen.
        assert first["dev-b"]["state"] == "pending"
        assert "if still away when wave 2 starts" in first["dev-b"]["reason"]
        assert "installed once it is back" in first["dev-b"]["reason"]
        doc = poll("the rollout done", lambda: (s := status(env, rollout))["state"] == "done" and s)
        by = {d["device_id"]: d for d in doc["devices"]}
        assert by["dev-a"]["state"] == "healthy"
        assert by["dev-b"]["state"] == "skipped"
        assert "when wave 2 ran; installed once it is back" in by["dev-b"]["reason"]
        # Back: it gets the version though the rollout is done.
        restart(b, proc.url, key)
        poll("dev-b caught up", lambda: rows(env, rollout)["dev-b"]["state"] == "healthy")
        assert b.serving() == "2" and a.serving() == "2"


def test_offline_device_is_skipped_when_its_wave_starts_and_stays_skipped(
    tmp_path: Path,
) -> None:
    storage, env, artifact, key = prepare(tmp_path)
    with (
        hub(storage, env=env) as proc,
        fleet(tmp_path, env, proc.url, ["dev-a", "dev-b"]) as devices,
        traffic(devices),
    ):
        a, b = devices
        assert b.proc is not None
        b.proc.stop()
        time.sleep(4.5)  # fleet.offline_after = 3: the hub counts dev-b offline
        rollout = start(env, artifact, "--waves", "1,100%", "--soak", "1", "--offline", "skip")
        first = rows(env, rollout)
        assert first["dev-b"]["state"] == "pending"
        assert first["dev-b"]["reason"] == (
            "offline now; if still away when wave 2 starts, it will be skipped"
        )
        doc = poll("the rollout done", lambda: (s := status(env, rollout))["state"] == "done" and s)
        by = {d["device_id"]: d for d in doc["devices"]}
        assert by["dev-a"]["state"] == "healthy"
        assert "canary promoted" in by["dev-a"]["reason"]
        assert by["dev-b"]["state"] == "skipped"
        assert by["dev-b"]["reason"] == "device offline when wave 2 ran"
        assert a.serving() == "2"
        # Back, and heard by the hub: skip means skip, nothing is installed after all.
        back = time.time()
        restart(b, proc.url, key)

        def heard() -> bool:
            code, row = call(f"{proc.url}/api/v1/devices/dev-b")
            assert code == 200, row
            return row["status"] not in ("offline", "never seen") and row["last_seen"] > back

        poll("dev-b back online", heard)
        # Long enough for an install to show: heartbeats (and the hub's answers) every
        # 0.2 s, the rollout's rules every 0.2 s, a download of a few kilobytes.
        time.sleep(3)
        assert rows(env, rollout)["dev-b"] == by["dev-b"]
        assert status(env, rollout)["state"] == "done"
        assert b.serving() == "1"
        assert b.on_disk() == ["1"]
        assert not (b.models / ".incoming").exists(), "nothing was downloaded"
        assert a.serving() == "2"


def test_canary_without_traffic_is_reported_and_counted_then_judged(tmp_path: Path) -> None:
    storage, env, artifact, _ = prepare(tmp_path)
    with (
        hub(storage, env=env) as proc,
        fleet(tmp_path, env, proc.url, ["dev-a", "dev-b"]) as devices,
    ):
        rollout = start(env, artifact, "--waves", "1,100%", "--soak", "1")
        doc = poll("the rollout done", lambda: (s := status(env, rollout))["state"] == "done" and s)
        assert doc["counts"] == {"no_traffic": 2}, doc["devices"]
        for row in doc["devices"]:
            assert "had 0 of the 5 requests" in row["reason"], row
        # Still armed: the first real traffic judges it, and the hub hears the verdict.
        assert all(d.serving() == "1" for d in devices)
        with traffic(devices):
            poll(
                "the canaries promoted",
                lambda: all(r["state"] == "healthy" for r in rows(env, rollout).values()),
            )
        assert all(d.serving() == "2" for d in devices)


def test_daemon_killed_before_the_verdict_resumes_its_canary(tmp_path: Path) -> None:
    storage, env, artifact, key = prepare(tmp_path)
    with (
        hub(storage, env=env) as proc,
        # No verdict before the power cut.
        fleet(tmp_path, env, proc.url, ["dev-a"], APPLIANCE_CANARY__WINDOW="600") as (dev,),
    ):
        rollout = start(env, artifact, "--soak", "0")
        poll(
            "the canary running",
            lambda: dev.lifecycle()["canary"]["running"]["sensor-anomaly"]["canary"] == "2",
        )
        assert rows(env, rollout)["dev-a"]["state"] == "installed"
        assert dev.proc is not None
        dev.proc.stop(signal.SIGKILL)  # a power cut between install and verdict
        assert dev.on_disk() == ["1", "2"]
        restart(dev, proc.url, key)  # the usual canary window (2 s) from now on
        # Never served unjudged: stable is version 1 from the first answer on, and the
        # canary of version 2 runs again.
        assert dev.serving() == "1"
        poll(
            "the canary resumed",
            lambda: (
                dev.lifecycle()["canary"]["running"].get("sensor-anomaly", {}).get("canary") == "2"
            ),
        )
        assert dev.serving() == "1"
        with traffic([dev]):
            poll("promoted", lambda: rows(env, rollout)["dev-a"]["state"] == "healthy")
        assert "canary promoted" in rows(env, rollout)["dev-a"]["reason"]
        assert dev.serving() == "2"
        assert any("not judged before the daemon stopped" in line for line in dev.proc.log)
