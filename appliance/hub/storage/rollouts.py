"""Rollout storage: published artifacts, device tags, rollouts and each device's progress.

Written once in the portable SQL of :mod:`.sql`; :class:`RolloutStore` is mixed into
:class:`~.sql.SqlStorage`, so both backends have it. The schema is created with the rest
(``schema(dialect)``). A rollout's state lives only here, so a restarted hub resumes
every rollout where it was.
"""

from __future__ import annotations

import abc
import json
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from appliance.hub.storage.rows import Conn, Row

_TABLES = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    files TEXT NOT NULL,
    size BIGINT NOT NULL,
    created {real} NOT NULL,
    UNIQUE (kind, name, version)
);
CREATE TABLE IF NOT EXISTS device_tags (
    device_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    artifact_id TEXT NOT NULL,
    target TEXT NOT NULL,
    waves TEXT NOT NULL,
    soak {real} NOT NULL,
    max_failures INTEGER NOT NULL,
    offline TEXT NOT NULL,
    state TEXT NOT NULL,
    wave INTEGER NOT NULL,
    wave_started {real} NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created {real} NOT NULL,
    updated {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    previous TEXT NOT NULL DEFAULT '',
    healthy_at {real},
    updated {real} NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollout_devices_device ON rollout_devices (device_id, state);
"""


def schema(real: str) -> str:
    """The rollout tables; ``real`` is the dialect's float type."""
    return _TABLES.format(real=real)


# Device states that count as "moved" (the new version is or may be on the device).
MOVED = ("wanted", "downloading", "installed", "healthy", "failed")
ACTIVE = ("running", "halted")
_ACTIVE_OR_CATCHING_UP = (
    " AND (r.state IN ('running', 'halted') OR (r.state = 'done' AND r.offline = 'catch-up'))"
)


@dataclass(frozen=True)
class Artifact:
    id: str  # sha256 of the canonical description (kind, name, version, files)
    kind: str  # "model" | "config"
    name: str
    version: str
    files: list[dict[str, Any]]  # {"path", "sha256", "size"}
    size: int
    created: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Rollout:
    id: str
    artifact_id: str
    target: dict[str, Any]
    waves: list[str]
    soak: float
    max_failures: int
    offline: str  # "wait" | "skip" | "catch-up"
    state: str  # running | done | halted | rolled_back
    wave: int  # the wave now running (0-based)
    wave_started: float
    reason: str
    created: float
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RolloutDevice:
    rollout_id: str
    device_id: str
    wave: int
    state: str
    reason: str
    previous: str
    healthy_at: float | None
    updated: float

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        del out["rollout_id"]
        return out


_ROLLOUT = (
    "id, artifact_id, target, waves, soak, max_failures, offline, state, wave, "
    "wave_started, reason, created, updated"
)
_RDEV = "rollout_id, device_id, wave, state, reason, previous, healthy_at, updated"


class RolloutStore(abc.ABC):
    """The rollout queries; the backend supplies connections."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Conn]: ...

    @abc.abstractmethod
    def reader(self) -> AbstractAsyncContextManager[Conn]: ...

    # -- artifacts --------------------------------------------------------------------

    async def put_artifact(self, a: Artifact) -> Artifact:
        """Store ``a`` unless it is there; a different one of the same name and version
        is refused (ValueError): a version, once published, means one thing."""
        async with self.transaction() as conn:
            row = await conn.fetchone(
                "SELECT id FROM artifacts WHERE kind = ? AND name = ? AND version = ?",
                a.kind,
                a.name,
                a.version,
            )
            if row is not None:
                if str(row[0]) != a.id:
                    raise ValueError(
                        f"{a.name} version {a.version} is already published with other "
                        "content; publish it as a new version"
                    )
                return a
            await conn.execute(
                "INSERT INTO artifacts (id, kind, name, version, files, size, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                a.id,
                a.kind,
                a.name,
                a.version,
                json.dumps(a.files),
                a.size,
                a.created,
            )
        return a

    async def artifact(self, artifact_id: str) -> Artifact | None:
        async with self.reader() as conn:
            row = await conn.fetchone(
                "SELECT id, kind, name, version, files, size, created FROM artifacts WHERE id = ?",
                artifact_id,
            )
        return _artifact(row) if row else None

    async def artifacts(self) -> list[Artifact]:
        async with self.reader() as conn:
            rows = await conn.fetch(
                "SELECT id, kind, name, version, files, size, created FROM artifacts "
                "ORDER BY created DESC"
            )
        return [_artifact(r) for r in rows]

    # -- tags -------------------------------------------------------------------------

    async def add_tags(self, device_id: str, tags: list[str]) -> None:
        async with self.transaction() as conn:
            for tag in tags:
                await conn.execute(
                    "INSERT INTO device_tags (device_id, tag) VALUES (?, ?) "
                    "ON CONFLICT (device_id, tag) DO NOTHING",
                    device_id,
                    tag,
                )

    async def remove_tags(self, device_id: str, tags: list[str]) -> None:
        async with self.transaction() as conn:
            for tag in tags:
                await conn.execute(
                    "DELETE FROM device_tags WHERE device_id = ? AND tag = ?", device_id, tag
                )

    async def tags(self) -> dict[str, list[str]]:
        async with self.reader() as conn:
            rows = await conn.fetch("SELECT device_id, tag FROM device_tags ORDER BY tag")
        out: dict[str, list[str]] = {}
        for device_id, tag in rows:
            out.setdefault(str(device_id), []).append(str(tag))
        return out

    # -- rollouts ---------------------------------------------------------------------

    async def create_rollout(self, r: Rollout, devices: list[tuple[str, int, str]]) -> None:
        """A new rollout with its devices as (device, wave, version before)."""
        async with self.transaction() as conn:
            await conn.execute(
                f"INSERT INTO rollouts ({_ROLLOUT}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                r.id,
                r.artifact_id,
                json.dumps(r.target),
                json.dumps(r.waves),
                r.soak,
                r.max_failures,
                r.offline,
                r.state,
                r.wave,
                r.wave_started,
                r.reason,
                r.created,
                r.updated,
            )
            await conn.executemany(
                f"INSERT INTO rollout_devices ({_RDEV}) VALUES (?, ?, ?, 'pending', '', ?, "
                "NULL, ?)",
                [(r.id, d, w, prev, r.created) for d, w, prev in devices],
            )

    async def rollout(self, rollout_id: str) -> Rollout | None:
        async with self.reader() as conn:
            row = await conn.fetchone(f"SELECT {_ROLLOUT} FROM rollouts WHERE id = ?", rollout_id)
        return _rollout(row) if row else None

    async def rollouts(self, states: tuple[str, ...] = ()) -> list[Rollout]:
        where = f" WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        async with self.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {_ROLLOUT} FROM rollouts{where} ORDER BY created DESC", *states
            )
        return [_rollout(r) for r in rows]

    async def rollout_devices(self, rollout_id: str) -> list[RolloutDevice]:
        async with self.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {_RDEV} FROM rollout_devices WHERE rollout_id = ? "
                "ORDER BY wave, device_id",
                rollout_id,
            )
        return [_rdev(r) for r in rows]

    async def set_rollout(
        self, rollout_id: str, now: float, *, state: str, wave: int, reason: str, started: float
    ) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "UPDATE rollouts SET state = ?, wave = ?, reason = ?, wave_started = ?, "
                "updated = ? WHERE id = ?",
                state,
                wave,
                reason,
                started,
                now,
                rollout_id,
            )

    async def set_device(
        self,
        rollout_id: str,
        device_id: str,
        state: str,
        reason: str,
        now: float,
        *,
        only_from: tuple[str, ...] = (),
    ) -> bool:
        """Move one device to ``state`` (only from the states in ``only_from``, if any);
        False when nothing changed."""
        where = f" AND state IN ({', '.join('?' * len(only_from))})" if only_from else ""
        healthy = now if state == "healthy" else None
        async with self.transaction() as conn:
            changed = await conn.execute(
                "UPDATE rollout_devices SET state = ?, reason = ?, updated = ?, "
                "healthy_at = CASE WHEN ? THEN ? ELSE healthy_at END "
                f"WHERE rollout_id = ? AND device_id = ?{where}",
                state,
                reason,
                now,
                healthy is not None,
                healthy,
                rollout_id,
                device_id,
                *only_from,
            )
        return changed > 0

    async def set_devices(
        self,
        rollout_id: str,
        device_ids: list[str],
        state: str,
        now: float,
        *,
        only_from: tuple[str, ...],
    ) -> None:
        """Move many devices (from the states in ``only_from``) to ``state``, not healthy,
        in one transaction."""
        if not device_ids:
            return
        where = ", ".join("?" * len(only_from))
        async with self.transaction() as conn:
            await conn.executemany(
                "UPDATE rollout_devices SET state = ?, reason = '', updated = ? "
                f"WHERE rollout_id = ? AND device_id = ? AND state IN ({where})",
                [(state, now, rollout_id, d, *only_from) for d in device_ids],
            )

    async def device_rollouts(
        self, device_id: str, states: tuple[str, ...] | None = ACTIVE
    ) -> list[tuple[Rollout, RolloutDevice]]:
        """The device's rows in rollouts in ``states``, newest rollout first. By default the
        running and halted ones, and done ones that catch up devices that were away; None:
        every rollout."""
        if states is None:
            where = ""
        elif states == ACTIVE:
            where, states = _ACTIVE_OR_CATCHING_UP, ()
        else:
            where = f" AND r.state IN ({', '.join('?' * len(states))})"
        async with self.reader() as conn:
            rows = await conn.fetch(
                f"SELECT {', '.join('r.' + c for c in _ROLLOUT.split(', '))}, "
                f"{', '.join('d.' + c for c in _RDEV.split(', '))} FROM rollouts r "
                "JOIN rollout_devices d ON d.rollout_id = r.id "
                f"WHERE d.device_id = ?{where} ORDER BY r.created DESC",
                device_id,
                *(states or ()),
            )
        n = len(_ROLLOUT.split(", "))
        return [(_rollout(r[:n]), _rdev(r[n:])) for r in rows]


def _artifact(r: Row) -> Artifact:
    return Artifact(
        id=str(r[0]),
        kind=str(r[1]),
        name=str(r[2]),
        version=str(r[3]),
        files=json.loads(r[4]),
        size=int(r[5]),
        created=float(r[6]),
    )


def _rollout(r: Row) -> Rollout:
    return Rollout(
        id=str(r[0]),
        artifact_id=str(r[1]),
        target=json.loads(r[2]),
        waves=json.loads(r[3]),
        soak=float(r[4]),
        max_failures=int(r[5]),
        offline=str(r[6]),
        state=str(r[7]),
        wave=int(r[8]),
        wave_started=float(r[9]),
        reason=str(r[10]),
        created=float(r[11]),
        updated=float(r[12]),
    )


def _rdev(r: Row) -> RolloutDevice:
    return RolloutDevice(
        rollout_id=str(r[0]),
        device_id=str(r[1]),
        wave=int(r[2]),
        state=str(r[3]),
        reason=str(r[4]),
        previous=str(r[5]),
        healthy_at=None if r[6] is None else float(r[6]),
        updated=float(r[7]),
    )
