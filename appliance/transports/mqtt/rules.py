"""Stream rules: sensor readings on topic filters, windowed per source topic, run through a
model; results and anomaly events published to templated topics.

A reading is a number (``21.5``) or, with ``fields``, a JSON object whose fields (dotted
paths) give one value per channel. Each source topic has its own window; once full, every
``hop`` new readings (every ``window`` readings by default) a snapshot is queued to the
rule's worker, which runs the model off the MQTT loop, one window at a time, in order.
Readings that cannot be parsed are counted and logged once per source, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from paho.mqtt.client import topic_matches_sub

from appliance.config import StreamRule
from appliance.core.service import Core
from appliance.core.types import DATATYPES, ModelState
from appliance.errors import ModelUnavailable, Overloaded, RequestError
from appliance.protocol import strictjson
from appliance.transports.mqtt import envelope, forms
from appliance.transports.mqtt.metrics import MqttMetrics
from appliance.transports.mqtt.outbox import Outgoing, PublishQueue
from appliance.transports.mqtt.topics import Topics

log = logging.getLogger(__name__)

QUEUE_SIZE = 64  # windows waiting for the model, per rule
Row = tuple[float, ...]


class Window:
    """The latest ``size`` readings of one source; due every ``hop`` readings once full."""

    def __init__(self, size: int, hop: int) -> None:
        self.size = size
        self.hop = hop or size
        self._rows: deque[Row] = deque(maxlen=size)
        self._fresh = 0

    def add(self, row: Row) -> list[Row] | None:
        """Add a reading; returns the window to run when one is due."""
        self._rows.append(row)
        self._fresh += 1
        if len(self._rows) == self.size and self._fresh >= self.hop:
            self._fresh = 0
            return list(self._rows)
        return None


def parse_reading(payload: bytes, fields: Sequence[str]) -> Row:
    """One reading as a row of channel values; :class:`ValueError` says what is wrong."""
    if not fields:
        try:
            number = float(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"expected a number, got {_preview(payload)}") from None
        return (_finite(number, "the reading"),)
    try:
        document = strictjson.loads(payload, what="the reading", param=None)
    except RequestError:
        raise ValueError(f"expected a JSON object, got {_preview(payload)}") from None
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got {type(document).__name__}")
    row = []
    for name in fields:
        value: Any = document
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"field {name!r} is missing")
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"field {name!r} is not a number: {value!r:.40}")
        row.append(_finite(float(value), f"field {name!r}"))
    return tuple(row)


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}, not a finite number")
    return value


def _preview(payload: bytes) -> str:
    return repr(payload[:40]) + ("..." if len(payload) > 40 else "")


def render(template: str, source: str, **names: str) -> str:
    """A rule's output topic: ``{0}``, ``{1}`` ... are levels of the source topic."""
    return template.format(*source.split("/"), source=source, **names)


class _Rule:
    def __init__(self, config: StreamRule) -> None:
        self.config = config
        self.windows: OrderedDict[str, Window] = OrderedDict()
        self.queue: asyncio.Queue[tuple[str, list[Row]]] = asyncio.Queue(QUEUE_SIZE)
        self.warned: set[str] = set()  # sources whose bad readings were logged
        self.problems: set[str] = set()  # rule-level problems already logged
        self.worker: asyncio.Task[None] | None = None


class StreamRules:
    """Every configured rule; fed from the MQTT loop, results go to the outbox."""

    def __init__(
        self,
        rules: Sequence[StreamRule],
        core: Core,
        outbox: PublishQueue,
        topics: Topics,
        device_id: str,
        on_alert: Callable[[], None],
        max_payload: int,
    ) -> None:
        self._rules = [_Rule(rule) for rule in rules]
        self._core = core
        self._outbox = outbox
        self._topics = topics
        self._device = device_id
        self._on_alert = on_alert
        self._max_payload = max_payload
        # (rule, source) -> the latest anomalous result; drives the device's alert state.
        self.anomalies: dict[tuple[str, str], dict[str, Any]] = {}

    @property
    def filters(self) -> list[str]:
        return list(dict.fromkeys(rule.config.topic for rule in self._rules))

    def start(self) -> None:
        for rule in self._rules:
            rule.worker = asyncio.create_task(
                self._work(rule), name=f"appliance-mqtt-rule-{rule.config.name}"
            )

    async def close(self) -> None:
        workers = [rule.worker for rule in self._rules if rule.worker is not None]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # -- readings ------------------------------------------------------------------

    def feed(
        self, topic: str, payload: bytes, *, retained: bool, filters: set[str] | None = None
    ) -> bool:
        """Give a message to every rule whose filter matches (and is one of ``filters``, the
        subscriptions this copy was delivered for, when known); ``False`` if none does."""
        matched = False
        metrics = self._core.unit_metrics(MqttMetrics)
        for rule in self._rules:
            config = rule.config
            if filters is not None and config.topic not in filters:
                continue
            if not topic_matches_sub(config.topic, topic):
                continue
            matched = True
            if retained or self._topics.owns(topic):
                continue  # a replayed old reading, or our own output: never windowed
            try:
                if len(payload) > self._max_payload:
                    raise ValueError(f"the reading is {len(payload)} bytes, over the limit")
                row = parse_reading(payload, config.fields)
            except ValueError as exc:
                metrics.mqtt_rule_bad_readings.labels(config.name).inc()
                self._bad_reading(rule, topic, str(exc))
                continue
            metrics.mqtt_rule_readings.labels(config.name).inc()
            window = rule.windows.get(topic)
            if window is None:
                if len(rule.windows) >= config.max_sources:
                    # Forget the source heard from least recently.
                    evicted, _ = rule.windows.popitem(last=False)
                    if self.anomalies.pop((config.name, evicted), None) is not None:
                        self._on_alert()
                window = rule.windows[topic] = Window(config.window, config.hop)
            rule.windows.move_to_end(topic)
            rows = window.add(row)
            if rows is None:
                continue
            try:
                rule.queue.put_nowait((topic, rows))
            except asyncio.QueueFull:
                metrics.mqtt_rule_windows.labels(config.name, "dropped").inc()
                self._problem(
                    rule, "windows arrive faster than the model runs them; dropping windows"
                )
        return matched

    def _bad_reading(self, rule: _Rule, source: str, reason: str) -> None:
        if source in rule.warned:
            return
        if len(rule.warned) >= rule.config.max_sources:
            rule.warned.clear()
        rule.warned.add(source)
        log.warning(
            "stream rule %s: cannot use a reading on %s: %s (further bad readings from "
            "this source are only counted)",
            rule.config.name,
            source,
            reason,
        )

    def _problem(self, rule: _Rule, text: str) -> None:
        if text not in rule.problems and len(rule.problems) < 100:
            rule.problems.add(text)
            log.warning("stream rule %s: %s", rule.config.name, text)

    # -- windows -------------------------------------------------------------------

    async def _work(self, rule: _Rule) -> None:
        while True:
            source, rows = await rule.queue.get()
            await self._run(rule, source, rows)

    async def _run(self, rule: _Rule, source: str, rows: list[Row]) -> None:
        config = rule.config
        metrics = self._core.unit_metrics(MqttMetrics)
        started = time.perf_counter()
        status = "ok"
        try:
            await self._loaded(config.model)
            inputs = self._inputs(config, rows)
            result = await self._core.infer(config.model, inputs)
        except Exception as exc:
            status = str(envelope.error_body(exc)["code"])
            dropped = isinstance(exc, (Overloaded, ModelUnavailable))
            metrics.mqtt_rule_windows.labels(config.name, "dropped" if dropped else "error").inc()
            self._problem(rule, f"model {config.model!r}: {exc}")
            return
        finally:
            self._core.count_request(
                "mqtt", "rule", config.model, status, time.perf_counter() - started
            )
        outputs = {name: forms.plain(value, True) for name, value in result.outputs.items()}
        flag = result.outputs.get(config.anomaly_tensor) if config.anomaly_tensor else None
        anomaly = bool(flag is not None and np.asarray(flag).any())
        document = {
            "rule": config.name,
            "source": source,
            "model": config.model,
            "time": round(time.time(), 3),
            "readings": len(rows),
            "outputs": outputs,
            "anomaly": anomaly,
        }
        metrics.mqtt_rule_windows.labels(config.name, "anomaly" if anomaly else "ok").inc()
        names = {
            "base": self._topics.base,
            "rule": config.name,
            "device_id": self._device,
            "model": config.model,
        }
        try:
            self._publish(render(config.output, source, **names), document)
            if anomaly and config.anomaly_output:
                self._publish(render(config.anomaly_output, source, **names), document)
        except (IndexError, KeyError, ValueError) as exc:
            self._problem(rule, f"cannot build the output topic for {source}: {exc!r}")
        self._alert(config.name, source, document if anomaly else None)

    async def _loaded(self, name: str) -> None:
        """Load the rule's model again when it was unloaded for being idle, as any request
        does (waiting at most ``load_wait``); its signature shapes the window."""
        if self._core.is_pipeline(name):
            return
        if self._core.model(name).state is ModelState.UNLOADED:
            await self._core.load(name)

    def _inputs(self, config: StreamRule, rows: list[Row]) -> dict[str, Any]:
        info = self._core.model(config.model)
        if info.state is not ModelState.READY:
            raise ModelUnavailable(info.name, info.state.value, info.error)
        specs = info.signature.inputs
        if config.input:
            matching = [s for s in specs if s.name == config.input]
            if not matching:
                raise RequestError(
                    f"has no input {config.input!r}; it takes: {', '.join(s.name for s in specs)}"
                )
            spec = matching[0]
        elif len(specs) == 1:
            spec = specs[0]
        else:
            raise RequestError(f"takes {len(specs)} inputs; set the rule's 'input'")
        array = np.asarray(rows, dtype=np.float64)  # (window, channels)
        rank = len(spec.shape)
        if rank == 3:
            array = array[np.newaxis]
        elif rank == 2:
            array = array.reshape(1, -1)
        elif rank == 1:
            array = array.reshape(-1)
        else:
            raise RequestError(f"input {spec.name!r} has rank {rank}; rules feed rank 1 to 3")
        return {spec.name: array.astype(DATATYPES[spec.datatype])}

    def _publish(self, topic: str, document: dict[str, Any]) -> None:
        payload = envelope.encode(document, envelope.Format.JSON)
        self._outbox.put(Outgoing(topic, payload, "result", content_type="application/json"))

    def _alert(self, rule: str, source: str, document: dict[str, Any] | None) -> None:
        key = (rule, source)
        before = key in self.anomalies
        if document is None:
            self.anomalies.pop(key, None)
        else:
            self.anomalies[key] = document
        if before != (document is not None):
            self._on_alert()
