"""``POST /api/v1/ingest``: batches of outbox records from enrolled devices.

Each request carries the device's own bearer token; an unknown or revoked token gets 401,
a token used for another device's batch 403. The batch is stored in one transaction and
is idempotent on (device, stream, sequence): repeats are counted as duplicates and skipped.
The answer's ``acked`` is the highest sequence number the hub holds for the stream; the
device deletes everything up to it.

Record bodies are stored as received. Heartbeats additionally yield a chart point and
alerts an alert change; a body missing those fields is still stored (a device must never
be stuck behind a record the hub cannot chart).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.errors import Forbidden, RequestError, Unauthenticated
from appliance.hub.keys import METRICS, STORAGE
from appliance.hub.rollout.service import ROLLOUTS
from appliance.hub.storage.base import AlertChange, Batch, Incoming, Point
from appliance.hub.tokens import hash_token
from appliance.protocol import strictjson

routes = web.RouteTableDef()

MAX_RECORDS = 10_000
_DEVICE_ID = r"^[a-z0-9][a-z0-9-]{0,62}$"


class _WireRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    seq: int = Field(ge=1, le=2**63 - 1)
    kind: str = Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")
    time: float = Field(allow_inf_nan=False)
    body: dict[str, Any]


class _WireBatch(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device: str = Field(pattern=_DEVICE_ID)
    name: str = Field(default="", max_length=128)
    version: str = Field(default="", max_length=64)
    stream: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    dropped: dict[str, int] = Field(default_factory=dict)
    records: list[_WireRecord] = Field(max_length=MAX_RECORDS)


def parse_batch(data: Any) -> Batch:
    try:
        wire = _WireBatch.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"{where}: {first['msg']}") from None
    return Batch(
        device=wire.device,
        name=wire.name or wire.device,
        version=wire.version,
        stream=wire.stream,
        dropped=dict(wire.dropped),
        records=[_incoming(r) for r in wire.records],
    )


def _incoming(record: _WireRecord) -> Incoming:
    body = record.body
    return Incoming(
        seq=record.seq,
        kind=record.kind,
        time=record.time,
        body=json.dumps(body, separators=(",", ":")),
        point=heartbeat_point(record.time, body) if record.kind == "heartbeat" else None,
        alert=alert_change(body) if record.kind == "alert" else None,
    )


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def heartbeat_point(at: float, body: dict[str, Any]) -> Point:
    """The chartable numbers of a heartbeat (a health snapshot's ``to_dict()``)."""
    system = body.get("system") if isinstance(body.get("system"), dict) else {}
    assert isinstance(system, dict)
    models = body.get("models") if isinstance(body.get("models"), dict) else {}
    assert isinstance(models, dict)
    weighted = weight = tokens = 0.0
    for stats in models.values():
        if not isinstance(stats, dict):
            continue
        rps, avg = _num(stats.get("requests_per_s")), _num(stats.get("latency_avg_ms"))
        tokens += _num(stats.get("tokens_per_s")) or 0.0
        if rps and avg is not None:
            weighted += rps * avg
            weight += rps
    return Point(
        time=at,
        cpu=_num(system.get("cpu_percent")),
        memory=_num(system.get("memory_percent")),
        temperature=_num(system.get("max_temperature_c")),
        gpu=_num(system.get("max_gpu_percent")),
        latency_ms=round(weighted / weight, 3) if weight else None,
        rps=_num(body.get("requests_per_s")),
        tokens_s=tokens if models else None,
    )


def alert_change(body: dict[str, Any]) -> AlertChange | None:
    rule, state = body.get("rule"), body.get("state")
    if not isinstance(rule, str) or state not in ("firing", "resolved"):
        return None
    at = _num(body.get("at")) or time.time()
    return AlertChange(
        rule=rule[:64],
        subject=str(body.get("subject") or "")[:128],
        state=str(state),
        severity=str(body.get("severity") or "warning")[:16],
        value=_num(body.get("value")),
        threshold=_num(body.get("threshold")),
        message=str(body.get("message") or "")[:500],
        started_at=_num(body.get("started_at")) or at,
        at=at,
    )


async def authenticate(request: web.Request) -> str:
    """The device id the request's bearer token belongs to."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("a device token is required: Authorization: Bearer <token>")
    device = await request.app[STORAGE].device_for_token(hash_token(token.strip()))
    if device is None:
        raise Unauthenticated("unknown or revoked device token")
    return device


@routes.post("/api/v1/ingest")
async def ingest(request: web.Request) -> web.Response:
    """Store a batch of one device's outbox records; answers what the hub now holds."""
    metrics = request.app[METRICS]
    device = await authenticate(request)
    try:
        data = strictjson.loads(await request.read())
    except RequestError as exc:
        raise RequestError(f"the body is not JSON: {exc.message}") from None
    batch = parse_batch(data)
    if batch.device != device:
        raise Forbidden(f"this token belongs to device {device!r}, not {batch.device!r}")
    started = time.perf_counter()
    result = await request.app[STORAGE].ingest(batch, time.time())
    metrics.ingest_duration.observe(time.perf_counter() - started)
    metrics.ingest_records.labels("accepted").inc(result.accepted)
    metrics.ingest_records.labels("duplicate").inc(result.duplicates)
    answer: dict[str, Any] = {
        "acked": result.acked,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
    }
    rollouts = request.app.get(ROLLOUTS)
    if rollouts is not None:  # progress reports in, and what the device should do now
        for record in batch.records:
            if record.kind == "rollout":
                await rollouts.report(device, json.loads(record.body))
        wanted = await rollouts.wanted(device)
        if wanted is not None:
            answer["wanted"] = wanted
    return web.json_response(answer)
