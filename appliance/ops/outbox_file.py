"""The outbox's SQLite file: opened and checked, or recognised as damaged and moved aside.

Opening runs ``PRAGMA quick_check`` before anything else, sets the durability pragmas
(``journal_mode=WAL``, ``synchronous=FULL``; see :mod:`appliance.ops.outbox` for why), creates
the schema and reads the stream id and counters. A file that fails the check, or a statement
that reports corruption later, is renamed to ``<name>.corrupt-<UTC time>`` together with its
``-wal``/``-shm`` files, so a fresh outbox can start and the damaged one stays for a look.

Everything here runs on the outbox's own thread.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_kind ON records (kind, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# SQLite primary result codes that mean the file itself is damaged.
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB


class OutboxError(RuntimeError):
    """The outbox cannot store a record (e.g. one larger than the whole outbox)."""


class CorruptOutbox(OutboxError, sqlite3.DatabaseError):
    """The database file is damaged (raised internally; handled by moving it aside)."""


@dataclass
class Opened:
    """A checked, set-up connection and what the file says about itself."""

    conn: sqlite3.Connection
    stream: str  # the random id of this database's sequence numbers
    meta: dict[str, str]
    records: int
    bytes: int
    last_seq: int


def connect(path: Path) -> Opened:
    """Open ``path``, check it, and create the schema; raises ``sqlite3.DatabaseError``
    (:class:`CorruptOutbox` when the check fails) if the file is damaged."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()
        if verdict is None or verdict[0] != "ok":
            raise CorruptOutbox(f"quick_check: {verdict[0] if verdict else 'no answer'}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if "stream" not in meta:
            meta["stream"] = uuid.uuid4().hex
            conn.execute("INSERT INTO meta VALUES ('stream', ?)", (meta["stream"],))
        count, size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM records"
        ).fetchone()
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    except BaseException:
        conn.close()
        raise
    return Opened(conn, meta["stream"], meta, int(count), int(size), int(row[0]) if row else 0)


def move_aside(path: Path) -> Path:
    """Rename the damaged database at ``path`` (and its ``-wal``/``-shm`` files) out of the
    way; returns the new name of the database file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    if isinstance(exc, CorruptOutbox):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) in _CORRUPT_CODES
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


__all__ = ["CorruptOutbox", "Opened", "OutboxError", "connect", "is_corrupt", "move_aside"]
