"""The storage logic, written once in portable SQL for SQLite and PostgreSQL.

Backends provide a connection adapter (:class:`Conn`) and a few dialect details; every
query here uses ``?`` placeholders, which the PostgreSQL adapter numbers (``$1``...).
"""

from __future__ import annotations

import abc
import json
from contextlib import AbstractAsyncContextManager

from appliance.hub.storage.base import (
    OFFLINE_RULE,
    POINT_FIELDS,
    Alert,
    AlertChange,
    Batch,
    Device,
    IngestResult,
    Point,
    Storage,
    StoredRecord,
    loads_dict,
)
from appliance.hub.storage.rollouts import RolloutStore
from appliance.hub.storage.rows import Conn as Conn
from appliance.hub.storage.rows import Row as Row
from appliance.hub.storage.rows import alert_row, device_row, point_row

_DEVICE_COLUMNS = (
    # A label given at enrolment wins over the name the device reports.
    "d.id, CASE WHEN d.label <> '' THEN d.label ELSE d.name END, d.version, d.enrolled, "
    "d.revoked, d.last_seen, d.last_heartbeat, d.stream, d.last_seq, d.dropped, d.latest, "
    # Every firing alert, device_offline included: the same as /api/v1/alerts says.
    "(SELECT count(*) FROM alerts a WHERE a.device_id = d.id AND a.state = 'firing'), "
    "(SELECT count(*) FROM alerts a WHERE a.device_id = d.id AND a.state = 'firing' "
    f" AND a.rule = '{OFFLINE_RULE}')"
)
_ALERT_COLUMNS = (
    "id, device_id, rule, subject, severity, state, value, threshold, message, started_at, "
    "resolved_at, updated"
)


class SqlStorage(RolloutStore, Storage):
    """:class:`Storage` on any SQL backend that supplies connections."""

    for_update = ""  # row lock suffix for the stream's high-water mark (PostgreSQL)

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Conn]:
        """A connection in a write transaction: committed on success, rolled back on error."""

    @abc.abstractmethod
    def reader(self) -> AbstractAsyncContextManager[Conn]: ...

    @abc.abstractmethod
    def bucket_expr(self, column: str, bucket: float) -> str:
        """SQL for ``floor(column / bucket) * bucket``."""

    async def ping(self) -> None:
        async with self.reader() as conn:
            await conn.fetch("SELECT 1")

    # -- enrolment --------------------------------------------------------------------

    async def enroll(self, device_id: str, name: str, token_hash: str, now: float) -> None:
        async with self.transaction() as conn:
            # A name given at enrolment wins over the one the device reports.
            changed = await conn.execute(
                "UPDATE devices SET token_hash = ?, revoked = NULL, "
                "label = CASE WHEN ? = '' THEN label ELSE ? END WHERE id = ?",
                token_hash,
                name,
                name,
                device_id,
            )
            if not changed:
                await conn.execute(
                    "INSERT INTO devices (id, label, token_hash, enrolled) VALUES (?, ?, ?, ?)",
                    device_id,
                    name,
                    token_hash,
                    now,
                )

    async def revoke(self, device_id: str, now: float) -> bool:
        async with self.transaction() as conn:
            changed = await conn.execute(
                "UPDATE devices SET revoked = ?, token_hash = NULL WHERE id = ?", now, device_id
            )
        return changed > 0

    async def device_for_token(self, token_hash: str) -> str | None:
        async with self.reader() as conn:
            row = await conn.fetchone(
                "SELECT id FROM devices WHERE token_hash = ? AND revoked IS NULL", token_hash
            )
        return str(row[0]) if row else None

    # -- ingest -----------------------------------------------------------------------

    async def ingest(self, batch: Batch, now: float) -> IngestResult:
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO streams (device_id, stream, last_seq, first_seen) "
                "VALUES (?, ?, 0, ?) ON CONFLICT (device_id, stream) DO NOTHING",
                batch.device,
                batch.stream,
                now,
            )
            row = await conn.fetchone(
                "SELECT last_seq FROM streams WHERE device_id = ? AND stream = ?" + self.for_update,
                batch.device,
                batch.stream,
            )
            last = int(row[0]) if row else 0
            fresh = {r.seq: r for r in batch.records if r.seq > last}
            new = [fresh[s] for s in sorted(fresh)]
            if new:
                await conn.executemany(
                    "INSERT INTO records (device_id, stream, seq, kind, time, received, body) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(batch.device, batch.stream, r.seq, r.kind, r.time, now, r.body) for r in new],
                )
            points = [r.point for r in new if r.point is not None]
            if points:
                await conn.executemany(
                    f"INSERT INTO heartbeats (device_id, time, resolution, "
                    f"{', '.join(POINT_FIELDS)}) VALUES (?, ?, 0{', ?' * len(POINT_FIELDS)})",
                    [(batch.device, p.time, *p.values()) for p in points],
                )
            for record in new:
                if record.alert is not None:
                    await _apply_alert(conn, batch.device, record.alert, now)
            acked = max([last, *fresh])
            await conn.execute(
                "UPDATE streams SET last_seq = ? WHERE device_id = ? AND stream = ?",
                acked,
                batch.device,
                batch.stream,
            )
            heartbeats = [r for r in new if r.point is not None]
            latest = heartbeats[-1] if heartbeats else None
            await conn.execute(
                "UPDATE devices SET name = ?, version = ?, last_seen = ?, stream = ?, "
                "last_seq = ?, dropped = ?, "
                "latest = CASE WHEN ? THEN ? ELSE latest END, "
                "last_heartbeat = CASE WHEN ? THEN ? ELSE last_heartbeat END WHERE id = ?",
                batch.name,
                batch.version,
                now,
                batch.stream,
                acked,
                json.dumps(batch.dropped),
                latest is not None,
                latest.body if latest else None,
                latest is not None,
                latest.time if latest else None,
                batch.device,
            )
            await conn.execute(
                "UPDATE alerts SET state = 'resolved', resolved_at = ?, updated = ?, "
                "message = 'uploading again' WHERE device_id = ? AND rule = ? "
                "AND state = 'firing'",
                now,
                now,
                batch.device,
                OFFLINE_RULE,
            )
        return IngestResult(
            accepted=len(new), duplicates=len(batch.records) - len(new), acked=acked
        )

    # -- fleet view -------------------------------------------------------------------

    async def devices(self) -> list[Device]:
        async with self.reader() as conn:
            rows = await conn.fetch(f"SELECT {_DEVICE_COLUMNS} FROM devices d ORDER BY d.id")
        return [device_row(r) for r in rows]

    async def device(self, device_id: str) -> Device | None:
        async with self.reader() as conn:
            row = await conn.fetchone(
                f"SELECT {_DEVICE_COLUMNS} FROM devices d WHERE d.id = ?", device_id
            )
        return device_row(row) if row else None

    async def points(self, device_id: str, since: float, until: float, limit: int) -> list[Point]:
        async with self.reader() as conn:
            # The newest ``limit`` points, returned oldest first.
            rows = await conn.fetch(
                f"SELECT time, {', '.join(POINT_FIELDS)}, resolution FROM heartbeats "
                "WHERE device_id = ? AND time >= ? AND time <= ? ORDER BY time DESC LIMIT ?",
                device_id,
                since,
                until,
                limit,
            )
        return [point_row(r) for r in reversed(rows)]

    async def records(self, device_id: str, after: int, limit: int) -> list[StoredRecord]:
        async with self.reader() as conn:
            rows = await conn.fetch(
                "SELECT id, stream, seq, kind, time, received, body FROM records "
                "WHERE device_id = ? AND id > ? ORDER BY id LIMIT ?",
                device_id,
                after,
                limit,
            )
        return [
            StoredRecord(
                id=int(r[0]),
                stream=str(r[1]),
                seq=int(r[2]),
                kind=str(r[3]),
                time=float(r[4]),
                received=float(r[5]),
                body=loads_dict(r[6]) or {},
            )
            for r in rows
        ]

    async def alerts(self, device_id: str | None, state: str | None, limit: int) -> list[Alert]:
        where, args = [], []
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        async with self.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {_ALERT_COLUMNS} FROM alerts {clause}ORDER BY updated DESC, id DESC "
                "LIMIT ?",
                *args,
                limit,
            )
        return [alert_row(r) for r in rows]

    # -- monitor ----------------------------------------------------------------------

    async def mark_offline(self, cutoff: float, now: float, offline_after: float) -> list[str]:
        async with self.transaction() as conn:
            rows = await conn.fetch(
                "SELECT id, last_seen FROM devices d WHERE revoked IS NULL "
                "AND last_seen IS NOT NULL AND last_seen < ? AND NOT EXISTS ("
                "SELECT 1 FROM alerts a WHERE a.device_id = d.id AND a.rule = ? "
                "AND a.state = 'firing')",
                cutoff,
                OFFLINE_RULE,
            )
            for device_id, last_seen in rows:
                silent = now - float(last_seen)
                await _apply_alert(
                    conn,
                    str(device_id),
                    AlertChange(
                        rule=OFFLINE_RULE,
                        subject="",
                        state="firing",
                        severity="critical",
                        value=round(silent, 3),
                        threshold=offline_after,
                        message=f"no upload for {silent:.0f}s (offline after {offline_after:g}s)",
                        started_at=now,
                        at=now,
                    ),
                    now,
                )
        return [str(r[0]) for r in rows]

    async def retention(self, raw_before: float, keep_before: float, bucket: float) -> int:
        # Whole buckets only, so a bucket is never averaged twice.
        raw_before = (raw_before // bucket) * bucket
        averages = ", ".join(f"avg({f})" for f in POINT_FIELDS)
        slot = self.bucket_expr("time", bucket)
        async with self.transaction() as conn:
            row = await conn.fetchone(
                "SELECT count(*) FROM heartbeats WHERE resolution = 0 AND time < ?", raw_before
            )
            n = int(row[0]) if row else 0
            if n:
                await conn.execute(
                    f"INSERT INTO heartbeats (device_id, time, resolution, "
                    f"{', '.join(POINT_FIELDS)}) "
                    f"SELECT device_id, {slot}, {int(bucket)}, {averages} FROM heartbeats "
                    f"WHERE resolution = 0 AND time < ? GROUP BY device_id, {slot}",
                    raw_before,
                )
                await conn.execute(
                    "DELETE FROM heartbeats WHERE resolution = 0 AND time < ?", raw_before
                )
            await conn.execute("DELETE FROM heartbeats WHERE time < ?", keep_before)
            await conn.execute("DELETE FROM records WHERE received < ?", raw_before)
            await conn.execute(
                "DELETE FROM alerts WHERE state = 'resolved' AND updated < ?", keep_before
            )
        return n


async def _apply_alert(conn: Conn, device_id: str, change: AlertChange, now: float) -> None:
    if change.state == "firing":
        changed = await conn.execute(
            "UPDATE alerts SET value = ?, threshold = ?, message = ?, severity = ?, updated = ? "
            "WHERE device_id = ? AND rule = ? AND subject = ? AND state = 'firing'",
            change.value,
            change.threshold,
            change.message,
            change.severity,
            now,
            device_id,
            change.rule,
            change.subject,
        )
        if changed:
            return
        await conn.execute(
            f"INSERT INTO alerts ({_ALERT_COLUMNS.removeprefix('id, ')}) "
            "VALUES (?, ?, ?, ?, 'firing', ?, ?, ?, ?, NULL, ?)",
            device_id,
            change.rule,
            change.subject,
            change.severity,
            change.value,
            change.threshold,
            change.message,
            change.started_at,
            now,
        )
        return
    changed = await conn.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = ?, value = ?, message = ?, "
        "updated = ? WHERE device_id = ? AND rule = ? AND subject = ? AND state = 'firing'",
        change.at,
        change.value,
        change.message,
        now,
        device_id,
        change.rule,
        change.subject,
    )
    if not changed:  # its firing record was dropped on the device: keep the resolution
        await conn.execute(
            f"INSERT INTO alerts ({_ALERT_COLUMNS.removeprefix('id, ')}) "
            "VALUES (?, ?, ?, ?, 'resolved', ?, ?, ?, ?, ?, ?)",
            device_id,
            change.rule,
            change.subject,
            change.severity,
            change.value,
            change.threshold,
            change.message,
            change.started_at,
            change.at,
            now,
        )
