"""Rollouts on a real hub and real daemons: waves, canary failures, halts and rollbacks.

Each device is an appliance daemon with its own state directory, token and model
repository (sensor-anomaly version 1); the new versions are built from the real model.
Traffic runs against every device so that its canary can judge the new version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hub.rollout_parts import (
    build_version,
    call,
    ended,
    hub_and_fleet,
    hub_cli,
    poll,
    publish,
    setting,
    traffic,
)

pytestmark = pytest.mark.timeout(240)


def test_rollout_completes_in_three_waves(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2"))
    with (
        hub_and_fleet(tmp_path, storage, env, ["dev-a", "dev-b", "dev-c"]) as (proc, devices),
        traffic(devices),
    ):
        assert all(d.serving() == "1" for d in devices)
        started = hub_cli(
            env, "rollout", "start", artifact, "--all", "--waves", "1,2,100%", "--soak", "1"
        )
        assert started.returncode == 0, started.stderr
        rollout = started.stdout.strip()
        doc = ended(env, rollout, "done", timeout=60)
        assert [w["wave"] for w in doc["waves"]] == ["1", "2", "100%"]
        by_wave = sorted(doc["devices"], key=lambda d: d["wave"])
        assert [d["wave"] for d in by_wave] == [0, 1, 2]
        assert all(d["state"] == "healthy" for d in by_wave), by_wave
        assert all("canary promoted" in d["reason"] for d in by_wave), by_wave
        # The hub knew what each device served before, from its heartbeats.
        assert all(d["previous"] == "1" for d in by_wave), by_wave
        # A wave starts only after the one before soaked: healthy times are ordered by
        # wave, at least the soak apart.
        times = [d["healthy_at"] for d in by_wave]
        assert times[1] - times[0] >= 1 and times[2] - times[1] >= 1, times
        for d in devices:
            assert d.serving() == "2"
            assert d.on_disk() == ["1", "2"], "installed beside, never in place"
        # The REST API says the same, and every request was answered.
        code, rest = call(f"{proc.url}/api/v1/rollouts/{rollout}")
        assert code == 200 and rest["state"] == "done"
        assert all(s == 200 for d in devices for s in d.answered)


def test_failing_canary_halts_and_rolls_back_the_others(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2", nan_above=1000))
    with hub_and_fleet(tmp_path, storage, env, ["dev-a", "dev-b", "dev-c"]) as (proc, devices):
        devices[2].loud = True  # only dev-c sees the readings the new version fails on
        with traffic(devices):
            code, doc = call(
                f"{proc.url}/api/v1/rollouts",
                {"artifact": artifact, "target": {"all": True}, "waves": ["2", "100%"], "soak": 1},
            )
            assert code == 201, doc
            rollout = doc["id"]
            doc = ended(env, rollout, "rolled_back", timeout=120)
        states = {d["device_id"]: d for d in doc["devices"]}
        assert states["dev-c"]["state"] == "failed"
        assert "canary rolled back" in states["dev-c"]["reason"]
        assert "error rate" in states["dev-c"]["reason"]
        for name in ("dev-a", "dev-b"):
            assert states[name]["state"] == "rolled_back", states[name]
        assert "dev-c" in doc["reason"]
        for d in devices:
            poll(f"{d.id} serving version 1", lambda d=d: d.serving() == "1")
            assert d.on_disk() == ["1"], "the new version was moved aside"
        # Clients never saw the canary's failures: split requests fall back to stable.
        assert all(s == 200 for d in devices for s in d.answered)
