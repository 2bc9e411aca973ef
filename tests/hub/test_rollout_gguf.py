"""Rollouts of a language model: a second version of home-intent (GGUF) rolled out by a
real hub to real daemons in waves while clients chat with them, and a version whose chat
template refuses every conversation, rolled back on the device and halting the rollout.

Each device serves home-intent version 1 (the project's file) in the versioned layout;
version 2 is the same GGUF rewritten with the ``gguf`` package (see
``build_intent_version``). Chat traffic runs against every device so its canary can judge.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tests.hub.rollout_parts import (
    REFUSING,
    Device,
    build_intent_version,
    call,
    ended,
    hub_and_fleet,
    poll,
    publish,
    setting,
    start,
    traffic,
)

pytestmark = pytest.mark.timeout(240)


def served(device: Device) -> list[str]:
    """The versions of home-intent the daemon serves (OIP model metadata)."""
    assert device.proc is not None
    code, meta = call(device.proc.url + "/v2/models/home-intent")
    assert code == 200, meta
    versions: list[str] = meta["versions"]
    return versions


def canary_requests(device: Device, result: str) -> float:
    """Chat requests the canary of home-intent version 2 answered with ``result`` (ok or
    error), from the daemon's /metrics."""
    assert device.proc is not None
    with urllib.request.urlopen(device.proc.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    labels = ('model="home-intent"', 'version="2"', 'side="canary"', f'result="{result}"')
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("appliance_canary_requests_total{")
        and all(label in line for label in labels)
    )


def test_second_gguf_version_rolls_out_in_waves_while_clients_chat(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    v2 = build_intent_version(tmp_path / "v2", "2")
    original = tmp_path / "dev-a" / "models" / "home-intent" / "1"
    artifact = publish(env, v2)
    names = ["dev-a", "dev-b", "dev-c"]
    with (
        hub_and_fleet(tmp_path, storage, env, names, model="home-intent") as (_, devices),
        traffic(devices),
    ):
        assert (v2 / "home-intent-q8_0.gguf").read_bytes() != (
            original / "home-intent-q8_0.gguf"
        ).read_bytes(), "version 2 is another file"
        assert all(d.serving() == "1" for d in devices)
        poll("chat answered everywhere", lambda: all(d.answered for d in devices))
        rollout = start(env, artifact, "--waves", "1,100%", "--soak", "1")
        doc = ended(env, rollout, "done", timeout=120)
        assert doc["artifact"]["name"] == "home-intent" and doc["artifact"]["version"] == "2"
        by_wave = sorted(doc["devices"], key=lambda d: d["wave"])
        assert [d["wave"] for d in by_wave] == [0, 1, 1]
        assert all(d["state"] == "healthy" for d in by_wave), by_wave
        assert all("canary promoted" in d["reason"] for d in by_wave), by_wave
        assert all(d["previous"] == "1" for d in by_wave), by_wave
        for d in devices:
            assert d.serving() == "2"
            assert served(d) == ["2"], "version policy latest: 2 serves, 1 is kept on disk"
            # The canary judged real chat requests: at least canary.min_requests of them.
            assert canary_requests(d, "ok") >= 5 and canary_requests(d, "error") == 0
            assert d.on_disk() == ["1", "2"], "installed beside, never in place"
            installed = d.models / "home-intent" / "2" / "home-intent-q8_0.gguf"
            assert installed.read_bytes() == (v2 / "home-intent-q8_0.gguf").read_bytes()
        # Clients keep chatting with version 2 after the promotion.
        counts = [len(d.answered) for d in devices]
        poll(
            "chat answered after the rollout",
            lambda: all(len(d.answered) > n for d, n in zip(devices, counts, strict=True)),
        )
    assert all(s == 200 for d in devices for s in d.answered), [d.answered for d in devices]


def test_refusing_gguf_version_is_rolled_back_and_halts_the_rollout(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_intent_version(tmp_path / "v2", "2", template=REFUSING))
    with (
        hub_and_fleet(tmp_path, storage, env, ["dev-a", "dev-b"], model="home-intent") as (
            _,
            devices,
        ),
        traffic(devices),
    ):
        rollout = start(env, artifact, "--waves", "1,100%", "--soak", "1")
        doc = ended(env, rollout, "rolled_back", timeout=120)
        rows = {d["device_id"]: d for d in doc["devices"]}
        first = next(r for r in rows.values() if r["wave"] == 0)
        second = next(r for r in rows.values() if r["wave"] == 1)
        assert first["state"] == "failed", first
        assert "canary rolled back" in first["reason"] and "error rate" in first["reason"]
        assert first["device_id"] in doc["reason"]
        # Halted before its wave: the other device never got the version.
        assert second["state"] == "cancelled", second
        for d in devices:
            poll(f"{d.id} serving version 1", lambda d=d: d.serving() == "1")
            assert served(d) == ["1"]
            assert d.on_disk() == ["1"], "the refusing version was moved aside"
        (failed,) = (d for d in devices if d.id == first["device_id"])
        (spared,) = (d for d in devices if d.id == second["device_id"])
        # The canary saw the refusals (requests split to it), the other device none.
        assert canary_requests(failed, "error") >= 5
        assert canary_requests(spared, "error") == canary_requests(spared, "ok") == 0
        assert failed.proc is not None
        assert any("home-intent version 2 moved aside" in line for line in failed.proc.log)
    # Clients never saw the refusals: split requests fell back to version 1.
    assert all(d.answered for d in devices)
    assert all(s == 200 for d in devices for s in d.answered), [d.answered for d in devices]
