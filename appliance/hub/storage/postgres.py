"""PostgreSQL storage through asyncpg, for fleets larger than one SQLite file should hold.

A connection pool; each write is one transaction that locks the uploading stream's row
(``SELECT ... FOR UPDATE``), so concurrent uploads of one device serialise while different
devices ingest in parallel.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from appliance.hub.storage.rollouts import schema
from appliance.hub.storage.sql import Conn, Row, SqlStorage

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    label TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    token_hash TEXT UNIQUE,
    enrolled DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION,
    last_seen DOUBLE PRECISION,
    last_heartbeat DOUBLE PRECISION,
    stream TEXT NOT NULL DEFAULT '',
    last_seq BIGINT NOT NULL DEFAULT 0,
    dropped TEXT NOT NULL DEFAULT '{}',
    latest TEXT
);
CREATE TABLE IF NOT EXISTS streams (
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    last_seq BIGINT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, stream)
);
CREATE TABLE IF NOT EXISTS records (
    id BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    received DOUBLE PRECISION NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (device_id, stream, seq)
);
CREATE INDEX IF NOT EXISTS records_device ON records (device_id, id);
CREATE INDEX IF NOT EXISTS records_received ON records (received);
CREATE TABLE IF NOT EXISTS heartbeats (
    device_id TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    resolution INTEGER NOT NULL,
    cpu DOUBLE PRECISION, memory DOUBLE PRECISION, temperature DOUBLE PRECISION,
    gpu DOUBLE PRECISION, latency_ms DOUBLE PRECISION, rps DOUBLE PRECISION,
    tokens_s DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS heartbeats_device_time ON heartbeats (device_id, time);
CREATE TABLE IF NOT EXISTS alerts (
    id BIGSERIAL PRIMARY KEY,
    device_id TEXT NOT NULL,
    rule TEXT NOT NULL,
    subject TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    value DOUBLE PRECISION,
    threshold DOUBLE PRECISION,
    message TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    resolved_at DOUBLE PRECISION,
    updated DOUBLE PRECISION NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_firing ON alerts (device_id, rule, subject)
    WHERE state = 'firing';
CREATE INDEX IF NOT EXISTS alerts_device ON alerts (device_id, updated);
CREATE INDEX IF NOT EXISTS alerts_updated ON alerts (updated);
"""

_PLACEHOLDER = re.compile(r"\?")


def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2...`` (queries here hold no literal ?)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PgConn(Conn):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(numbered(sql), *args)
        tail = str(status).rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(numbered(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(numbered(sql), *args))


class PostgresStorage(SqlStorage):
    kind = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self._pool_size = pool_size
        self._pool: Any = None

    async def open(self) -> None:
        pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self._pool_size)
        try:
            # Several hubs starting at once must not race creating the schema.
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(7262756)")
                await conn.execute(SCHEMA + schema("DOUBLE PRECISION"))
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _get_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the storage is not open")
        return self._pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._get_pool().acquire() as conn, conn.transaction():
            yield _PgConn(conn)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[Conn]:
        async with self._get_pool().acquire() as conn:
            yield _PgConn(conn)

    def bucket_expr(self, column: str, bucket: float) -> str:
        return f"(floor({column} / {float(bucket)!r}) * {float(bucket)!r})"
