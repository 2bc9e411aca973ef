"""A durable outbox: everything bound for the hub waits here until the hub has it.

Guarantees
    * **Durable before acknowledged** — :meth:`HubOutbox.append` returns only after the record's
      transaction is committed with ``journal_mode=WAL`` and ``synchronous=FULL``: SQLite
      fsyncs the WAL on every commit, so an acknowledged record survives SIGKILL *and* power
      loss. (``NORMAL`` would survive a crash but may lose the last commits on power loss;
      a few small fsyncs a minute are cheap even on an SD card.)
    * **Ordered, numbered once** — each record gets the next value of an ``AUTOINCREMENT``
      key, which SQLite never reuses even after deletes, so sequence numbers only grow.
      Records are read and uploaded oldest first. Each database also has a random ``stream``
      id; the hub deduplicates on (device, stream, sequence), so an outbox that had to be
      recreated starts a new stream instead of colliding with old numbers.
    * **At-least-once** — records are deleted only after the hub acknowledged them
      (:meth:`HubOutbox.ack`); a crash in between means the hub sees them again and drops the
      duplicates.
    * **Bounded** — by record count, payload bytes and age. When a bound is exceeded the
      *oldest heartbeats* are dropped first (alerts and events are rarer and matter more);
      only when no heartbeat is left are the oldest records of any kind dropped. Records
      older than ``max_age`` are dropped whatever their kind. Every drop is counted by
      reason (``size``, ``age``), persisted in the database and exported in ``/metrics``.
    * **Encrypted at rest when a data key is configured** — record bodies (which may carry
      request data) are then stored AES-256-GCM encrypted (``security/crypto.py``), bound
      to the stream and kind. A record no key can open (the key was changed or lost) is
      dropped when it comes up, counted under reason ``key``; plain records written before
      a key was configured are still read.
    * **Corruption is reported, never hidden** — a database that fails ``PRAGMA
      quick_check`` or reports corruption is renamed to ``<name>.corrupt-<UTC time>`` (with
      its ``-wal``/``-shm`` files), an error is logged, a fresh outbox is started and
      :attr:`HubOutbox.recovered` names the moved file so the uploader can tell the hub.

Why stdlib ``sqlite3`` on one dedicated thread rather than aiosqlite: an append is several
statements (insert, bound enforcement, counters) in one transaction, and open is a check,
perhaps a rename, and schema set-up; running each as one function on our own single thread
costs one thread hop per operation instead of one per statement, keeps every statement of
a transaction on the connection's thread by construction, and the thread is joined on close
so nothing outlives the daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from appliance.ops.metrics import OutboxMetrics
from appliance.ops.outbox_file import OutboxError, connect, is_corrupt, move_aside
from appliance.security.crypto import DecryptionError, FieldCipher, is_encrypted

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT = "heartbeat"
_DROP_REASONS = ("size", "age", "key")


@dataclass(frozen=True)
class Record:
    """One queued record, as it is sent to the hub."""

    seq: int
    kind: str
    created: float
    body: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "time": self.created, "body": self.body}


class HubOutbox:
    """The durable SQLite outbox for the hub. Use ``async with HubOutbox(...)`` or
    :meth:`open` / :meth:`close`."""

    def __init__(
        self,
        path: Path,
        *,
        max_records: int,
        max_bytes: int,
        max_age: float,
        metrics: OutboxMetrics | None = None,
        clock: Callable[[], float] = time.time,
        cipher: FieldCipher | None = None,
    ) -> None:
        self.path = path
        self._cipher = cipher
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._metrics = metrics
        self._clock = clock
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self.stream = ""
        self.records = 0
        self.bytes = 0
        self.last_seq = 0
        self.dropped: dict[str, int] = _drops({})
        self.recovered: list[Path] = []  # corrupt files moved aside since open
        self.appended = asyncio.Event()  # set on every append; the uploader clears it

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> HubOutbox:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="appliance-outbox"
        )
        await self._call(self._open)
        self._export()
        return self

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._close)
        finally:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def __aenter__(self) -> HubOutbox:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the API ----------------------------------------------------------------------

    async def append(self, kind: str, body: Mapping[str, Any]) -> int:
        """Store one record durably; returns its sequence number once it is committed."""
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
        seq = await self._call(lambda: self._guarded(lambda: self._append(kind, text)))
        log.debug("outbox: stored %s record %d", kind, seq)
        if self._metrics is not None:
            self._metrics.outbox_appended.labels(kind).inc()
        self._export()
        self.appended.set()
        return seq

    async def peek(self, limit: int) -> list[Record]:
        """The oldest ``limit`` records (records past ``max_age`` are dropped first)."""
        rows = await self._call(lambda: self._guarded(lambda: self._peek(limit)))
        self._export()
        return rows

    async def ack(self, upto: int) -> int:
        """The hub has every record up to ``upto``: delete them. Returns how many went."""
        deleted = await self._call(lambda: self._guarded(lambda: self._ack(upto)))
        self._export()
        return deleted

    async def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s verdict: ``"ok"`` or the problems found."""
        return await self._call(self._integrity)

    # -- plumbing ---------------------------------------------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise OutboxError("the outbox is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _export(self) -> None:
        if self._metrics is None:
            return
        self._metrics.outbox_records.set(self.records)
        self._metrics.outbox_bytes.set(self.bytes)

    def _count_drop(self, reason: str, n: int) -> None:
        if n <= 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self._db().execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (f"dropped_{reason}", str(self.dropped[reason])),
        )
        if self._metrics is not None:
            self._metrics.outbox_dropped.labels(reason).inc(n)
        log.warning("outbox: dropped %d record(s) unsent (%s bound)", n, reason)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError("the outbox is not open")
        return self._conn

    # -- on the outbox thread ---------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            self._move_aside(exc)
            self._connect()

    def _connect(self) -> None:
        opened = connect(self.path)
        self._conn = opened.conn
        self.stream = opened.stream
        self.records, self.bytes = opened.records, opened.bytes
        self.last_seq = opened.last_seq
        self.dropped = _drops({r: int(opened.meta.get(f"dropped_{r}", 0)) for r in _DROP_REASONS})

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _move_aside(self, exc: BaseException) -> None:
        self._close()
        target = move_aside(self.path)
        log.error(
            "outbox %s is corrupt (%s); moved it to %s and started a new one",
            self.path,
            exc,
            target,
        )
        self.recovered.append(target)
        if self._metrics is not None:
            self._metrics.outbox_corrupt.inc()

    def _guarded(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; if the file turns out corrupt, move it aside, reopen, run it again."""
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            if not is_corrupt(exc):
                raise
            self._move_aside(exc)
            self._connect()
            return fn()

    def _append(self, kind: str, text: str) -> int:
        if self._cipher is not None:
            text = self._cipher.encrypt(text, f"{self.stream}:{kind}")
        size = len(text.encode("utf-8"))
        if size > self.max_bytes:
            raise OutboxError(f"a {size}-byte record cannot fit an outbox of {self.max_bytes}")
        db = self._db()
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "INSERT INTO records (kind, created, size, body) VALUES (?, ?, ?, ?)",
                (kind, now, size, text),
            )
            seq = int(cur.lastrowid or 0)
            self.records += 1
            self.bytes += size
            self._drop_aged(now)
            self._enforce_bounds(seq)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.last_seq = seq
        return seq

    def _enforce_bounds(self, newest: int) -> None:
        db = self._db()
        while self.records > self.max_records or self.bytes > self.max_bytes:
            over_n = self.records - self.max_records
            # Heartbeats first, then anything; never the record being appended.
            victims = (
                db.execute(
                    "SELECT seq, size FROM records WHERE kind = ? AND seq < ? ORDER BY seq LIMIT ?",
                    (HEARTBEAT, newest, max(over_n, 1) + 16),
                ).fetchall()
                or db.execute(
                    "SELECT seq, size FROM records WHERE seq < ? ORDER BY seq LIMIT ?",
                    (newest, max(over_n, 1) + 16),
                ).fetchall()
            )
            if not victims:
                break
            chosen = []
            records, size = self.records, self.bytes
            for seq, vsize in victims:
                if records <= self.max_records and size <= self.max_bytes:
                    break
                chosen.append(seq)
                records -= 1
                size -= vsize
            db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in chosen])
            self.records, self.bytes = records, size
            self._count_drop("size", len(chosen))

    def _drop_aged(self, now: float) -> None:
        db = self._db()
        cutoff = now - self.max_age
        n, size = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM records WHERE created < ?", (cutoff,)
        ).fetchone()
        if n:
            db.execute("DELETE FROM records WHERE created < ?", (cutoff,))
            self.records -= int(n)
            self.bytes -= int(size)
            self._count_drop("age", int(n))

    def _peek(self, limit: int) -> list[Record]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            self._drop_aged(self._clock())
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        rows = db.execute(
            "SELECT seq, kind, created, body FROM records ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        records: list[Record] = []
        unreadable: list[int] = []
        for seq, kind, created, body in rows:
            try:
                text = self._plain(str(kind), str(body))
            except DecryptionError as exc:
                log.error("outbox: record %d: %s", seq, exc)
                unreadable.append(int(seq))
                continue
            records.append(Record(int(seq), str(kind), float(created), json.loads(text)))
        if unreadable:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in unreadable])
                self._count_drop("key", len(unreadable))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                self._recount()
        return records

    def _plain(self, kind: str, body: str) -> str:
        if not is_encrypted(body):
            return body
        if self._cipher is None:
            raise DecryptionError(
                "the record is encrypted and no data key is configured (security.data_key_file)"
            )
        return self._cipher.decrypt(body, f"{self.stream}:{kind}")

    def _ack(self, upto: int) -> int:
        db = self._db()
        n, size = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM records WHERE seq <= ?", (upto,)
        ).fetchone()
        db.execute("DELETE FROM records WHERE seq <= ?", (upto,))
        self.records -= int(n)
        self.bytes -= int(size)
        return int(n)

    def _recount(self) -> None:
        count, size = (
            self._db().execute("SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        )
        self.records, self.bytes = int(count), int(size)
        self.dropped = _drops({r: int(self._meta(f"dropped_{r}")) for r in _DROP_REASONS})

    def _meta(self, key: str) -> str:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else "0"

    def _integrity(self) -> str:
        rows = self._db().execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)


def _drops(counts: Mapping[str, int]) -> dict[str, int]:
    """Drop counters: size and age always, key (undecryptable) only once it happened."""
    return {
        "size": counts.get("size", 0),
        "age": counts.get("age", 0),
        **({"key": counts["key"]} if counts.get("key") else {}),
    }


__all__ = ["HEARTBEAT", "HubOutbox", "OutboxError", "Record"]
