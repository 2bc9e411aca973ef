"""The one storage interface of the hub, and the values that cross it.

Two implementations sit behind it: :mod:`.sqlite` (aiosqlite; zero set-up, one file) and
:mod:`.postgres` (asyncpg; for large fleets). The same test suite runs against both. Times
are Unix seconds (``REAL`` / ``DOUBLE PRECISION``) in both, record bodies JSON text.

Deduplication: every device upload names its outbox ``stream`` and numbers records within
it. The hub keeps the highest sequence number stored per (device, stream); a record at or
below it is a duplicate and is skipped, inside the same transaction that stores the rest,
so concurrent or repeated uploads can never store a record twice. A primary key on
(device, stream, seq) backs this up.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OFFLINE_RULE = "device_offline"

# The numbers a heartbeat contributes to charts, in column order.
POINT_FIELDS = ("cpu", "memory", "temperature", "gpu", "latency_ms", "rps", "tokens_s")


@dataclass(frozen=True)
class Point:
    """A heartbeat's chartable numbers; ``resolution`` 0 is as received, else bucket seconds."""

    time: float
    cpu: float | None = None
    memory: float | None = None
    temperature: float | None = None
    gpu: float | None = None
    latency_ms: float | None = None
    rps: float | None = None
    tokens_s: float | None = None
    resolution: int = 0

    def values(self) -> tuple[float | None, ...]:
        return tuple(getattr(self, f) for f in POINT_FIELDS)


@dataclass(frozen=True)
class AlertChange:
    """An alert transition reported by a device (or raised by the hub itself)."""

    rule: str
    subject: str
    state: str  # "firing" | "resolved"
    severity: str
    value: float | None
    threshold: float | None
    message: str
    started_at: float
    at: float


@dataclass(frozen=True)
class Incoming:
    """One uploaded record, parsed; ``point`` / ``alert`` are set for those kinds."""

    seq: int
    kind: str
    time: float
    body: str  # JSON text, stored as received
    point: Point | None = None
    alert: AlertChange | None = None


@dataclass(frozen=True)
class Batch:
    """One upload from one device."""

    device: str
    name: str
    version: str
    stream: str
    dropped: dict[str, int]
    records: Sequence[Incoming]


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    acked: int  # highest sequence number the hub holds for this stream


@dataclass(frozen=True)
class Device:
    """A device as the fleet view shows it."""

    id: str
    name: str
    version: str
    enrolled: float
    revoked: float | None
    last_seen: float | None  # hub time of the last upload
    last_heartbeat: float | None  # device time of the newest heartbeat
    stream: str
    last_seq: int
    dropped: dict[str, int]
    latest: dict[str, Any] | None  # the newest heartbeat body
    alerts_firing: int  # every firing alert, device_offline included
    offline: bool  # a device_offline alert is firing

    def status(self) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.last_seen is None:
            return "never seen"
        if self.offline:
            return "offline"
        return "alerting" if self.alerts_firing else "online"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "status": self.status(),
            "enrolled": self.enrolled,
            "revoked": self.revoked,
            "last_seen": self.last_seen,
            "last_heartbeat": self.last_heartbeat,
            "stream": self.stream,
            "last_seq": self.last_seq,
            "dropped": self.dropped,
            "alerts_firing": self.alerts_firing,
            "latest": self.latest,
        }


@dataclass(frozen=True)
class Alert:
    id: int
    device_id: str
    rule: str
    subject: str
    severity: str
    state: str
    value: float | None
    threshold: float | None
    message: str
    started_at: float
    resolved_at: float | None
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StoredRecord:
    id: int  # the hub's arrival order, a cursor for paging
    stream: str
    seq: int
    kind: str
    time: float
    received: float
    body: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def loads_dict(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    value = json.loads(text)
    return value if isinstance(value, dict) else None


class Storage(abc.ABC):
    """Everything the hub stores. Open with ``await open()``; ``close()`` always."""

    kind: str = ""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if missing."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise if the database cannot answer."""

    # -- enrolment --------------------------------------------------------------------

    @abc.abstractmethod
    async def enroll(self, device_id: str, name: str, token_hash: str, now: float) -> None:
        """Create the device, or give it a new token (un-revoking it)."""

    @abc.abstractmethod
    async def revoke(self, device_id: str, now: float) -> bool:
        """Revoke the device's token; False if there is no such device."""

    @abc.abstractmethod
    async def device_for_token(self, token_hash: str) -> str | None:
        """The device an active token belongs to."""

    # -- ingest -----------------------------------------------------------------------

    @abc.abstractmethod
    async def ingest(self, batch: Batch, now: float) -> IngestResult:
        """Store the batch's new records (skipping duplicates) and what they imply:
        heartbeat points, alert changes, the device's last-seen time; resolve an open
        device_offline alert. One transaction."""

    # -- fleet view -------------------------------------------------------------------

    @abc.abstractmethod
    async def devices(self) -> list[Device]: ...

    @abc.abstractmethod
    async def device(self, device_id: str) -> Device | None: ...

    @abc.abstractmethod
    async def points(self, device_id: str, since: float, until: float, limit: int) -> list[Point]:
        """Heartbeat points in [since, until], oldest first, raw and downsampled."""

    @abc.abstractmethod
    async def records(self, device_id: str, after: int, limit: int) -> list[StoredRecord]:
        """Stored records in arrival order (within a stream that is sequence order), after
        the cursor ``after`` (a record's ``id``; 0 for all)."""

    @abc.abstractmethod
    async def alerts(self, device_id: str | None, state: str | None, limit: int) -> list[Alert]:
        """Alerts, newest first; ``state`` "firing" or "resolved" filters."""

    # -- monitor ----------------------------------------------------------------------

    @abc.abstractmethod
    async def mark_offline(self, cutoff: float, now: float, offline_after: float) -> list[str]:
        """Fire device_offline for active devices last seen before ``cutoff`` that have no
        such alert yet; returns their ids."""

    @abc.abstractmethod
    async def retention(self, raw_before: float, keep_before: float, bucket: float) -> int:
        """Downsample raw heartbeats older than ``raw_before`` into ``bucket``-second
        averages, delete records older than ``raw_before`` and downsampled heartbeats and
        resolved alerts older than ``keep_before``. Returns raw heartbeats downsampled."""
