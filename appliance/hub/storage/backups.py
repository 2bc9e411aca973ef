"""Each device's latest configuration backup, kept by the hub (SQLite and PostgreSQL).

One row per device: the archive exactly as the device uploaded it (its secrets encrypted
with the device's own passphrase or key file; the hub cannot open them) and what its
plain manifest says, for the fleet view. A new upload replaces the old one. The table is
created on first use, beside the hub's own schema, in the portable SQL of ``sql.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance.hub.storage.base import Storage
from appliance.hub.storage.sql import SqlStorage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_backups (
    device_id TEXT PRIMARY KEY,
    created DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    format INTEGER NOT NULL,
    appliance_version TEXT NOT NULL,
    models TEXT NOT NULL,
    archive {blob} NOT NULL
)
"""
_INFO = "device_id, created, received, size, sha256, format, appliance_version, models"


@dataclass(frozen=True)
class BackupInfo:
    """What the fleet view shows about a device's latest backup."""

    device_id: str
    created: float  # device time the archive was written
    received: float  # hub time it arrived
    size: int
    sha256: str
    format: int
    appliance_version: str
    models: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sql(storage: Storage) -> SqlStorage:
    if not isinstance(storage, SqlStorage):
        raise TypeError(f"device backups need an SQL storage, not {type(storage).__name__}")
    return storage


async def create_schema(storage: Storage) -> None:
    """Create the table if it is missing (idempotent; run when the hub starts)."""
    sql = _sql(storage)
    blob = "BYTEA" if sql.kind == "postgresql" else "BLOB"
    async with sql.transaction() as conn:
        await conn.execute(_SCHEMA.format(blob=blob))


async def put(storage: Storage, info: BackupInfo, archive: bytes) -> None:
    """Keep ``archive`` as the device's latest backup, replacing an older one."""
    async with _sql(storage).transaction() as conn:
        await conn.execute("DELETE FROM device_backups WHERE device_id = ?", info.device_id)
        await conn.execute(
            f"INSERT INTO device_backups ({_INFO}, archive) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            info.device_id,
            info.created,
            info.received,
            info.size,
            info.sha256,
            info.format,
            info.appliance_version,
            json.dumps(info.models),
            archive,
        )


async def archive(storage: Storage, device_id: str) -> bytes | None:
    async with _sql(storage).reader() as conn:
        row = await conn.fetchone(
            "SELECT archive FROM device_backups WHERE device_id = ?", device_id
        )
    return bytes(row[0]) if row is not None else None


async def info(storage: Storage, device_id: str | None = None) -> list[BackupInfo]:
    """The latest backup of one device (``device_id``) or of every device."""
    where, args = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
    async with _sql(storage).reader() as conn:
        rows = await conn.fetch(
            f"SELECT {_INFO} FROM device_backups {where} ORDER BY device_id", *args
        )
    return [
        BackupInfo(
            device_id=str(r[0]),
            created=float(r[1]),
            received=float(r[2]),
            size=int(r[3]),
            sha256=str(r[4]),
            format=int(r[5]),
            appliance_version=str(r[6]),
            models=json.loads(r[7]),
        )
        for r in rows
    ]


__all__ = ["BackupInfo", "archive", "create_schema", "info", "put"]
