"""What devices refuse, and how rollouts survive being cut: tampered and wrongly signed
artifacts, a disk too small, a device killed mid-download, a hub killed mid-rollout.

Real hub, real daemons, real model files (see test_rollout.py).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.security import signing
from tests.hub.conftest import free_port, start_hub
from tests.hub.rollout_parts import (
    build_version,
    ended,
    enroll,
    fleet,
    hub_and_fleet,
    poll,
    publish,
    restart,
    setting,
    start,
    status,
    traffic,
)

pytestmark = pytest.mark.timeout(240)


def test_tampered_artifact_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    v2 = build_version(tmp_path / "v2", "2")
    artifact = publish(env, v2)
    # Someone with access to the hub's disk swaps the model's bytes (same size).
    blobs = tmp_path / "artifacts" / "blobs"
    model_blob = next(
        p for p in blobs.iterdir() if p.stat().st_size == (v2 / "model.onnx").stat().st_size
    )
    data = bytearray(model_blob.read_bytes())
    data[-1] ^= 0xFF
    model_blob.write_bytes(bytes(data))
    with hub_and_fleet(tmp_path, storage, env, ["dev-a"]) as (_, (dev,)):
        rollout = start(env, artifact)
        doc = ended(env, rollout, "rolled_back")
        (row,) = doc["devices"]
        assert row["state"] == "failed"
        assert "refused" in row["reason"] and "sha256" in row["reason"], row
        assert dev.serving() == "1"
        assert dev.on_disk() == ["1"]
        assert not (dev.models / ".incoming" / rollout).exists(), "nothing half-fetched kept"


def test_statement_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2"))
    other = signing.public_text(Ed25519PrivateKey.generate())
    with hub_and_fleet(tmp_path, storage, env, ["dev-a"], public_key=other) as (_, (dev,)):
        rollout = start(env, artifact)
        doc = ended(env, rollout, "rolled_back")
        (row,) = doc["devices"]
        assert row["state"] == "failed"
        assert row["reason"] == "refused: the signature does not match the hub's key"
        assert dev.serving() == "1" and dev.on_disk() == ["1"]
        assert not (dev.models / ".incoming").exists(), "nothing was downloaded"


def test_unsigned_tampered_or_misaddressed_statements_do_not_verify() -> None:
    """The check every statement passes on the device (appliance.ops.updater.offer)."""
    key = Ed25519PrivateKey.generate()
    public = signing.parse_public(signing.public_text(key))
    statement = {"rollout": "r-1", "device": "dev-a", "action": "install", "files": []}
    signed = signing.sign(key, statement)
    assert signing.verify(public, signed) == statement
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify(public, {"statement": statement})
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify(public, {"statement": statement, "signature": ""})
    for change in ({"device": "dev-b"}, {"rollout": "r-2"}, {"files": [{"path": "x"}]}):
        tampered = {"statement": {**statement, **change}, "signature": signed["signature"]}
        with pytest.raises(signing.SignatureError, match="does not match"):
            signing.verify(public, tampered)


def test_disk_too_small_is_refused_before_download(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2", padding=3 << 20))
    with hub_and_fleet(tmp_path, storage, env, ["dev-a"], models_fs_bytes=2 << 20) as (_, (dev,)):
        rollout = start(env, artifact)
        doc = ended(env, rollout, "rolled_back")
        (row,) = doc["devices"]
        assert row["state"] == "failed"
        assert "not enough disk space" in row["reason"], row
        assert dev.serving() == "1" and dev.on_disk() == ["1"]
        assert not (dev.models / ".incoming").exists(), "refused before any byte was written"


def test_device_killed_mid_download_resumes_and_finishes(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2", padding=6 << 20))
    slow = {"APPLIANCE_HUB__UPDATE_RATE_BYTES": str(2 << 20)}  # ~3 s for the file
    with (
        hub_and_fleet(tmp_path, storage, env, ["dev-a"], **slow) as (proc, (dev,)),
        traffic([dev]),
    ):
        rollout = start(env, artifact, "--soak", "0")
        part = dev.models / ".incoming" / rollout / "v" / "padding.bin.part"
        poll("half the download", lambda: part.exists() and part.stat().st_size > 1 << 20)
        assert dev.proc is not None
        dev.proc.stop(signal.SIGKILL)
        kept = part.stat().st_size
        assert 0 < kept < 6 << 20
        # Killed mid-download: the repository holds only the old version.
        assert dev.on_disk() == ["1"]
        _, key = enroll(env, "dev-probe")  # the hub's public key, as enrolment prints it
        token, _ = enroll(env, "dev-a")  # a new token; the old one is replaced
        dev.token = token
        restart(dev, proc.url, key, **slow)
        poll("dev-a serving version 1 again", lambda: dev.serving() == "1")
        doc = ended(env, rollout, "done")
        assert doc["devices"][0]["state"] == "healthy"
        assert dev.serving() == "2" and dev.on_disk() == ["1", "2"]
        assert any("resuming the download of padding.bin" in line for line in dev.proc.log)


def test_hub_killed_mid_rollout_resumes_after_restart(tmp_path: Path) -> None:
    storage, env = setting(tmp_path)
    artifact = publish(env, build_version(tmp_path / "v2", "2"))
    port = free_port()
    first = start_hub(storage, port=port, env=env)
    url = first.wait_listening(30)
    try:
        with fleet(tmp_path, env, url, ["dev-a", "dev-b"]) as devices, traffic(devices):
            rollout = start(env, artifact, "--waves", "1,100%", "--soak", "1")
            poll(
                "wave 1 healthy",
                lambda: any(d["state"] == "healthy" for d in status(env, rollout)["devices"]),
            )
            assert first.stop(signal.SIGKILL) != 0
            assert status(env, rollout)["state"] == "running"
            time.sleep(1)  # devices keep uploading into the void meanwhile
            second = start_hub(storage, port=port, env=env)
            try:
                second.wait_listening(30)
                doc = ended(env, rollout, "done")
            finally:
                second.stop()
            assert [d["state"] for d in doc["devices"]] == ["healthy", "healthy"]
            assert all(d.serving() == "2" for d in devices)
    finally:
        first.stop()
