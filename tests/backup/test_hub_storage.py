"""The hub's device-backup table on both backends (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import os
import time

import pytest

from appliance.hub.storage import backups
from appliance.hub.storage.base import Storage

pytestmark = pytest.mark.timeout(120)


async def test_latest_backup_per_device_replaces_the_older(storage: Storage) -> None:
    await backups.create_schema(storage)
    await backups.create_schema(storage)  # idempotent: every hub start runs it
    first, second = os.urandom(70_000), os.urandom(1000) + b"\x00" * 10
    for data, when in ((first, 100.0), (second, 200.0)):
        info = backups.BackupInfo(
            device_id="box-1",
            created=when,
            received=time.time(),
            size=len(data),
            sha256="ab" * 32,
            format=1,
            appliance_version="0.1.0",
            models=[{"name": "m", "version": "2", "runtime": "onnx"}],
        )
        await backups.put(storage, info, data)
    assert await backups.archive(storage, "box-1") == second  # binary-exact, NUL bytes too
    assert await backups.archive(storage, "box-2") is None
    (kept,) = await backups.info(storage, "box-1")
    assert kept.created == 200.0 and kept.size == len(second) and kept.models[0]["version"] == "2"
    assert [b.device_id for b in await backups.info(storage)] == ["box-1"]
