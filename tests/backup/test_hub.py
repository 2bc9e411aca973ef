"""Backups and the hub: a device's backup kept on a real hub and restored from it, the
backup API's refusals, and the hub's own backup taken while it ingests."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.backup.conftest import cli, make_box, passphrase_file
from tests.hub.conftest import enroll, get_json, hub, hub_cli
from tests.hub.test_dashboard import CHROMIUM, Dom, chromium
from tests.hub.test_sync import hub_records

pytestmark = pytest.mark.timeout(180)


def _call(
    method: str, url: str, token: str = "", body: bytes | None = None
) -> tuple[int, Any, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            data = answer.read()
            status, kind = answer.status, answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        data, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    parsed = json.loads(data) if kind.startswith("application/json") else None
    return status, parsed, data


def test_a_device_backup_kept_on_the_hub_restores_a_replaced_box(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll(storage, "box-h", "Box H")
    with hub(storage) as running:
        box = make_box(tmp_path / "box", "box-h", running.url, token)
        secret = passphrase_file(tmp_path)
        with sqlite3.connect(box.state / "outbox.db") as conn:  # records waiting for the hub
            conn.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, body TEXT)")
        sent = cli(
            "backup", "--to-hub", "--config", str(box.config), "--passphrase-file", str(secret),
            state=box.state,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        info = get_json(f"{running.url}/api/v1/devices/box-h/backup/info")["backup"]
        assert info["device_id"] == "box-h" and info["size"] > 0 and info["format"] == 1
        assert info["models"] == [{"name": "sensor-anomaly", "version": "1", "runtime": "onnx"}]
        assert abs(info["created"] - time.time()) < 120
        listed = get_json(f"{running.url}/api/v1/backups")["backups"]
        assert [b["device_id"] for b in listed] == ["box-h"]
        # What the hub keeps never holds the secrets in clear.
        status, _, kept = _call("GET", f"{running.url}/api/v1/devices/box-h/backup", token)
        assert status == 200 and len(kept) == info["size"]
        with tarfile.open(fileobj=io.BytesIO(kept)) as tar:
            names = tar.getnames()
        # The configuration backup: no outbox (bound for the hub anyway), no model files.
        assert "config/appliance.toml" in names and "state/outbox.db" not in names
        assert "models/sensor-anomaly/manifest.toml" in names
        for secret_bytes in (token, (box.root / "etc" / "data-key").read_text().strip()):
            assert secret_bytes.encode() not in kept

        before = box.files()
        shutil.rmtree(box.root)  # the box is replaced; only its token is at hand
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        restored = cli(
            "restore", "--from-hub", running.url, "--device", "box-h", "--token-file",
            str(token_file), "--passphrase-file", str(secret), state=tmp_path / "new-state",
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        after = box.files()
        assert after == {k: before[k] for k in after}
        assert set(before) - set(after) == {"models/sensor-anomaly/model.onnx"}

        # The dashboard's device view shows it, in a real browser: when, how large, versions.
        if CHROMIUM is not None:
            dom = Dom(
                chromium(running.url + "/#/devices/box-h", tmp_path / "profile", "--dump-dom")
            )
            shown = [(a, text) for a, text in dom.find("div") if a.get("id") == "backup"]
            assert shown and "ago" in shown[0][1] and "KiB" in shown[0][1], shown
            assert info["sha256"] in shown[0][0]["title"]
            facts = "".join(text for _, text in dom.find("div", class_="facts"))
            assert "Last backup" in facts and "sensor-anomaly 1" in facts


def test_the_backup_api_names_every_problem(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    one, two = enroll(storage, "box-1"), enroll(storage, "box-2")
    box = make_box(tmp_path / "box", "box-1")
    secret = passphrase_file(tmp_path)
    made = cli(
        "backup", str(tmp_path / "b.tar"), "--config", str(box.config),
        "--passphrase-file", str(secret), state=box.state,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    archive = (tmp_path / "b.tar").read_bytes()
    with hub(storage) as running:
        url = running.url + "/api/v1/devices/{}/backup"
        cases = [
            ("PUT", url.format("box-1"), "", archive, 401, "device token"),
            ("PUT", url.format("box-1"), "aph_unknown", archive, 401, "unknown or revoked"),
            ("PUT", url.format("box-1"), two, archive, 403, "belongs to device 'box-2'"),
            ("PUT", url.format("box-1"), one, b"", 400, "empty"),
            ("PUT", url.format("box-1"), one, b"not a tar" * 100, 400, "not a valid backup"),
            ("PUT", url.format("box-1"), one, archive[: len(archive) // 3], 400, "not a valid"),
            ("PUT", url.format("box-2"), two, archive, 400, "device 'box-1''s backup"),
            ("GET", url.format("box-1"), one, None, 404, "no backup of device 'box-1'"),
            ("GET", url.format("box-2"), one, None, 403, "belongs to device 'box-1'"),
            ("GET", url.format("nobody") + "/info", "", None, 404, "no device 'nobody'"),
        ]
        for method, where, token, body, status, problem in cases:
            got, answer, raw = _call(method, where, token, body)
            assert got == status, (method, where, got, raw[:300])
            assert isinstance(answer, dict) and problem in answer["error"], (problem, answer)
        assert get_json(f"{running.url}/api/v1/devices/box-1/backup/info")["backup"] is None
        # Nothing bad was kept; a good upload still works after them all.
        assert _call("PUT", url.format("box-1"), one, archive)[0] == 200
        assert _call("GET", url.format("box-1"), one)[2] == archive
        # An operator fetches it (an admin key: none needed on loopback), over REST and CLI.
        status, _, kept = _call("GET", f"{running.url}/api/v1/backups/box-1")
        assert status == 200 and kept == archive
        status, answer, _ = _call("GET", f"{running.url}/api/v1/backups/box-2")
        assert status == 404 and "no backup of device 'box-2'" in answer["error"]
        saved = tmp_path / "saved.tar"
        got = hub_cli(storage, "backup-download", "box-1", str(saved))
        assert got.returncode == 0, got.stderr
        assert saved.read_bytes() == archive and "box-1's backup of" in got.stderr
        again = hub_cli(storage, "backup-download", "box-1", str(saved))
        assert again.returncode == 1 and "--force" in again.stderr
        assert hub_cli(storage, "backup-download", "box-1", str(saved), "--force").returncode == 0
        for device, problem in (("box-2", "keeps no backup"), ("nobody", "no device 'nobody'")):
            refused = hub_cli(storage, "backup-download", device, str(tmp_path / "x.tar"))
            assert refused.returncode == 1 and problem in refused.stderr, refused.stderr
        assert not (tmp_path / "x.tar").exists()


def _batch(device: str, seq: int) -> bytes:
    body = {"system": {"cpu_percent": 10.0 + seq % 7}}
    return json.dumps(
        {
            "device": device,
            "stream": "ab" * 8,
            "records": [{"seq": seq, "kind": "heartbeat", "time": time.time(), "body": body}],
        }
    ).encode()


def test_hub_backup_while_it_ingests_restores_a_fresh_hub(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'old' / 'hub.db'}"
    tokens = {d: enroll(storage, d, f"Device {d}") for d in ("dev-a", "dev-b")}
    secret = passphrase_file(tmp_path)
    with hub(storage) as running:
        ingest = running.url + "/api/v1/ingest"
        for seq in range(1, 21):
            for device, token in tokens.items():
                assert _call("POST", ingest, token, _batch(device, seq))[0] == 200
        stop, sent = threading.Event(), [20]

        def keep_ingesting() -> None:  # the hub stays busy while it is backed up
            seq = 21
            while not stop.is_set():
                assert _call("POST", ingest, tokens["dev-a"], _batch("dev-a", seq))[0] == 200
                sent[0], seq = seq, seq + 1

        writer = threading.Thread(target=keep_ingesting)
        writer.start()
        try:
            made = cli(
                "hub", "backup", str(tmp_path / "hub.tar"), "--storage", storage,
                "--passphrase-file", str(secret), state=tmp_path / "old",
            )  # fmt: skip
        finally:
            stop.set()
            writer.join(30)
        assert made.returncode == 0, made.stderr
        devices_before = {
            d["id"]: d["name"] for d in get_json(running.url + "/api/v1/devices")["devices"]
        }

    fresh = f"sqlite:///{tmp_path / 'new' / 'hub.db'}"
    wrong = cli(
        "hub", "restore", str(tmp_path / "hub.tar"), "--storage", fresh,
        "--passphrase-file", str(passphrase_file(tmp_path, "another passphrase")),
        state=tmp_path / "new",
    )  # fmt: skip
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    assert not (tmp_path / "new" / "hub.db").exists()
    restored = cli(
        "hub", "restore", str(tmp_path / "hub.tar"), "--storage", fresh,
        "--passphrase-file", str(secret), state=tmp_path / "new",
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    again = cli(
        "hub", "restore", str(tmp_path / "hub.tar"), "--storage", fresh,
        "--passphrase-file", str(secret), state=tmp_path / "new",
    )  # fmt: skip
    assert again.returncode == 1 and "--force" in again.stderr

    with hub(fresh) as second:
        devices = get_json(second.url + "/api/v1/devices")["devices"]
        assert {d["id"]: d["name"] for d in devices} == devices_before
        # A consistent snapshot: every record up to some point, in order, nothing torn.
        seqs = [r["seq"] for r in hub_records(second.url, "dev-a")]
        assert seqs == list(range(1, len(seqs) + 1)) and 20 <= len(seqs) <= sent[0]
        assert [r["seq"] for r in hub_records(second.url, "dev-b")] == list(range(1, 21))
        points = get_json(second.url + "/api/v1/devices/dev-b/heartbeats")["points"]
        assert len(points) == 20
        # The devices' tokens still work: the next upload is accepted, repeats deduplicated.
        status, answer, _ = _call(
            "POST", second.url + "/api/v1/ingest", tokens["dev-b"], _batch("dev-b", 21)
        )
        assert status == 200 and answer["accepted"] == 1 and answer["acked"] == 21
        status, answer, _ = _call(
            "POST", second.url + "/api/v1/ingest", tokens["dev-b"], _batch("dev-b", 5)
        )
        assert status == 200 and answer["duplicates"] == 1


def test_hub_backup_of_postgresql_points_to_pg_dump(tmp_path: Path) -> None:
    result = cli(
        "hub", "backup", str(tmp_path / "hub.tar"), "--storage", "postgresql://hub:pw@db/hub",
        "--passphrase-file", str(passphrase_file(tmp_path)), state=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "pg_dump" in result.stderr and "pg_restore" in result.stderr
    assert "pw" not in result.stderr.replace("passphrase", "")
    assert not (tmp_path / "hub.tar").exists()
    keys_only = cli(
        "hub", "backup", str(tmp_path / "hub.tar"), "--storage", "postgresql://hub:pw@db/hub",
        "--without-database", "--passphrase-file", str(passphrase_file(tmp_path)), state=tmp_path,
    )  # fmt: skip
    assert keys_only.returncode == 0, keys_only.stderr
