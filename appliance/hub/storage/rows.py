"""The connection adapter both backends supply, and fleet rows as :mod:`.base` values."""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any

from appliance.hub.storage.base import POINT_FIELDS, Alert, Device, Point, loads_dict

Row = Sequence[Any]


class Conn(abc.ABC):
    """One connection (inside a transaction for writers)."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the rows it changed."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None


def device_row(r: Row) -> Device:
    return Device(
        id=str(r[0]),
        name=str(r[1]),
        version=str(r[2]),
        enrolled=float(r[3]),
        revoked=_f(r[4]),
        last_seen=_f(r[5]),
        last_heartbeat=_f(r[6]),
        stream=str(r[7]),
        last_seq=int(r[8]),
        dropped={k: int(v) for k, v in json.loads(r[9] or "{}").items()},
        latest=loads_dict(r[10]),
        alerts_firing=int(r[11]),
        offline=int(r[12]) > 0,
    )


def point_row(r: Row) -> Point:
    values = dict(zip(POINT_FIELDS, (_f(v) for v in r[1:-1]), strict=True))
    return Point(time=float(r[0]), resolution=int(r[-1]), **values)


def alert_row(r: Row) -> Alert:
    return Alert(
        id=int(r[0]),
        device_id=str(r[1]),
        rule=str(r[2]),
        subject=str(r[3]),
        severity=str(r[4]),
        state=str(r[5]),
        value=_f(r[6]),
        threshold=_f(r[7]),
        message=str(r[8]),
        started_at=float(r[9]),
        resolved_at=_f(r[10]),
        updated=float(r[11]),
    )


def _f(value: Any) -> float | None:
    return None if value is None else float(value)
