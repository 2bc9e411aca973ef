"""Alert rules: thresholds, windows, for-durations, hysteresis, no-data resolution.

The engine is fed hand-built :class:`HealthSnapshot` values (plain data) on a simulated
clock, so durations such as "GPU > 90 % for 5 minutes" are tested exactly and instantly.
The end-to-end path (a real daemon's alert in /metrics and /health) is in test_health.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from appliance.config import AlertsConfig, HealthConfig
from appliance.core.metrics import Metrics
from appliance.ops.alerts import AlertEngine, AlertEvent
from appliance.ops.snapshot import GpuStats, HealthSnapshot, ModelStats, SystemStats

pytestmark = pytest.mark.timeout(30)


class _Collector:
    """Just what AlertEngine reads from a HealthCollector; snapshots are fed by hand."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.started_monotonic = 0.0


def system(memory: float = 30.0, gpu: float | None = None) -> SystemStats:
    return SystemStats(
        cpu_percent=5.0,
        cpu_count=4,
        load_1m=0.1,
        load_5m=0.1,
        load_15m=0.1,
        memory_total_bytes=8 << 30,
        memory_available_bytes=4 << 30,
        memory_percent=memory,
        swap_total_bytes=0,
        swap_used_bytes=0,
        swap_percent=0.0,
        disks=(),
        net_rx_bytes=0,
        net_tx_bytes=0,
        net_rx_bytes_per_s=0.0,
        net_tx_bytes_per_s=0.0,
        process_rss_bytes=100 << 20,
        process_cpu_percent=1.0,
        uptime_s=1000.0,
        gpus=() if gpu is None else (GpuStats("0: test", gpu),),
    )


def model(requests: int = 0, latency_sum: float = 0.0, failures: int = 0) -> ModelStats:
    return ModelStats(
        name="m",
        state="ready",
        requests_total=requests,
        errors_total=0,
        latency_sum_s=latency_sum,
        latency_count=requests,
        tokens_total=0,
        load_failures=failures,
        queue_depth=0,
        running=0,
        requests_per_s=0.0,
        error_rate=0.0,
        tokens_per_s=0.0,
        latency_avg_ms=None,
        latency_p50_ms=None,
        latency_p95_ms=None,
        latency_p99_ms=None,
    )


def snap(
    t: float,
    *,
    memory: float = 30.0,
    gpu: float | None = None,
    m: ModelStats | None = None,
    http: tuple[int, int] = (0, 0),
) -> HealthSnapshot:
    return HealthSnapshot(
        time=1_000_000 + t,
        monotonic=t,
        interval_s=1.0,
        process_uptime_s=t,
        system=system(memory, gpu),
        models={"m": m or model()},
        http_requests_total=http[0],
        http_5xx_total=http[1],
    )


def engine(metrics: Metrics | None = None, **settings: Any) -> tuple[AlertEngine, list[AlertEvent]]:
    config = AlertsConfig(**settings)
    collector: Any = _Collector(HealthConfig().interval)
    eng = AlertEngine(collector, config, metrics or Metrics())
    events: list[AlertEvent] = []
    eng.add_listener(events.append)
    return eng, events


def test_defaults_come_from_the_design_notes() -> None:
    c = AlertsConfig()
    assert c.latency_high_threshold == 500  # average response time > 500 ms
    assert c.qps_low_threshold == 80  # QPS < 80 % of the target
    assert (c.gpu_busy_threshold, c.gpu_busy_for) == (90, 300)  # > 90 % for 5 minutes
    assert c.memory_high_threshold == 85
    assert c.http_5xx_threshold == 1  # > 1 %
    assert (c.model_load_failures_threshold, c.model_load_failures_window) == (3, 3600)


def test_gpu_busy_fires_only_after_five_minutes() -> None:
    metrics = Metrics()
    eng, events = engine(metrics)
    labels = {"rule": "gpu_busy", "subject": "", "severity": "warning"}
    for t in range(10, 300, 10):
        eng.evaluate(snap(t, gpu=95))
    assert events == []  # pending for 290 s
    eng.evaluate(snap(310, gpu=95))
    (fired,) = events
    assert (fired.rule, fired.state, fired.severity) == ("gpu_busy", "firing", "warning")
    assert fired.value == 95 and fired.threshold == 90
    assert metrics.registry.get_sample_value("appliance_alert_firing", labels) == 1
    # A dip under the threshold resets "pending" before firing; after firing, hysteresis.
    eng.evaluate(snap(320, gpu=85))  # below 90 but not 10 % below: still firing
    assert len(events) == 1
    eng.evaluate(snap(330, gpu=80))  # <= 81: resolved
    assert [e.state for e in events] == ["firing", "resolved"]
    assert events[1].started_at == fired.started_at
    assert metrics.registry.get_sample_value("appliance_alert_firing", labels) == 0
    assert (
        metrics.registry.get_sample_value("appliance_alerts_fired_total", {"rule": "gpu_busy"}) == 1
    )


def test_pending_resets_when_the_condition_breaks() -> None:
    eng, events = engine()
    for t in range(0, 200, 10):
        eng.evaluate(snap(t, gpu=95))
    eng.evaluate(snap(200, gpu=50))
    for t in range(210, 480, 10):
        eng.evaluate(snap(t, gpu=95))
    assert events == []  # 270 s since the break
    eng.evaluate(snap(520, gpu=95))
    assert [e.rule for e in events] == ["gpu_busy"]


def test_memory_hysteresis_prevents_flapping() -> None:
    eng, events = engine()
    for t, value in enumerate([80, 86, 84, 86, 80, 78, 86]):
        eng.evaluate(snap(t, memory=value))
    # fires at 86, stays through 84/86/80 (not <= 76.5), resolves at... never: 78 > 76.5
    assert [e.state for e in events] == ["firing"]
    eng.evaluate(snap(10, memory=76))
    assert [e.state for e in events] == ["firing", "resolved"]
    assert events[0].severity == "critical" and "memory use 86%" in events[0].message


def test_latency_is_averaged_over_the_window_per_model() -> None:
    eng, events = engine(latency_high_window=60, min_requests=5)
    eng.evaluate(snap(0, m=model(requests=0)))
    eng.evaluate(snap(10, m=model(requests=4, latency_sum=4.0)))  # 1 s average, 4 requests
    assert events == []  # fewer than min_requests: no judgement
    eng.evaluate(snap(20, m=model(requests=10, latency_sum=7.0)))  # 700 ms over 10
    (fired,) = events
    assert (fired.rule, fired.subject) == ("latency_high", "m")
    assert fired.value == pytest.approx(700)
    assert "model m: average response time 700ms > 500ms" in fired.message
    # 70 s later the window holds only fast requests: 100 fast ones at 10 ms.
    eng.evaluate(snap(90, m=model(requests=110, latency_sum=8.0)))
    assert [e.state for e in events] == ["firing", "resolved"]


def test_no_data_resolves_a_firing_alert() -> None:
    eng, events = engine(latency_high_window=10, min_requests=1)
    eng.evaluate(snap(0))
    eng.evaluate(snap(5, m=model(requests=2, latency_sum=2.0)))
    eng.evaluate(snap(30, m=model(requests=2, latency_sum=2.0)))  # no traffic in the window
    assert [(e.state, e.value) for e in events] == [("firing", 1000.0), ("resolved", None)]
    assert "no data" in events[1].message


def test_http_5xx_share() -> None:
    eng, events = engine(http_5xx_window=60, min_requests=10)
    eng.evaluate(snap(0, http=(0, 0)))
    eng.evaluate(snap(10, http=(200, 2)))  # exactly 1 %: not above
    assert events == []
    eng.evaluate(snap(20, http=(300, 5)))  # 5 of 300
    assert [e.rule for e in events] == ["http_5xx"]
    assert events[0].value == pytest.approx(5 / 300 * 100, abs=1e-3)


def test_model_load_failures_per_hour_count_from_start() -> None:
    eng, events = engine()
    eng.evaluate(snap(60, m=model(failures=3)))
    assert events == []  # 3 is not more than 3
    eng.evaluate(snap(120, m=model(failures=4)))
    assert [e.rule for e in events] == ["model_load_failures"]
    # An hour later no new failures: the count in the window is 0.
    eng.evaluate(snap(120 + 3600, m=model(failures=4)))
    assert [e.state for e in events] == ["firing", "resolved"]


def test_qps_low_needs_a_target_and_a_whole_window() -> None:
    eng, events = engine()
    assert "qps_low" not in [r.name for r in eng.rules]  # no target configured
    eng, events = engine(qps_target=10, qps_low_window=60)
    eng.evaluate(snap(30, m=model(requests=0)))
    assert events == []  # the daemon is younger than the window
    eng.evaluate(snap(60, m=model(requests=300)))  # 5 req/s < 8
    assert [(e.rule, e.value) for e in events] == [("qps_low", 5.0)]
    eng.evaluate(snap(120, m=model(requests=300 + 60 * 9)))  # 9 req/s >= 8.8
    assert [e.state for e in events] == ["firing", "resolved"]


def test_disabled_rules_and_engine() -> None:
    eng, _ = engine(disabled=["gpu_busy", "memory_high"])
    assert {r.name for r in eng.rules} == {"latency_high", "http_5xx", "model_load_failures"}
    eng, _ = engine(enabled=False)
    assert eng.rules == []


def test_active_lists_firing_alerts() -> None:
    eng, _ = engine(memory_high_for=0)
    eng.evaluate(snap(0, memory=90))
    (active,) = eng.active()
    assert (active.rule, active.state, active.value) == ("memory_high", "firing", 90)
