"""Alert rules evaluated on the device, on every health snapshot.

Each rule measures one value per subject (the device, or one model) over a window, compares
it with a threshold, and moves through the states Prometheus uses: inactive → pending (the
condition holds, but not yet for ``<rule>_for`` seconds) → firing → resolved. A firing alert
resolves only once its value is ``hysteresis`` percent back inside the threshold, or when
there is no data any more (no traffic, the sensor vanished), so a value hovering at the
threshold does not flap.

Firing and resolved transitions become :class:`AlertEvent` values handed to listeners (the
hub uploader, MQTT) and are exported in ``/metrics`` as ``appliance_alert_firing``.

Counters reset when the daemon restarts; windows that reach back before the start count
from zero at the start, so "model loads failed in the last hour" includes the failures of
this start-up.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal

from appliance.config import AlertsConfig
from appliance.core.canary import CanaryDecision
from appliance.core.metrics import Metrics
from appliance.ops.health import HealthCollector, HealthSnapshot
from appliance.ops.metrics import AlertMetrics

log = logging.getLogger(__name__)

AlertListener = Callable[["AlertEvent"], None]
Measure = Callable[["History", float], dict[str, float]]


@dataclass(frozen=True)
class AlertEvent:
    """An alert that started firing or resolved."""

    rule: str
    subject: str  # "" for the whole device, else a model name
    state: Literal["firing", "resolved"]
    severity: str  # "warning" | "critical"
    value: float | None  # None: resolved for lack of data
    threshold: float
    message: str
    started_at: float  # Unix time it started firing
    at: float  # Unix time of this event

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


# --------------------------------------------------------------------------- engine


@dataclass
class _State:
    pending_since: float | None = None
    firing: bool = False
    started_at: float = 0.0
    value: float | None = None


class AlertEngine:
    """Lifecycle unit: evaluates the rules on every snapshot of a :class:`HealthCollector`."""

    def __init__(self, collector: HealthCollector, config: AlertsConfig, metrics: Metrics) -> None:
        self._collector = collector
        self._config = config
        self._metrics = metrics.unit(AlertMetrics)
        self.rules = build_rules(config) if config.enabled else []
        keep = max([r.window for r in self.rules] + [0.0]) + collector.interval
        self._history = History(collector.started_monotonic, keep)
        self._states: dict[tuple[str, str], _State] = {}
        self._listeners: list[AlertListener] = []
        self._unsubscribe: Callable[[], None] = lambda: None
        self._remove_status: Callable[[], None] = lambda: None
        self.recent: collections.deque[AlertEvent] = collections.deque(maxlen=50)
        self._external: dict[tuple[str, str], float] = {}  # canary alerts: started at

    def add_listener(self, listener: AlertListener) -> Callable[[], None]:
        """Call ``listener(event)`` on the loop for every firing/resolved event."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def active(self) -> list[AlertEvent]:
        """Alerts firing now, as their firing events (value updated to the latest)."""
        out = []
        rules = {r.name: r for r in self.rules}
        for (rule_name, subject), state in self._states.items():
            if state.firing:
                rule = rules[rule_name]
                out.append(self._event(rule, subject, "firing", state.value, state.started_at))
        return out

    async def __aenter__(self) -> AlertEngine:
        if self.rules:
            self._unsubscribe = self._collector.add_listener(self._on_snapshot)
        self._remove_status = self._collector_core_status()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._unsubscribe()
        self._remove_status()

    def _collector_core_status(self) -> Callable[[], None]:
        core = self._collector.core
        return core.add_status(
            "alerts",
            lambda: {
                "rules": [r.name for r in self.rules],
                "firing": [
                    {
                        "rule": e.rule,
                        "subject": e.subject,
                        "severity": e.severity,
                        "value": e.value,
                        "message": e.message,
                    }
                    for e in self.active()
                ],
            },
        )

    def _on_snapshot(self, snap: HealthSnapshot) -> None:
        self.evaluate(snap)

    def evaluate(self, snap: HealthSnapshot) -> list[AlertEvent]:
        """Add ``snap`` to the history and judge every rule; returns the transitions."""
        self._history.add(snap)
        events: list[AlertEvent] = []
        for rule in self.rules:
            values = rule.measure(self._history, rule.window)
            subjects = set(values) | {s for (r, s) in self._states if r == rule.name}
            for subject in sorted(subjects):
                event = self._step(rule, subject, values.get(subject), snap)
                if event is not None:
                    events.append(event)
        for event in events:
            self._publish(event)
        return events

    def _step(
        self, rule: Rule, subject: str, value: float | None, snap: HealthSnapshot
    ) -> AlertEvent | None:
        key = (rule.name, subject)
        state = self._states.setdefault(key, _State())
        state.value = value
        now = snap.monotonic
        if not state.firing:
            if value is None or not rule.breached(value):
                state.pending_since = None
                if value is None:
                    del self._states[key]
                return None
            if state.pending_since is None:
                state.pending_since = now
            if now - state.pending_since < rule.for_s:
                return None
            state.firing = True
            state.started_at = snap.time
            return self._event(rule, subject, "firing", value, snap.time, at=snap.time)
        if value is not None and not rule.cleared(value, self._config.hysteresis):
            return None
        event = self._event(rule, subject, "resolved", value, state.started_at, at=snap.time)
        del self._states[key]
        return event

    def _event(
        self,
        rule: Rule,
        subject: str,
        state: Literal["firing", "resolved"],
        value: float | None,
        started_at: float,
        *,
        at: float | None = None,
    ) -> AlertEvent:
        who = f"model {subject}: " if subject else ""
        op = ">" if rule.above else "<"
        shown = "no data" if value is None else f"{value:.4g}{rule.unit}"
        if state == "firing":
            message = f"{who}{rule.what} {shown} {op} {rule.threshold:.4g}{rule.unit}"
            if rule.window > 0:
                message += f" over {rule.window:g}s"
        else:
            message = f"{who}{rule.what} back to {shown}"
        return AlertEvent(
            rule=rule.name,
            subject=subject,
            state=state,
            severity=rule.severity,
            value=None if value is None else round(value, 4),
            threshold=round(rule.threshold, 4),
            message=message,
            started_at=started_at,
            at=time.time() if at is None else at,
        )

    def canary_decision(self, decision: CanaryDecision) -> None:
        """A canary rollback is an alert of its own (``canary_rollback``, per model); a
        promotion resolves it. Both travel to listeners (the hub) like rule events."""
        key = ("canary_rollback", decision.model)
        now = time.time()
        if decision.decision == "rolled_back":
            message = (
                f"model {decision.model}: canary version {decision.canary} rolled back "
                f"to {decision.stable}: {decision.reason}"
            )
            self._external[key] = now
            self._publish(
                AlertEvent(
                    "canary_rollback",
                    decision.model,
                    "firing",
                    "warning",
                    1.0,
                    0.0,
                    message,
                    now,
                    now,
                )
            )
        elif key in self._external:
            started = self._external.pop(key)
            message = (
                f"model {decision.model}: canary version {decision.canary} promoted: "
                f"{decision.reason}"
            )
            self._publish(
                AlertEvent(
                    "canary_rollback",
                    decision.model,
                    "resolved",
                    "warning",
                    0.0,
                    0.0,
                    message,
                    started,
                    now,
                )
            )

    def _publish(self, event: AlertEvent) -> None:
        gauge = self._metrics.alert_firing.labels(event.rule, event.subject, event.severity)
        if event.state == "firing":
            gauge.set(1)
            self._metrics.alerts_fired.labels(event.rule).inc()
            log.warning("alert %s firing: %s", event.rule, event.message)
        else:
            gauge.set(0)
            log.info("alert %s resolved: %s", event.rule, event.message)
        self.recent.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("alert listener failed")


__all__ = ["AlertEngine", "AlertEvent", "History", "Rule", "build_rules"]
