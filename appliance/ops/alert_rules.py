"""Alert rules: what each one measures, over which window, against which threshold.

A :class:`Rule` names a value measured per subject (the device, or one model) from the
:class:`History` of health snapshots; :func:`build_rules` turns the ``[alerts]``
configuration into the rules it enables. The state machine that moves a rule through
pending → firing → resolved is :mod:`appliance.ops.alerts`.

Counters reset when the daemon restarts; windows that reach back before the start count
from zero at the start, so "model loads failed in the last hour" includes the failures of
this start-up.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from appliance.config import AlertsConfig
from appliance.ops.snapshot import HealthSnapshot

Measure = Callable[["History", float], dict[str, float]]


@dataclass(frozen=True)
class Rule:
    """One rule: fires when the measured value is above (or below) the threshold."""

    name: str
    severity: str
    above: bool
    threshold: float
    window: float
    for_s: float
    measure: Measure
    unit: str
    what: str

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold

    def cleared(self, value: float, hysteresis: float) -> bool:
        margin = abs(self.threshold) * hysteresis / 100
        if self.above:
            return value <= self.threshold - margin
        return value >= self.threshold + margin


class History:
    """Recent snapshots, enough to cover the longest window."""

    def __init__(self, origin: float, keep: float) -> None:
        self.origin = origin  # monotonic time the counters started from zero
        self._keep = keep
        self._items: collections.deque[HealthSnapshot] = collections.deque()

    def keep(self, seconds: float) -> None:
        """Cover ``seconds`` from now on (new rules with longer windows)."""
        self._keep = seconds

    def add(self, snap: HealthSnapshot) -> None:
        self._items.append(snap)
        cutoff = snap.monotonic - self._keep
        # Keep one snapshot at or before the cutoff: it is the baseline of the longest window.
        while len(self._items) > 2 and self._items[1].monotonic <= cutoff:
            self._items.popleft()

    @property
    def latest(self) -> HealthSnapshot:
        return self._items[-1]

    def baseline(self, window: float) -> HealthSnapshot | None:
        """The newest snapshot at least ``window`` seconds old (window 0: the previous one);
        ``None`` when the daemon is younger than the window (count from zero at start)."""
        latest = self._items[-1]
        if window <= 0:
            return self._items[-2] if len(self._items) > 1 else None
        cutoff = latest.monotonic - window
        found = None
        for snap in self._items:
            if snap.monotonic <= cutoff:
                found = snap
            else:
                break
        return found

    def covers(self, window: float) -> bool:
        return self.latest.monotonic - self.origin >= window

    def within(self, window: float) -> list[HealthSnapshot]:
        """Snapshots taken in the last ``window`` seconds (0: just the latest)."""
        latest = self._items[-1]
        if window <= 0:
            return [latest]
        return [s for s in self._items if s.monotonic >= latest.monotonic - window]


# ------------------------------------------------------------------------- measures


def _latency(min_requests: int) -> Measure:
    def measure(history: History, window: float) -> dict[str, float]:
        latest, base = history.latest, history.baseline(window)
        out = {}
        for name, model in latest.models.items():
            before = base.models.get(name) if base is not None else None
            count = model.latency_count - (before.latency_count if before else 0)
            total = model.latency_sum_s - (before.latency_sum_s if before else 0.0)
            if count >= min_requests:
                out[name] = total / count * 1000
        return out

    return measure


def _qps(history: History, window: float) -> dict[str, float]:
    if not history.covers(window):
        return {}  # a young daemon has not seen a whole window of traffic yet
    latest, base = history.latest, history.baseline(window)
    start = base.monotonic if base is not None else history.origin
    elapsed = latest.monotonic - start
    if elapsed <= 0:
        return {}
    before = base.requests_total if base is not None else 0
    return {"": (latest.requests_total - before) / elapsed}


def _gauge(read: Callable[[HealthSnapshot], float | None]) -> Measure:
    def measure(history: History, window: float) -> dict[str, float]:
        values = [v for v in (read(s) for s in history.within(window)) if v is not None]
        return {"": sum(values) / len(values)} if values else {}

    return measure


def _http_5xx(min_requests: int) -> Measure:
    def measure(history: History, window: float) -> dict[str, float]:
        latest, base = history.latest, history.baseline(window)
        total = latest.http_requests_total - (base.http_requests_total if base else 0)
        errors = latest.http_5xx_total - (base.http_5xx_total if base else 0)
        return {"": errors / total * 100} if total >= min_requests else {}

    return measure


def _load_failures(history: History, window: float) -> dict[str, float]:
    latest, base = history.latest, history.baseline(window)

    def failures(snap: HealthSnapshot | None) -> int:
        return sum(m.load_failures for m in snap.models.values()) if snap else 0

    return {"": float(failures(latest) - failures(base))}


def build_rules(config: AlertsConfig) -> list[Rule]:
    """The rules the configuration enables."""
    c = config
    rules = [
        Rule(
            "latency_high",
            "warning",
            True,
            c.latency_high_threshold,
            c.latency_high_window,
            c.latency_high_for,
            _latency(c.min_requests),
            "ms",
            "average response time",
        ),
        Rule(
            "gpu_busy",
            "warning",
            True,
            c.gpu_busy_threshold,
            c.gpu_busy_window,
            c.gpu_busy_for,
            _gauge(lambda s: s.system.max_gpu_percent),
            "%",
            "GPU utilisation",
        ),
        Rule(
            "memory_high",
            "critical",
            True,
            c.memory_high_threshold,
            c.memory_high_window,
            c.memory_high_for,
            _gauge(lambda s: s.system.memory_percent),
            "%",
            "memory use",
        ),
        Rule(
            "http_5xx",
            "critical",
            True,
            c.http_5xx_threshold,
            c.http_5xx_window,
            c.http_5xx_for,
            _http_5xx(c.min_requests),
            "%",
            "HTTP 5xx share",
        ),
        Rule(
            "model_load_failures",
            "warning",
            True,
            c.model_load_failures_threshold,
            c.model_load_failures_window,
            c.model_load_failures_for,
            _load_failures,
            "",
            "failed model loads",
        ),
    ]
    if c.qps_target > 0:
        rules.append(
            Rule(
                "qps_low",
                "warning",
                False,
                c.qps_target * c.qps_low_threshold / 100,
                c.qps_low_window,
                c.qps_low_for,
                _qps,
                "req/s",
                "request rate",
            )
        )
    return [r for r in rules if r.name not in c.disabled]


__all__ = ["History", "Measure", "Rule", "build_rules"]
