"""The durable outbox in-process: order, numbering, bounds and drop policy, corruption."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.core.metrics import Metrics
from appliance.ops.instance import default_state_dir
from appliance.ops.metrics import OutboxMetrics
from appliance.ops.outbox import HEARTBEAT, HubOutbox, OutboxError
from tests.hub.conftest import no_leaked_db_threads  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.usefixtures("no_leaked_db_threads"), pytest.mark.timeout(30)]


def outbox(path: Path, **kw: object) -> HubOutbox:
    options: dict[str, object] = {"max_records": 1000, "max_bytes": 1 << 20, "max_age": 3600.0}
    options.update(kw)
    return HubOutbox(path, **options)  # type: ignore[arg-type]


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_append_peek_ack_in_order(tmp_path: Path) -> None:
    async with outbox(tmp_path / "o.db") as box:
        seqs = [await box.append(HEARTBEAT if i % 2 else "alert", {"i": i}) for i in range(10)]
        assert seqs == list(range(1, 11))
        batch = await box.peek(4)
        assert [(r.seq, r.body["i"]) for r in batch] == [(1, 0), (2, 1), (3, 2), (4, 3)]
        assert batch[1].kind == HEARTBEAT and batch[0].kind == "alert"
        assert await box.ack(batch[-1].seq) == 4
        assert [r.seq for r in await box.peek(100)] == list(range(5, 11))
        assert (box.records, box.last_seq) == (6, 10)
        assert len(box.stream) == 32


async def test_settings_and_numbering_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with outbox(path) as box:
        for i in range(3):
            await box.append("event", {"i": i})
        await box.ack(3)  # everything delivered and deleted
        stream = box.stream
    # Sequence numbers are never reused, even once every record is gone.
    async with outbox(path) as box:
        assert box.stream == stream
        assert await box.append("event", {"i": 3}) == 4
        assert await box.integrity_check() == "ok"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_synchronous_full_is_in_force(tmp_path: Path) -> None:
    async with outbox(tmp_path / "o.db") as box:
        assert box._conn is not None
        level = await box._call(lambda: box._db().execute("PRAGMA synchronous").fetchone()[0])
        assert level == 2  # FULL: the WAL is fsynced at every commit


async def test_size_bound_drops_oldest_heartbeats_first(tmp_path: Path) -> None:
    metrics = Metrics()
    path = tmp_path / "o.db"
    async with outbox(path, max_records=10, metrics=metrics.unit(OutboxMetrics)) as box:
        await box.append("alert", {"n": "a1"})
        for i in range(8):
            await box.append(HEARTBEAT, {"n": f"h{i}"})
        await box.append("alert", {"n": "a2"})
        assert box.dropped == {"size": 0, "age": 0}
        await box.append(HEARTBEAT, {"n": "h8"})  # 11 > 10: h0 goes
        await box.append("event", {"n": "e1"})  # h1 goes
        kept = [r.body["n"] for r in await box.peek(100)]
        assert kept == ["a1", "h2", "h3", "h4", "h5", "h6", "h7", "a2", "h8", "e1"]
        assert box.dropped["size"] == 2
        assert metric(metrics, "appliance_outbox_dropped_total", reason="size") == 2
        assert metric(metrics, "appliance_outbox_records") == 10
        # Only alerts and events left: then the oldest of any kind goes.
        await box.ack(0)
        for i in range(20):
            await box.append("alert", {"n": f"x{i}"})
        kept = [r.body["n"] for r in await box.peek(100)]
        assert kept == [f"x{i}" for i in range(10, 20)]
        assert box.dropped["size"] == 22
    async with outbox(path, max_records=10) as box:
        assert box.dropped == {"size": 22, "age": 0}  # the counter is persistent


async def test_byte_bound(tmp_path: Path) -> None:
    async with outbox(tmp_path / "o.db", max_bytes=4096) as box:
        for i in range(40):
            await box.append(HEARTBEAT, {"i": i, "pad": "x" * 200})
        assert box.bytes <= 4096
        assert 15 <= box.records <= 19  # 4096 bytes of ~216-byte records
        seqs = [r.seq for r in await box.peek(100)]
        assert seqs == list(range(41 - len(seqs), 41))  # the newest survive, in order
        assert box.dropped["size"] == 40 - len(seqs)
        with pytest.raises(OutboxError, match="cannot fit"):
            await box.append(HEARTBEAT, {"pad": "x" * 5000})


async def test_age_bound(tmp_path: Path) -> None:
    now = [1000.0]
    async with outbox(tmp_path / "o.db", max_age=60, clock=lambda: now[0]) as box:
        await box.append("alert", {"n": 1})
        now[0] += 30
        await box.append(HEARTBEAT, {"n": 2})
        now[0] += 45  # the first is 75 s old
        assert [r.body["n"] for r in await box.peek(10)] == [2]
        assert box.dropped == {"size": 0, "age": 1}


async def test_garbage_file_is_moved_aside_and_reported(tmp_path: Path) -> None:
    metrics = Metrics()
    path = tmp_path / "o.db"
    garbage = b"this is not a database" * 500
    path.write_bytes(garbage)
    async with outbox(path, metrics=metrics.unit(OutboxMetrics)) as box:
        assert len(box.recovered) == 1
        moved = box.recovered[0]
        assert moved.name.startswith("o.db.corrupt-")
        assert moved.read_bytes() == garbage  # kept, never deleted
        assert await box.append("event", {"ok": True}) == 1
        assert await box.integrity_check() == "ok"
    assert metric(metrics, "appliance_outbox_corrupt_total") == 1


async def test_damaged_pages_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    async with outbox(path) as box:
        for i in range(300):
            await box.append(HEARTBEAT, {"i": i, "pad": "y" * 300})
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    # Scribble over the middle of the b-tree pages, leaving the header intact.
    for offset in range(2 * 4096, 6 * 4096, 7):
        data[offset] = 0xA5
    path.write_bytes(bytes(data))
    async with outbox(path) as box:
        assert box.recovered, "a damaged file must be moved aside"
        assert box.records == 0 and await box.append("event", {}) == 1


def test_default_state_dir() -> None:
    home = Path("/home/u")
    assert default_state_dir(
        {"STATE_DIRECTORY": "/var/lib/x:/other"}, is_root=False, home=home
    ) == Path("/var/lib/x")
    assert default_state_dir({}, is_root=True, home=home) == Path("/var/lib/appliance")
    assert default_state_dir({}, is_root=False, home=home) == Path("/home/u/.local/state/appliance")
    assert default_state_dir({"XDG_STATE_HOME": "/s"}, is_root=False, home=home) == Path(
        "/s/appliance"
    )
