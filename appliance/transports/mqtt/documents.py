"""The retained state documents: ``<base>/info``, ``<base>/stats`` and ``<base>/alert``.

Statistics come from the core and, when the health unit runs, its latest snapshot (system
sensors and per-model request rates measured from the daemon's metrics); this module reads
no sensor itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from appliance import __version__
from appliance.core.service import Core
from appliance.core.types import ModelState
from appliance.ops.metrics import AlertMetrics
from appliance.transports.mqtt.topics import Topics

# The latest health snapshot as a JSON-ready dict (HealthSnapshot.to_dict()), or None.
HealthSource = Callable[[], Mapping[str, Any] | None]

_MODEL_STATS = (
    "requests_total",
    "errors_total",
    "requests_per_s",
    "latency_avg_ms",
    "latency_p95_ms",
    "queue_depth",
    "running",
    "tokens_per_s",
)
_SYSTEM_STATS = (
    "cpu_percent",
    "memory_percent",
    "max_temperature_c",
    "max_gpu_percent",
    "process_rss_bytes",
    "swap_percent",
)


def status(core: Core) -> str:
    """The same word ``/health`` says: loading, unavailable, degraded or ok."""
    if core.loading:
        return "loading"
    if not core.ready:
        return "unavailable"
    if any(m.state is ModelState.FAILED for m in core.list_models()):
        return "degraded"
    return "ok"


def info_document(
    core: Core,
    *,
    device_id: str,
    device_name: str,
    http_url: str,
    topics: Topics,
    protocol: str,
) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for m in core.list_models():
        entry: dict[str, Any] = {
            "state": m.state.value,
            "runtime": m.runtime,
            "version": m.version,
            "capabilities": sorted(c.value for c in m.capabilities),
        }
        if m.error:
            entry["error"] = m.error
        models[m.name] = entry
    return {
        "device": {"id": device_id, "name": device_name},
        "version": __version__,
        "status": status(core),
        "http_url": http_url,
        "protocol": protocol,
        "models": models,
        "topics": {
            "availability": topics.availability,
            "stats": topics.stats,
            "alert": topics.alert,
            "requests": topics.request_topic("<model>"),
            "results": topics.result("<model>"),
            "errors": topics.error,
            "fleet": f"{topics.fleet}/infer/<model>" if topics.shared_group else None,
        },
        "time": round(time.time(), 3),
    }


def stats_document(
    core: Core, health: Mapping[str, Any] | None, mqtt: Mapping[str, Any]
) -> dict[str, Any]:
    snapshot_models: Mapping[str, Any] = (health or {}).get("models") or {}
    models: dict[str, Any] = {}
    for m in core.list_models():
        entry: dict[str, Any] = {"state": m.state.value}
        measured = snapshot_models.get(m.name) or {}
        entry.update({k: measured.get(k) for k in _MODEL_STATS})
        models[m.name] = entry
    system: Mapping[str, Any] = (health or {}).get("system") or {}
    return {
        "time": round(time.time(), 3),
        "status": status(core),
        "uptime_s": round(time.time() - core.started, 1),
        "requests_total": sum(int(m.get("requests_total") or 0) for m in models.values()),
        "latency_ms": _mean_latency(models.values()),
        "models": models,
        "system": {k: system.get(k) for k in _SYSTEM_STATS},
        "mqtt": dict(mqtt),
    }


def _mean_latency(models: Iterable[Mapping[str, Any]]) -> float | None:
    """Average response time over the last health interval, weighted by request rate."""
    total = weight = 0.0
    for m in models:
        avg, rate = m.get("latency_avg_ms"), m.get("requests_per_s") or 0.0
        if avg is not None and rate > 0:
            total += avg * rate
            weight += rate
    return round(total / weight, 3) if weight else None


def alert_document(
    anomalies: Mapping[tuple[str, str], Mapping[str, Any]], health_alerts: Iterable[str]
) -> dict[str, Any]:
    """``ON`` while a stream rule's latest window of some source is anomalous or a health
    alert fires."""
    sources = [
        {"rule": rule, "source": source, "outputs": doc.get("outputs"), "time": doc.get("time")}
        for (rule, source), doc in sorted(anomalies.items())
    ]
    firing = sorted(set(health_alerts))
    return {
        "state": "ON" if sources or firing else "OFF",
        "anomalies": sources[:50],
        "health_alerts": firing,
        "time": round(time.time(), 3),
    }


def firing_alerts(core: Core) -> list[str]:
    """Health alerts firing now, read from ``appliance_alert_firing`` (set by the alerts
    unit when it runs)."""
    return [
        rule + (f":{subject}" if subject else "")
        for rule, subject in core.unit_metrics(AlertMetrics).firing()
    ]
