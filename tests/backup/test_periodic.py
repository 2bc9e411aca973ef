"""Periodic backups: a real daemon with ``hub.backup_interval`` keeps its configuration
backup on a real hub, on schedule, and that backup restores."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.backup.conftest import cli, make_box
from tests.conftest import daemon
from tests.hub.conftest import enroll, get_json, hub
from tests.hub.rollout_parts import poll

pytestmark = pytest.mark.timeout(180)


def test_backup_interval_uploads_the_configuration_backup_on_schedule(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll(storage, "box-p", "Box P")
    key_file = tmp_path / "backup-key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    with hub(storage) as running:
        box = make_box(tmp_path / "box", "box-p", running.url, token)
        url = f"{running.url}/api/v1/devices/box-p/backup/info"
        env = {
            "STATE_DIRECTORY": str(box.state),
            "APPLIANCE_MQTT__ENABLED": "false",
            "APPLIANCE_HUB__BACKUP_INTERVAL": "1",
            "APPLIANCE_HUB__BACKUP_KEY_FILE": str(key_file),
        }
        with daemon("--config", str(box.config), env=env, ready=False) as proc:
            first = poll("a first backup on the hub", lambda: _info(url))
            again = poll(
                "a later backup replacing it",
                lambda: (i := _info(url)) and i["created"] > first["created"] and i,
            )
            assert again["device_id"] == "box-p" and again["size"] > 0
            assert any("configuration backup kept on the hub" in line for line in proc.log)
    # What the schedule kept is a real backup: it restores with the same key file.
    with hub(storage) as running:
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        restored = cli(
            "restore", "--from-hub", running.url, "--device", "box-p", "--token-file",
            str(token_file), "--key-file", str(key_file), "--force",
            state=tmp_path / "new-state",
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr


def _info(url: str) -> dict[str, object] | None:
    try:
        info = get_json(url)["backup"]
    except OSError:
        return None
    return info if isinstance(info, dict) else None


def test_backup_interval_without_a_secret_stops_the_start_naming_the_keys(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll(storage, "box-q", "Box Q")
    with hub(storage) as running:
        box = make_box(tmp_path / "box", "box-q", running.url, token)
        result = cli(
            "run", "--config", str(box.config), "--port", "0", state=box.state,
            APPLIANCE_MQTT__ENABLED="false", APPLIANCE_HUB__BACKUP_INTERVAL="60",
        )  # fmt: skip
        assert result.returncode == 2
        assert "hub.backup_interval" in result.stderr and "backup_key_file" in result.stderr
