"""``appliance backup`` / ``restore`` against real daemons, a real hub and real archives.

The round trip: a daemon runs with a data key (so its outbox records are encrypted), API
keys and a hub enrolment while the hub is away, so its outbox holds records; the backup is
taken while it runs. The box is then wiped (a freshly flashed card) and restored into a
fresh state directory; the restored daemon serves as the same device, with the same keys,
and the records queued before the backup reach the hub in the same stream, readable.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from appliance.backup.device import SEQUENCE_GAP
from tests.backup.conftest import Box, cli, make_box, passphrase_file
from tests.conftest import daemon
from tests.hub.conftest import enroll_direct, free_port, get_json, hub
from tests.hub.test_sync import hub_records, hub_sync_status, poll

pytestmark = pytest.mark.timeout(180)


def _get(url: str, key: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def _models(answer: Any) -> list[tuple[str, str]]:
    return [(m["id"], m["owned_by"]) for m in answer["data"]]


def test_backup_of_a_running_device_restores_the_same_device(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "box-1", "Box 1")
    port = free_port()  # the hub is away at first: the outbox fills
    hub_url = f"http://127.0.0.1:{port}"
    box = make_box(tmp_path / "box", "box-1", hub_url, token)
    secret = passphrase_file(tmp_path)
    env = {"STATE_DIRECTORY": str(box.state)}
    with daemon("--config", str(box.config), env=env) as first:
        poll("records queued", lambda: hub_sync_status(first)["queued"] >= 5)
        made = cli(
            "backup", str(tmp_path / "b.tar"), "--config", str(box.config),
            "--passphrase-file", str(secret), state=box.state,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        models = _get(first.url + "/v1/models", box.api_key)
    with sqlite3.connect(box.state / "outbox.db") as conn:
        (stream,) = conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
    with tarfile.open(tmp_path / "b.tar") as tar:
        names = set(tar.getnames())
    assert {"state/outbox.db", "enrolment.json", "config/appliance.toml"} <= names
    assert (
        "files/security.data_key_file" in names and "models/sensor-anomaly/manifest.toml" in names
    )
    assert "models/sensor-anomaly/model.onnx" not in names  # no --with-models

    before = box.files()
    shutil.rmtree(box.root)  # the card is gone; a fresh one has nothing
    fresh_state = tmp_path / "fresh-state"
    restored = cli(
        "restore", str(tmp_path / "b.tar"), "--passphrase-file", str(secret), state=fresh_state
    )
    assert restored.returncode == 0, restored.stderr
    after = box.files()
    model_file = "models/sensor-anomaly/model.onnx"
    assert set(after) == set(before) - {model_file}
    assert after == {k: before[k] for k in after}  # byte for byte
    # The model file itself was not in the archive: put it back as an operator would.
    (box.root / model_file).write_bytes(before[model_file])

    with hub(storage, port=port):
        with daemon("--config", str(box.config), env={"STATE_DIRECTORY": str(fresh_state)}) as new:
            # The same API keys open it; the same models, owned by the same device.
            assert _models(_get(new.url + "/v1/models", box.api_key)) == _models(models)
            assert get_json(new.url + "/health")["device"] == {"id": "box-1", "name": "Box box-1"}
            assert get_json(new.url + "/health")["models"]["sensor-anomaly"]["state"] == "ready"
            poll(
                "new records after the gap",
                lambda: get_json(f"{hub_url}/api/v1/devices/box-1")["last_seq"] > SEQUENCE_GAP,
            )
        records = hub_records(hub_url, "box-1")
    assert {r["stream"] for r in records} == {stream}  # the same outbox stream
    old = [r for r in records if r["seq"] < SEQUENCE_GAP]
    assert old and old[0]["kind"] == "event" and old[0]["body"]["type"] == "started"
    # Encrypted at rest on the old box; readable only with the restored data key.
    assert all("enc1:" not in json.dumps(r["body"]) for r in records)


def _box_and_backup(tmp_path: Path) -> tuple[Box, Path, Path]:
    box = make_box(tmp_path / "box", "box-2")
    secret = passphrase_file(tmp_path)
    (box.state / "api-key").write_text("apk_generated\n")
    made = cli(
        "backup", str(tmp_path / "b.tar"), "--config", str(box.config),
        "--passphrase-file", str(secret), "--with-models", state=box.state,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return box, tmp_path / "b.tar", secret


def _rewrite(src: Path, dest: Path, change: Any) -> None:
    """Copy the tar ``src`` to ``dest``, passing each member's bytes through ``change``."""
    with tarfile.open(src) as tar, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for info in tar:
            reader = tar.extractfile(info)
            assert reader is not None
            data = change(info.name, reader.read())
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def _tampered(name: str, data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1]) if name == "models/sensor-anomaly/model.onnx" else data


def _future(name: str, data: bytes) -> bytes:
    if name != "appliance-backup.json":
        return data
    header = json.loads(data)
    header["version"] = 2
    return json.dumps(header).encode()


def test_a_bad_archive_is_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    box, archive, secret = _box_and_backup(tmp_path)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    tampered, future = tmp_path / "tampered.tar", tmp_path / "future.tar"
    _rewrite(archive, tampered, _tampered)
    _rewrite(archive, future, _future)
    # The box's own files changed since: a bad archive must leave them exactly so.
    box.config.write_text(box.config.read_text() + "\n# edited after the backup\n")
    (box.state / "api-key").write_text("apk_newer\n")
    before, state_before = box.files(), (box.state / "api-key").read_bytes()
    cases = [
        (truncated, secret, "truncated"),
        (archive, passphrase_file(tmp_path, "not the passphrase"), "wrong passphrase"),
        (tampered, secret, "models/sensor-anomaly/model.onnx was altered"),
        (future, secret, "format version 2"),
    ]
    for path, key, problem in cases:
        # --force: the archive is checked before anything is written, force or not.
        result = cli(
            "restore", str(path), "--passphrase-file", str(key), "--force", state=box.state
        )
        assert result.returncode == 1, (path, result.stdout, result.stderr)
        assert problem in result.stderr, (problem, result.stderr)
        assert "Traceback" not in result.stderr
        assert box.files() == before and (box.state / "api-key").read_bytes() == state_before

    # A good archive onto a box that has state: refused without --force, named.
    refused = cli("restore", str(archive), "--passphrase-file", str(secret), state=box.state)
    assert refused.returncode == 1 and "--force" in refused.stderr, refused.stderr
    assert str(box.config) in refused.stderr
    assert box.files() == before
    forced = cli(
        "restore", str(archive), "--passphrase-file", str(secret), "--force", state=box.state
    )
    assert forced.returncode == 0, forced.stderr
    assert (box.state / "api-key").read_text() == "apk_generated\n"
    assert "edited after the backup" not in box.config.read_text()


def test_a_key_file_archive_needs_that_key_file(tmp_path: Path) -> None:
    box = make_box(tmp_path / "box", "box-3")
    key = tmp_path / "backup.key"
    key.write_text("ab" * 32 + "\n")
    made = cli(
        "backup", str(tmp_path / "b.tar"), "--config", str(box.config),
        "--key-file", str(key), state=box.state,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    other = tmp_path / "other.key"
    other.write_text("cd" * 32 + "\n")
    shutil.rmtree(box.root)
    wrong = cli("restore", str(tmp_path / "b.tar"), "--key-file", str(other), state=box.state)
    assert wrong.returncode == 1 and "wrong passphrase or key file" in wrong.stderr
    assert not box.root.exists()
    right = cli("restore", str(tmp_path / "b.tar"), "--key-file", str(key), state=box.state)
    assert right.returncode == 0, right.stderr
    assert 'id = "box-3"' in box.config.read_text()


def test_restore_pins_a_derived_device_id(tmp_path: Path) -> None:
    """A device id derived from the old box's machine id is written into the restored
    file, so the new box (another machine id) stays the same device."""
    box = make_box(tmp_path / "box", "unused")
    box.config.write_text(box.config.read_text().replace('id = "unused"\n', ""))
    secret = passphrase_file(tmp_path)
    made = cli(
        "backup", str(tmp_path / "b.tar"), "--config", str(box.config),
        "--passphrase-file", str(secret), state=box.state,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    shown = cli("config", "--config", str(box.config), state=box.state)
    device_id = json.loads(shown.stdout)["device"]["id"]
    shutil.rmtree(box.root)
    fresh = tmp_path / "fresh"
    result = cli("restore", str(tmp_path / "b.tar"), "--passphrase-file", str(secret), state=fresh)
    assert result.returncode == 0, result.stderr
    text = box.config.read_text()
    assert text.startswith("# the box's own file: comments stay\n")
    assert f'id = "{device_id}"' in text


def test_a_credential_token_and_a_running_daemon(tmp_path: Path) -> None:
    """A hub token from the systemd credential comes back as a token file of the state
    directory; and no restore writes into a state directory a daemon is running on."""
    box = make_box(tmp_path / "box", "box-4")
    box.config.write_text(box.config.read_text() + '\n[hub]\nurl = "http://127.0.0.1:9"\n')
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hub-token").write_text("aph_from_the_credential\n")
    secret = passphrase_file(tmp_path)
    made = cli(
        "backup", str(tmp_path / "b.tar"), "--config", str(box.config),
        "--passphrase-file", str(secret), state=box.state, CREDENTIALS_DIRECTORY=str(creds),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    shutil.rmtree(box.root)
    fresh = tmp_path / "fresh"
    with daemon("--models-dir", str(tmp_path), env={"STATE_DIRECTORY": str(fresh)}):
        busy = cli(
            "restore", str(tmp_path / "b.tar"), "--passphrase-file", str(secret), "--force",
            state=fresh,
        )  # fmt: skip
        assert busy.returncode == 1 and "another appliance daemon" in busy.stderr, busy.stderr
        assert not box.root.exists()
    restored = cli(
        "restore", str(tmp_path / "b.tar"), "--passphrase-file", str(secret), state=fresh
    )
    assert restored.returncode == 0, restored.stderr
    assert (fresh / "hub-token").read_text() == "aph_from_the_credential\n"
    shown = cli("config", "--config", str(box.config), state=fresh)
    assert json.loads(shown.stdout)["hub"]["token_file"] == str(fresh / "hub-token")
