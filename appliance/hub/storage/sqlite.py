"""SQLite storage through aiosqlite: the zero set-up default for small fleets.

One connection in WAL mode; an :class:`asyncio.Lock` serialises transactions on it (the
hub's writes are short, and SQLite has one writer anyway). ``synchronous=FULL``: the hub
acknowledges an upload only after its commit, and the device then deletes the records, so
the hub's commit must survive power loss just like the device's outbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from appliance.hub.storage.rollouts import schema
from appliance.hub.storage.sql import Conn, Row, SqlStorage

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    label TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    token_hash TEXT UNIQUE,
    enrolled REAL NOT NULL,
    revoked REAL,
    last_seen REAL,
    last_heartbeat REAL,
    stream TEXT NOT NULL DEFAULT '',
    last_seq INTEGER NOT NULL DEFAULT 0,
    dropped TEXT NOT NULL DEFAULT '{}',
    latest TEXT
);
CREATE TABLE IF NOT EXISTS streams (
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (device_id, stream)
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    time REAL NOT NULL,
    received REAL NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (device_id, stream, seq)
);
CREATE INDEX IF NOT EXISTS records_device ON records (device_id, id);
CREATE INDEX IF NOT EXISTS records_received ON records (received);
CREATE TABLE IF NOT EXISTS heartbeats (
    device_id TEXT NOT NULL,
    time REAL NOT NULL,
    resolution INTEGER NOT NULL,
    cpu REAL, memory REAL, temperature REAL, gpu REAL, latency_ms REAL, rps REAL, tokens_s REAL
);
CREATE INDEX IF NOT EXISTS heartbeats_device_time ON heartbeats (device_id, time);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    value REAL,
    threshold REAL,
    message TEXT NOT NULL,
    started_at REAL NOT NULL,
    resolved_at REAL,
    updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_firing ON alerts (device_id, rule, subject)
    WHERE state = 'firing';
CREATE INDEX IF NOT EXISTS alerts_device ON alerts (device_id, updated);
CREATE INDEX IF NOT EXISTS alerts_updated ON alerts (updated);
"""


class _SqliteConn(Conn):
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._db.execute(sql, args)
        count = cursor.rowcount
        await cursor.close()
        return max(count, 0)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._db.execute_fetchall(sql, args))


class SqliteStorage(SqlStorage):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(SCHEMA + schema("REAL"))
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the storage is not open")
        return self._db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        db = self._conn()
        async with self._lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteConn(db)
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Conn]:
        db = self._conn()
        async with self._lock:
            yield _SqliteConn(db)

    def bucket_expr(self, column: str, bucket: float) -> str:
        return f"(CAST({column} / {float(bucket)!r} AS INTEGER) * {float(bucket)!r})"
