"""Alert rules evaluated on the device, on every health snapshot.

Each rule measures one value per subject (the device, or one model) over a window, compares
it with a threshold, and moves through the states Prometheus uses: inactive → pending (the
condition holds, but not yet for ``<rule>_for`` seconds) → firing → resolved. A firing alert
resolves only once its value is ``hysteresis`` percent back inside the threshold, or when
there is no data any more (no traffic, the sensor vanished), so a value hovering at the
threshold does not flap.

Firing and resolved transitions become :class:`AlertEvent` values handed to listeners (the
hub uploader, MQTT) and are exported in ``/metrics`` as ``appliance_alert_firing``. The
rules themselves and what they measure are :mod:`appliance.ops.alert_rules`.
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
from appliance.ops.alert_rules import History, Rule, build_rules
from appliance.ops.health import HealthCollector
from appliance.ops.metrics import AlertMetrics
from appliance.ops.snapshot import HealthSnapshot

log = logging.getLogger(__name__)

AlertListener = Callable[["AlertEvent"], None]


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

    def reconfigure(self, config: AlertsConfig) -> None:
        """New rules and thresholds (a reload); alerts of rules no longer there resolve."""
        rules = build_rules(config) if config.enabled else []
        names = {r.name for r in rules}
        old = {r.name: r for r in self.rules}
        for (name, subject), state in list(self._states.items()):
            if name in names:
                continue
            del self._states[(name, subject)]
            if state.firing:
                now = time.time()
                rule = old[name]
                self._publish(
                    self._event(rule, subject, "resolved", None, state.started_at, at=now)
                )
        self._config, self.rules = config, rules
        self._history.keep(max([r.window for r in rules] + [0.0]) + self._collector.interval)

    async def __aenter__(self) -> AlertEngine:
        # Subscribed with no rules too: a reload may bring some.
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


__all__ = ["AlertEngine", "AlertEvent"]
