"""One storage test suite, run against SQLite and a real local PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import pytest

from appliance.hub.ingest import alert_change, heartbeat_point
from appliance.hub.storage.base import OFFLINE_RULE, Batch, Incoming, Storage
from appliance.hub.tokens import hash_token

pytestmark = [pytest.mark.usefixtures("no_leaked_db_threads"), pytest.mark.timeout(60)]

STREAM = "ab" * 16


def heartbeat(seq: int, t: float, cpu: float = 10.0) -> Incoming:
    body = {
        "system": {
            "cpu_percent": cpu,
            "memory_percent": 40.0,
            "max_temperature_c": 51.5,
            "max_gpu_percent": None,
        },
        "requests_per_s": 2.0,
        "models": {"m": {"requests_per_s": 2.0, "latency_avg_ms": 30.0, "tokens_per_s": 0.0}},
    }
    return Incoming(
        seq=seq, kind="heartbeat", time=t, body=json.dumps(body), point=heartbeat_point(t, body)
    )


def alert(seq: int, t: float, state: str, rule: str = "memory_high") -> Incoming:
    body = {
        "rule": rule,
        "subject": "",
        "state": state,
        "severity": "critical",
        "value": 91.0,
        "threshold": 85.0,
        "message": f"memory {state}",
        "started_at": t,
        "at": t,
    }
    return Incoming(seq=seq, kind="alert", time=t, body=json.dumps(body), alert=alert_change(body))


def batch(*records: Incoming, device: str = "dev-1", stream: str = STREAM) -> Batch:
    return Batch(
        device=device,
        name="Device One",
        version="9.9",
        stream=stream,
        dropped={"size": 3, "age": 0},
        records=list(records),
    )


async def enrolled(storage: Storage, device: str = "dev-1") -> None:
    await storage.enroll(device, "", hash_token(f"token-{device}"), 1000.0)


async def test_enrol_authenticate_revoke(storage: Storage) -> None:
    await storage.enroll("dev-1", "Label", hash_token("t1"), 1000.0)
    assert await storage.device_for_token(hash_token("t1")) == "dev-1"
    assert await storage.device_for_token(hash_token("nope")) is None
    # Re-enrolling replaces the token.
    await storage.enroll("dev-1", "", hash_token("t2"), 1001.0)
    assert await storage.device_for_token(hash_token("t1")) is None
    assert await storage.device_for_token(hash_token("t2")) == "dev-1"
    assert await storage.revoke("dev-1", 1002.0)
    assert await storage.device_for_token(hash_token("t2")) is None
    assert not await storage.revoke("ghost", 1002.0)
    device = await storage.device("dev-1")
    assert device is not None
    assert device.status() == "revoked"
    assert device.name == "Label"  # the enrolment label survives re-keying


async def test_ingest_is_idempotent_and_ordered(storage: Storage) -> None:
    await enrolled(storage)
    first = await storage.ingest(
        batch(heartbeat(1, 10), heartbeat(2, 20), alert(3, 25, "firing")), now=100
    )
    assert (first.accepted, first.duplicates, first.acked) == (3, 0, 3)
    # A retry of the same batch plus one new record: only the new one is stored.
    again = await storage.ingest(
        batch(heartbeat(1, 10), heartbeat(2, 20), alert(3, 25, "firing"), heartbeat(4, 40)),
        now=101,
    )
    assert (again.accepted, again.duplicates, again.acked) == (1, 3, 4)
    # Out-of-order and repeated sequence numbers inside one batch.
    mixed = await storage.ingest(
        batch(heartbeat(6, 60), heartbeat(5, 50), heartbeat(6, 60)), now=102
    )
    assert (mixed.accepted, mixed.acked) == (2, 6)
    rows = await storage.records("dev-1", 0, 100)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.kind for r in rows[:3]] == ["heartbeat", "heartbeat", "alert"]
    assert rows[0].body["system"]["cpu_percent"] == 10.0
    assert await storage.records("dev-1", rows[2].id, 2) == rows[3:5]
    device = await storage.device("dev-1")
    assert device is not None
    assert device.last_seq == 6 and device.last_seen == 102
    assert device.last_heartbeat == 60
    assert device.dropped == {"size": 3, "age": 0}
    assert device.latest is not None and device.latest["requests_per_s"] == 2.0
    assert device.name == "Device One" and device.version == "9.9"


async def test_a_new_stream_starts_over_at_one(storage: Storage) -> None:
    await enrolled(storage)
    await storage.ingest(batch(heartbeat(1, 10), heartbeat(2, 20)), now=100)
    fresh = await storage.ingest(batch(heartbeat(1, 30), stream="cd" * 16), now=101)
    assert (fresh.accepted, fresh.acked) == (1, 1)
    assert [(r.stream[:2], r.seq) for r in await storage.records("dev-1", 0, 10)] == [
        ("ab", 1),
        ("ab", 2),
        ("cd", 1),
    ]


async def test_concurrent_uploads_of_one_batch_store_it_once(storage: Storage) -> None:
    await enrolled(storage)
    records = [heartbeat(i, float(i)) for i in range(1, 41)]
    results = await asyncio.gather(*(storage.ingest(batch(*records), now=100) for _ in range(4)))
    assert sum(r.accepted for r in results) == 40
    assert all(r.acked == 40 for r in results)
    assert [r.seq for r in await storage.records("dev-1", 0, 100)] == list(range(1, 41))


async def test_alerts_fire_update_and_resolve(storage: Storage) -> None:
    await enrolled(storage)
    await storage.ingest(batch(alert(1, 10, "firing"), alert(2, 12, "firing")), now=100)
    firing = await storage.alerts("dev-1", "firing", 10)
    assert len(firing) == 1  # a repeated firing updates the open alert
    assert firing[0].rule == "memory_high" and firing[0].severity == "critical"
    device = await storage.device("dev-1")
    assert device is not None and device.alerts_firing == 1 and device.status() == "alerting"
    await storage.ingest(batch(alert(3, 20, "resolved")), now=101)
    assert await storage.alerts("dev-1", "firing", 10) == []
    resolved = await storage.alerts("dev-1", "resolved", 10)
    assert len(resolved) == 1 and resolved[0].resolved_at == 20
    # A resolution whose firing record never arrived is still kept.
    await storage.ingest(batch(alert(4, 30, "resolved", rule="gpu_busy")), now=102)
    assert {a.rule for a in await storage.alerts(None, "resolved", 10)} == {
        "memory_high",
        "gpu_busy",
    }


async def test_offline_marking_and_recovery(storage: Storage) -> None:
    await enrolled(storage, "dev-1")
    await enrolled(storage, "dev-2")
    await enrolled(storage, "dev-3")  # never uploads: not "offline", never seen
    await storage.ingest(batch(heartbeat(1, 10)), now=100)
    await storage.ingest(batch(heartbeat(1, 10), device="dev-2"), now=150)
    gone = await storage.mark_offline(cutoff=120, now=190, offline_after=70)
    assert gone == ["dev-1"]
    assert await storage.mark_offline(cutoff=120, now=191, offline_after=70) == []  # once
    devices = {d.id: d for d in await storage.devices()}
    assert devices["dev-1"].status() == "offline"
    assert devices["dev-2"].status() == "online"
    assert devices["dev-3"].status() == "never seen"
    (offline,) = await storage.alerts("dev-1", "firing", 10)
    assert offline.rule == OFFLINE_RULE and offline.value == 90
    await storage.ingest(batch(heartbeat(2, 200)), now=200)
    assert await storage.alerts("dev-1", "firing", 10) == []
    device = await storage.device("dev-1")
    assert device is not None and device.status() == "online"


async def test_points_and_retention_downsampling(storage: Storage) -> None:
    await enrolled(storage)
    # Two hours of heartbeats every 10 minutes: cpu 0..110.
    records = [heartbeat(i + 1, 7200.0 + i * 600, cpu=float(i * 10)) for i in range(12)]
    await storage.ingest(batch(*records), now=15_000)
    points = await storage.points("dev-1", 0, 1e9, 100)
    assert [p.cpu for p in points] == [float(i * 10) for i in range(12)]
    assert points[0].latency_ms == 30.0 and points[0].temperature == 51.5
    assert points[0].gpu is None
    assert [p.cpu for p in await storage.points("dev-1", 0, 1e9, 3)] == [90.0, 100.0, 110.0]
    # Keep raw data newer than 10800 s: the first hour (6 points) becomes one average.
    n = await storage.retention(raw_before=10_800, keep_before=0, bucket=3600)
    assert n == 6
    points = await storage.points("dev-1", 0, 1e9, 100)
    assert [(p.time, p.resolution) for p in points[:2]] == [(7200.0, 3600), (10_800.0, 0)]
    assert points[0].cpu == pytest.approx(25.0)
    assert len(points) == 7
    # Records older than the raw retention are deleted; the stream's mark still dedups.
    assert [r.seq for r in await storage.records("dev-1", 0, 100)] == list(range(1, 13))
    await storage.retention(raw_before=20_000, keep_before=0, bucket=3600)
    assert await storage.records("dev-1", 0, 100) == []
    again = await storage.ingest(batch(*records), now=20_001)
    assert again.accepted == 0 and again.duplicates == 12
    # Everything past ``keep`` goes.
    await storage.retention(raw_before=20_000, keep_before=1e9, bucket=3600)
    assert await storage.points("dev-1", 0, 1e9, 100) == []


async def test_ping_and_reopen_keeps_data(storage_url: str) -> None:
    from appliance.hub.storage import from_url

    first = from_url(storage_url)
    await first.open()
    try:
        await first.ping()
        await enrolled(first)
        await first.ingest(batch(heartbeat(1, 10)), now=100)
    finally:
        await first.close()
    second = from_url(storage_url)
    await second.open()  # the schema already exists
    try:
        device = await second.device("dev-1")
        assert device is not None and device.last_seq == 1
    finally:
        await second.close()
