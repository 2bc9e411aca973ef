"""Rollout storage and the rules that move rollouts along, in-process, against SQLite and a
real local PostgreSQL (the ``storage`` fixture runs each test on both).

Devices here are rows, and their reports are the records a device's updater sends
(``Rollouts.report``); the end-to-end tests with real daemons are test_rollout*.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.hub.rollout.artifacts import BlobStore, publish_model
from appliance.hub.rollout.plan import PlanError
from appliance.hub.rollout.service import NotFound, Rollouts
from appliance.hub.storage.base import Storage
from appliance.hub.storage.sql import SqlStorage
from appliance.hub.tokens import hash_token
from appliance.security import signing
from tests.conftest import DEFAULT_MODELS

pytestmark = [pytest.mark.usefixtures("no_leaked_db_threads"), pytest.mark.timeout(60)]

DEVICES = ["dev-a", "dev-b", "dev-c"]


def version_dir(tmp: Path, version: str, extra: bytes = b"") -> Path:
    dest = tmp / f"v{version}"
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", dest)
    manifest = dest / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('version = "1"', f'version = "{version}"'))
    if extra:
        (dest / "extra.bin").write_bytes(extra)
    return dest


async def service(storage: Storage, tmp: Path) -> tuple[Rollouts, SqlStorage]:
    assert isinstance(storage, SqlStorage)
    for i, device in enumerate(DEVICES):
        await storage.enroll(device, "", hash_token(f"aph_{i:040d}"), time.time())
    return Rollouts(
        storage, storage, BlobStore(tmp / "artifacts"), Ed25519PrivateKey.generate()
    ), storage


async def published(rollouts: Rollouts, source: Path) -> str:
    artifact = publish_model(rollouts.blobs, source)
    await rollouts.store.put_artifact(artifact)
    return artifact.id


async def test_artifacts_and_tags(storage: Storage, tmp_path: Path) -> None:
    rollouts, store = await service(storage, tmp_path)
    v2 = version_dir(tmp_path, "2")
    first = publish_model(rollouts.blobs, v2)
    assert await store.put_artifact(first) == first
    assert await store.put_artifact(publish_model(rollouts.blobs, v2)) is not None  # again: kept
    assert [a.id for a in await store.artifacts()] == [first.id]
    found = await store.artifact(first.id)
    assert found is not None and found.files == first.files and found.size == first.size
    (v2 / "extra.bin").write_bytes(b"other content")
    with pytest.raises(ValueError, match="already published with other content"):
        await store.put_artifact(publish_model(rollouts.blobs, v2))
    assert (await rollouts.find_artifact("sensor-anomaly:2")).id == first.id
    with pytest.raises(NotFound):
        await rollouts.find_artifact("sensor-anomaly:9")
    await store.add_tags("dev-a", ["north", "pi5"])
    await store.add_tags("dev-a", ["north"])  # twice: once
    await store.add_tags("dev-b", ["north"])
    await store.remove_tags("dev-a", ["pi5", "never-had"])
    assert await store.tags() == {"dev-a": ["north"], "dev-b": ["north"]}


async def test_waves_reports_and_done(storage: Storage, tmp_path: Path) -> None:
    rollouts, store = await service(storage, tmp_path)
    art = await published(rollouts, version_dir(tmp_path, "2"))
    doc = await rollouts.create(
        {"artifact": art, "target": {"all": True}, "waves": ["1", "100%"], "soak": 0}
    )
    rid = doc["id"]
    assert doc["state"] == "running" and doc["wave_count"] == 2
    states = {d["device_id"]: d["state"] for d in doc["devices"]}
    assert sorted(states.values()) == ["pending", "pending", "wanted"]
    (first,) = [d for d, s in states.items() if s == "wanted"]
    statement = await rollouts.wanted(first)
    assert statement is not None
    body = signing.verify(signing.parse_public(rollouts.public_key), statement)
    assert body["action"] == "install" and body["artifact"] == art and body["device"] == first
    assert await rollouts.wanted(next(d for d in DEVICES if d != first)) is None
    # Reports move a device only forward; an out-of-order one changes nothing.
    await rollouts.report(first, {"rollout": rid, "state": "downloading"})
    await rollouts.report(first, {"rollout": rid, "state": "healthy", "reason": "promoted"})
    await rollouts.report(first, {"rollout": rid, "state": "downloading"})
    doc = await rollouts.status(rid)
    assert doc["wave"] == 1 and doc["waves"][0]["state"] == "done"
    row = next(d for d in doc["devices"] if d["device_id"] == first)
    assert row["state"] == "healthy" and row["reason"] == "promoted" and row["healthy_at"]
    assert {d["state"] for d in doc["devices"] if d["device_id"] != first} == {"wanted"}
    for device in DEVICES:
        await rollouts.report(device, {"rollout": rid, "state": "healthy"})
    doc = await rollouts.status(rid)
    assert doc["state"] == "done" and doc["counts"]["healthy"] == 3
    assert [r.id for r in await store.rollouts(("done",))] == [rid]
    assert await store.device_rollouts(first) == []  # only running or halted ones
    ((rollout, mine),) = await store.device_rollouts(first, None)
    assert rollout.id == rid and mine.state == "healthy"
    with pytest.raises(PlanError, match="is done, not running"):
        await rollouts.halt(rid)


async def test_failure_rolls_back_the_others(storage: Storage, tmp_path: Path) -> None:
    rollouts, _ = await service(storage, tmp_path)
    art = await published(rollouts, version_dir(tmp_path, "3"))
    doc = await rollouts.create(
        {"artifact": art, "target": {"devices": DEVICES}, "waves": ["100%"], "max_failures": 0}
    )
    rid = doc["id"]
    await rollouts.report("dev-a", {"rollout": rid, "state": "healthy"})
    await rollouts.report("dev-b", {"rollout": rid, "state": "failed", "reason": "NaN scores"})
    doc = await rollouts.status(rid)
    assert doc["state"] == "halted" and "dev-b: NaN scores" in doc["reason"]
    states = {d["device_id"]: d["state"] for d in doc["devices"]}
    assert states == {"dev-a": "rolling_back", "dev-b": "failed", "dev-c": "rolling_back"}
    statement = await rollouts.wanted("dev-a")
    assert statement is not None and statement["statement"]["action"] == "rollback"
    with pytest.raises(PlanError, match="only a halt can resume"):
        await rollouts.resume(rid)
    for device in ("dev-a", "dev-c"):
        await rollouts.report(device, {"rollout": rid, "state": "rolled_back"})
    assert (await rollouts.status(rid))["state"] == "rolled_back"
    with pytest.raises(PlanError, match="rolled back already"):
        await rollouts.rollback(rid)


async def test_halt_resume_and_operator_rollback(storage: Storage, tmp_path: Path) -> None:
    rollouts, store = await service(storage, tmp_path)
    await store.add_tags("dev-c", ["north"])
    art = await published(rollouts, version_dir(tmp_path, "4"))
    rid = (await rollouts.create({"artifact": art, "target": {"tag": "north"}}))["id"]
    assert [d["device_id"] for d in (await rollouts.status(rid))["devices"]] == ["dev-c"]
    with pytest.raises(PlanError, match="already rolling out"):
        await rollouts.create({"artifact": art, "target": {"all": True}})
    halted = await rollouts.halt(rid)
    assert halted["state"] == "halted" and halted["reason"] == "halted by an operator"
    assert await rollouts.wanted("dev-c") is None, "a halted rollout asks for nothing"
    assert (await rollouts.resume(rid))["state"] == "running"
    assert await rollouts.wanted("dev-c") is not None
    back = await rollouts.rollback(rid)
    assert back["state"] == "halted" and back["devices"][0]["state"] == "rolling_back"
    await rollouts.report("dev-c", {"rollout": rid, "state": "rolled_back"})
    assert (await rollouts.status(rid))["state"] == "rolled_back"
    # Rolling back mid-way: the moved device rolls back, the later wave is cancelled.
    other = await published(rollouts, version_dir(tmp_path, "5"))
    pending = await rollouts.create(
        {"artifact": other, "target": {"all": True}, "waves": ["1", "100%"], "soak": 3600}
    )
    await rollouts.report(
        pending["devices"][0]["device_id"], {"rollout": pending["id"], "state": "healthy"}
    )
    doc = await rollouts.rollback(pending["id"])
    assert {d["state"] for d in doc["devices"]} == {"rolling_back", "cancelled"}
    with pytest.raises(NotFound):
        await rollouts.status("r-nope")
