"""The box's recent past, kept in memory for its own device page (``GET /device``).

:class:`Recent` listens to the health snapshots and keeps one chart point per snapshot for
the last hour (at most :data:`MAX_POINTS`), like the hub's heartbeats of one device; and
it reads the alert engine for the alerts firing now and the latest transitions. It is
created with the HTTP application, which binds before the health units start, and
attached to them once they run; until then (or with health off) it has no points.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.ops.alerts import AlertEngine
    from appliance.ops.health import HealthCollector
    from appliance.ops.snapshot import HealthSnapshot

WINDOW_S = 3600.0
MAX_POINTS = 720


@dataclass(frozen=True)
class Point:
    """The chartable numbers of one snapshot (the hub's heartbeat points, the same names)."""

    time: float
    cpu: float
    memory: float
    temperature: float | None
    gpu: float | None
    latency_ms: float | None  # request-weighted over the models; None: no request
    rps: float
    tokens_s: float  # generated tokens per second, over every model


class Recent:
    """Chart points of the last hour and the alert engine's view, JSON-ready."""

    def __init__(self) -> None:
        self._points: collections.deque[Point] = collections.deque(maxlen=MAX_POINTS)
        self._alerts: AlertEngine | None = None
        self._interval = 0.0
        self._detach: Callable[[], None] = lambda: None

    def attach(self, health: HealthCollector, alerts: AlertEngine | None) -> None:
        """Follow ``health``'s snapshots and ``alerts``; replaces an earlier attachment."""
        self._detach()
        self._interval = health.interval
        keep = max(1, min(MAX_POINTS, math.ceil(WINDOW_S / max(health.interval, 0.001))))
        self._points = collections.deque(self._points, maxlen=keep)
        self._detach = health.add_listener(self.add)
        self._alerts = alerts

    def add(self, snap: HealthSnapshot) -> None:
        weighted = weight = tokens = 0.0
        for stats in snap.models.values():
            tokens += stats.tokens_per_s
            if stats.requests_per_s and stats.latency_avg_ms is not None:
                weighted += stats.requests_per_s * stats.latency_avg_ms
                weight += stats.requests_per_s
        system = snap.system
        self._points.append(
            Point(
                time=snap.time,
                cpu=system.cpu_percent,
                memory=system.memory_percent,
                temperature=system.max_temperature_c,
                gpu=system.max_gpu_percent,
                latency_ms=round(weighted / weight, 3) if weight else None,
                rps=round(snap.requests_per_s, 4),
                tokens_s=round(tokens, 3),
            )
        )

    def history(self) -> dict[str, Any]:
        return {"interval_s": self._interval, "points": [asdict(p) for p in self._points]}

    def alerts(self) -> dict[str, Any]:
        engine = self._alerts
        if engine is None:
            return {"firing": [], "recent": []}
        return {
            "firing": [e.to_dict() for e in engine.active()],
            "recent": [e.to_dict() for e in reversed(engine.recent)],
        }


__all__ = ["MAX_POINTS", "WINDOW_S", "Point", "Recent"]
