"""The health collector on a real daemon, sensor parsing, and device alerts end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.config import HealthConfig
from appliance.ops.health import HealthCollector
from appliance.ops.reqstats import bucket_quantile
from appliance.ops.sensors import SystemProbe, parse_nvidia_smi
from appliance.ops.snapshot import HealthSnapshot
from tests.conftest import DEFAULT_MODELS, base_url, make_config, serving

pytestmark = pytest.mark.timeout(60)

GOOD = "sensor-anomaly"


def repo_with_broken_model(root: Path) -> Path:
    repo = root / "models"
    shutil.copytree(DEFAULT_MODELS / GOOD, repo / GOOD)
    (repo / "broken").mkdir()
    (repo / "broken" / "model.onnx").write_bytes(b"not an onnx model")
    (repo / "broken" / "manifest.toml").write_text(
        'name = "broken"\nruntime = "onnx"\nfile = "model.onnx"\n', encoding="utf-8"
    )
    return repo


def infer_body() -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "window",
                "shape": [1, 32, 3],
                "datatype": "FP32",
                "data": [[20.0, 50.0, 0.1]] * 32,
            }
        ]
    }


async def test_snapshot_of_a_serving_daemon(tmp_path: Path) -> None:
    config = make_config(
        models={"dir": repo_with_broken_model(tmp_path)}, health={"interval": 3600}
    )  # snapshots taken by hand here
    async with serving(config) as server, aiohttp.ClientSession() as http:
        url = base_url(server)
        for _ in range(6):
            async with http.post(f"{url}/v2/models/{GOOD}/infer", json=infer_body()) as r:
                assert r.status == 200
        for _ in range(2):
            async with http.post(f"{url}/v2/models/broken/infer", json=infer_body()) as r:
                assert r.status == 503
        assert server.health is not None
        snap = await server.health.snapshot()
        assert server.health.latest is snap

    good, broken = snap.models[GOOD], snap.models["broken"]
    assert (good.state, good.requests_total, good.errors_total) == ("ready", 6, 0)
    assert good.latency_count == 6 and good.latency_sum_s > 0
    assert good.requests_per_s > 0 and good.error_rate == 0
    assert good.latency_p50_ms is not None and good.latency_p99_ms is not None
    assert 0 < good.latency_p50_ms <= good.latency_p95_ms <= good.latency_p99_ms  # type: ignore[operator]
    assert good.latency_avg_ms is not None and good.latency_avg_ms > 0
    assert (good.queue_depth, good.running, good.load_failures) == (0, 0, 0)
    assert (broken.state, broken.errors_total, broken.error_rate) == ("failed", 2, 1.0)
    assert broken.load_failures == 1
    assert snap.http_requests_total == 8 and snap.http_5xx_total == 2

    system = snap.system
    assert system.cpu_count >= 1 and 0 <= system.cpu_percent <= 100
    assert system.memory_total_bytes > system.memory_available_bytes > 0
    assert 0 < system.memory_percent < 100
    assert system.disks and system.disks[0].path == "/" and system.disks[0].total_bytes > 0
    assert system.process_rss_bytes > 10 << 20
    assert system.uptime_s > 0 and snap.process_uptime_s >= 0
    # JSON-ready for MQTT and the hub.
    data = json.loads(json.dumps(snap.to_dict()))
    assert data["models"][GOOD]["requests_total"] == 6
    assert "monotonic" not in data and data["requests_per_s"] == snap.requests_per_s


async def test_periodic_snapshots_reach_listeners_and_metrics(tmp_path: Path) -> None:
    config = make_config(health={"interval": 0.05})
    seen: list[HealthSnapshot] = []
    async with serving(config) as server, aiohttp.ClientSession() as http:
        assert server.health is not None
        remove = server.health.add_listener(seen.append)
        from tests.conftest import wait_for

        await wait_for(lambda: len(seen) >= 3)
        remove()
        async with http.get(base_url(server) + "/metrics") as resp:
            text = await resp.text()
        async with http.get(base_url(server) + "/health") as resp:
            health = await resp.json()
    assert [s.monotonic for s in seen] == sorted(s.monotonic for s in seen)
    assert "appliance_system_memory_percent " in text
    assert "appliance_process_resident_memory_bytes " in text
    assert health["units"]["health"]["interval_s"] == 0.05
    assert health["units"]["health"]["memory_percent"] > 0
    assert "memory_high" in health["units"]["alerts"]["rules"]


async def test_a_failing_model_raises_an_alert_in_metrics_and_health(tmp_path: Path) -> None:
    config = make_config(
        models={"dir": repo_with_broken_model(tmp_path)},
        health={"interval": 0.05},
        alerts={"model_load_failures_threshold": 0},
    )
    async with serving(config) as server, aiohttp.ClientSession() as http:
        from tests.conftest import wait_for

        assert server.alerts is not None
        await wait_for(lambda: bool(server.alerts and server.alerts.active()))
        async with http.get(base_url(server) + "/metrics") as resp:
            text = await resp.text()
        async with http.get(base_url(server) + "/health") as resp:
            health = await resp.json()
    assert (
        'appliance_alert_firing{rule="model_load_failures",severity="warning",subject=""} 1.0'
    ) in text
    assert 'appliance_alerts_fired_total{rule="model_load_failures"} 1.0' in text
    (firing,) = health["units"]["alerts"]["firing"]
    assert firing["rule"] == "model_load_failures" and firing["value"] == 1


def test_sysfs_sensors(tmp_path: Path) -> None:
    """Pi and Jetson sensors from a sysfs tree laid out as those kernels do."""
    sys = tmp_path / "sys"
    zone0 = sys / "class/thermal/thermal_zone0"
    zone0.mkdir(parents=True)
    (zone0 / "type").write_text("cpu-thermal\n")
    (zone0 / "temp").write_text("48312\n")
    (sys / "class/thermal/thermal_zone1").mkdir()  # no readable temp: skipped
    zone2 = sys / "class/thermal/thermal_zone2"
    zone2.mkdir()
    (zone2 / "type").write_text("cpu-thermal\n")  # a duplicate type keeps both
    (zone2 / "temp").write_text("50000\n")
    firmware = sys / "devices/platform/soc/soc:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("0x50005\n")
    (sys / "devices/gpu.0").mkdir(parents=True)
    (sys / "devices/gpu.0/load").write_text("734\n")

    probe = SystemProbe(disk_paths=["/"], sysfs=sys, nvidia_smi=None)
    probe.prime()
    reading = probe.read()
    assert reading.temperatures == {"cpu-thermal": 48.3, "cpu-thermal-2": 50.0}
    assert reading.throttled == 0x50005
    assert [(g.name, g.utilization) for g in reading.gpus] == [("jetson-gpu", 73.4)]


async def test_throttling_flags_are_decoded(tmp_path: Path) -> None:
    firmware = tmp_path / "devices/platform/soc/soc:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("0x50005\n")
    async with serving(make_config(health={"interval": 3600})) as server:
        assert server.core is not None
        collector = HealthCollector(server.core, HealthConfig(), sysfs=tmp_path, nvidia_smi=None)
        snap = await collector.snapshot()
    t = snap.system.throttling
    assert t is not None
    assert (t.under_voltage, t.freq_capped, t.throttled, t.soft_temp_limit) == (
        True,
        False,
        True,
        False,
    )
    assert (t.under_voltage_occurred, t.throttled_occurred, t.freq_capped_occurred) == (
        True,
        True,
        False,
    )
    assert snap.system.temperatures_c == {}  # absent sensors are omitted, not faked
    assert snap.system.max_temperature_c is None and snap.system.gpus == ()


def test_nvidia_smi_output() -> None:
    # Recorded from a real H200 (`--query-gpu=name,utilization.gpu,memory.used,memory.total
    # --format=csv,noheader,nounits`), plus a card that does not report utilisation.
    gpus = parse_nvidia_smi("NVIDIA H200, 0, 0, 143771\nNVIDIA T4, [N/A], 10, 15360\n")
    assert [(g.name, g.utilization, g.memory_used, g.memory_total) for g in gpus] == [
        ("0: NVIDIA H200", 0.0, 0, 143771 * 1024 * 1024)
    ]


def test_bucket_quantile_matches_prometheus() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.1)
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.3)
    assert bucket_quantile(0.95, buckets) == pytest.approx(0.75)
    assert bucket_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert bucket_quantile(0.99, {1.0: 1.0, float("inf"): 10.0}) == 1.0
