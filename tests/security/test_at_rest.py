"""Encryption at rest: outbox records with a data key are AES-256-GCM encrypted."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.ops.outbox import HubOutbox
from appliance.security.crypto import FieldCipher, load_cipher, new_data_key
from tests.conftest import ROOT

SECRET = "prompt from alice.smith@example.com: is 31 °C too warm?"


def _outbox(path: Path, cipher: FieldCipher | None) -> HubOutbox:
    return HubOutbox(path, max_records=100, max_bytes=1 << 20, max_age=3600, cipher=cipher)


async def test_records_are_encrypted_and_read_back(tmp_path: Path) -> None:
    key = bytes.fromhex(new_data_key())
    path = tmp_path / "outbox.db"
    async with _outbox(path, FieldCipher(key)) as box:
        await box.append("event", {"request": SECRET})
        [record] = await box.peek(10)
        assert record.body == {"request": SECRET}
    raw = sqlite3.connect(path).execute("SELECT body FROM records").fetchone()[0]
    assert raw.startswith("enc1:") and "alice" not in raw and "31" not in raw
    # Another key cannot read it: the record is dropped, counted, and the outbox goes on.
    async with _outbox(path, FieldCipher(bytes(32))) as box:
        assert await box.peek(10) == []
        assert box.dropped["key"] == 1
        await box.append("event", {"ok": True})
        assert [r.body for r in await box.peek(10)] == [{"ok": True}]


async def test_plain_records_stay_readable_after_a_key_is_configured(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    async with _outbox(path, None) as box:
        await box.append("event", {"n": 1})
    async with _outbox(path, FieldCipher(bytes(range(32)))) as box:
        await box.append("event", {"n": 2})
        assert [r.body["n"] for r in await box.peek(10)] == [1, 2]


async def test_records_cannot_move_between_kinds(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    cipher = FieldCipher(bytes(range(32)))
    async with _outbox(path, cipher) as box:
        await box.append("alert", {"n": 1})
    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET kind = 'event'")
    async with _outbox(path, cipher) as box:
        assert await box.peek(10) == []
        assert box.dropped["key"] == 1


def test_data_key_loading(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "data-key"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert made.returncode == 0 and len(made.stdout.strip()) == 64
    (tmp_path / "data-key").write_text(made.stdout)
    assert load_cipher(tmp_path / "data-key", {}) is not None
    assert load_cipher(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is not None
    assert load_cipher(None, {}) is None
    (tmp_path / "short").write_text("abcd")
    with pytest.raises(ConfigError, match=r"data_key_file"):
        load_cipher(tmp_path / "short", {})
