"""Prometheus metrics, in a registry owned by one daemon (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

# Latency buckets from 5 ms to 2 min: ONNX sensor models answer in milliseconds, language
# models on a Pi take tens of seconds.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

M = TypeVar("M", bound=MetricWrapperBase)


class Queue(Protocol):
    """What the queue gauges read (``appliance.core.admission.Admission``)."""

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...


class Children(Generic[M]):
    """The labelled children of one metric, each looked up once.

    prometheus-client's ``labels()`` checks and converts the values and takes a lock on
    every call, which showed in profiles of the request path; hot paths keep the children
    here instead. The label sets stay as bounded as the callers keep them (routes,
    configured models, statuses): prometheus-client keeps every child anyway.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """Every metric the daemon exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "Requests handled, by transport route, model and status.",
            ["transport", "route", "model", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "appliance_request_duration_seconds",
            "Time from request received to response finished.",
            ["transport", "route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "appliance_inference_duration_seconds",
            "Time a model spent on one request, queue wait excluded.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from admission to the first generated token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth", "Requests waiting for a model.", ["model"], registry=r
        )
        self.running = Gauge(
            "appliance_requests_running", "Requests a model is working on.", ["model"], registry=r
        )
        self.rejected = Counter(
            "appliance_requests_rejected",
            "Requests refused because a model's queue was full.",
            ["model"],
            registry=r,
        )
        self.tokens_generated = Counter(
            "appliance_tokens_generated", "Tokens generated.", ["model"], registry=r
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.model_load_failures = Counter(
            "appliance_model_load_failures", "Model loads that failed.", ["model"], registry=r
        )
        self.model_ready = Gauge(
            "appliance_model_ready", "1 when a model is loaded and serving.", ["model"], registry=r
        )
        self.model_load_seconds = Gauge(
            "appliance_model_load_seconds", "How long the last load of a model took.", ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "appliance_cache_hits", "Requests answered from the result cache.", ["model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "appliance_cache_misses",
            "Requests to cached models that had to run the model.",
            ["model"],
            registry=r,
        )
        # What every request updates, by label values (see Children).
        self._request_counts = Children(self.requests)
        self._request_seconds = Children(self.request_latency)
        self.inference_seconds = Children(self.inference_latency)
        self._lifecycle_metrics(r)
        self._health_metrics(r)
        self._mqtt_metrics(r)

    def _lifecycle_metrics(self, r: CollectorRegistry) -> None:
        """Model lifecycle: evictions, canary releases (``appliance.core.canary``)."""
        self.model_evictions = Counter(
            "appliance_model_unloads",
            "Models unloaded to save memory, by reason (idle: keep-alive over; lru: evicted "
            "to make room).",
            ["model", "reason"],
            registry=r,
        )
        self.canary_active = Gauge(
            "appliance_canary_active", "1 while a canary version of a model runs.",
            ["model", "version"], registry=r,
        )
        self.canary_requests = Counter(
            "appliance_canary_requests",
            "Requests measured during a canary, by version, side (stable, canary) and result.",
            ["model", "version", "side", "result"],
            registry=r,
        )
        self.canary_decisions = Counter(
            "appliance_canary_decisions", "Canary outcomes (promoted, rolled_back).",
            ["model", "decision"], registry=r,
        )

    def _health_metrics(self, r: CollectorRegistry) -> None:
        """Box health, alerts and the hub outbox (set by the ``appliance.ops`` units)."""
        self.system_cpu_percent = Gauge(
            "appliance_system_cpu_percent", "Whole-machine CPU use.", registry=r
        )
        self.system_memory_percent = Gauge(
            "appliance_system_memory_percent", "Whole-machine memory use.", registry=r
        )
        self.temperature = Gauge(
            "appliance_temperature_celsius", "Temperature by sensor (thermal zone).", ["sensor"],
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "appliance_gpu_utilization_percent", "GPU utilisation.", ["gpu"], registry=r
        )
        self.process_rss = Gauge(
            "appliance_process_resident_memory_bytes", "The daemon's resident memory.", registry=r
        )
        self.alert_firing = Gauge(
            "appliance_alert_firing",
            "1 while an alert fires, 0 once resolved; by rule and subject (model, or '' for "
            "the device).",
            ["rule", "subject", "severity"],
            registry=r,
        )
        self.alerts_fired = Counter(
            "appliance_alerts_fired", "Times an alert started firing.", ["rule"], registry=r
        )
        self.outbox_records = Gauge(
            "appliance_outbox_records", "Records waiting in the hub outbox.", registry=r
        )
        self.outbox_bytes = Gauge(
            "appliance_outbox_bytes", "Payload bytes waiting in the hub outbox.", registry=r
        )
        self.outbox_appended = Counter(
            "appliance_outbox_appended", "Records durably appended to the outbox.", ["kind"],
            registry=r,
        )
        self.outbox_dropped = Counter(
            "appliance_outbox_dropped",
            "Records dropped unsent, by reason (size: over a bound; age: too old).",
            ["reason"],
            registry=r,
        )
        self.outbox_corrupt = Counter(
            "appliance_outbox_corrupt", "Corrupt outbox databases moved aside.", registry=r
        )
        self.hub_uploads = Counter(
            "appliance_hub_uploads", "Upload attempts to the hub, by result.", ["result"],
            registry=r,
        )
        self.hub_last_upload = Gauge(
            "appliance_hub_last_upload_timestamp_seconds",
            "Unix time of the last upload the hub acknowledged.",
            registry=r,
        )

    def _mqtt_metrics(self, r: CollectorRegistry) -> None:
        """The MQTT transport (``appliance.transports.mqtt``); its requests are also counted
        in ``appliance_requests`` with ``transport="mqtt"``."""
        self.mqtt_connected = Gauge(
            "appliance_mqtt_connected", "1 while connected to the MQTT broker.", registry=r
        )
        self.mqtt_connects = Counter(
            "appliance_mqtt_connects", "Successful connections to the broker.", registry=r
        )
        self.mqtt_connect_failures = Counter(
            "appliance_mqtt_connect_failures",
            "Connection attempts that failed or connections that broke.",
            registry=r,
        )
        self.mqtt_received = Counter(
            "appliance_mqtt_messages_received",
            "Messages received, by kind (request, reading, control).",
            ["kind"],
            registry=r,
        )
        self.mqtt_published = Counter(
            "appliance_mqtt_messages_published",
            "Messages the broker acknowledged, by kind (reply, chunk, result, state).",
            ["kind"],
            registry=r,
        )
        self.mqtt_outbox = Gauge(
            "appliance_mqtt_outbox_messages",
            "Messages waiting to be published (they queue while the broker is away).",
            registry=r,
        )
        self.mqtt_dropped = Counter(
            "appliance_mqtt_messages_dropped",
            "Messages dropped unsent because the outbox was full.",
            ["kind"],
            registry=r,
        )
        self.mqtt_duplicates = Counter(
            "appliance_mqtt_duplicate_requests",
            "Redelivered requests answered from the reply cache instead of run again.",
            registry=r,
        )
        self.mqtt_rejected = Counter(
            "appliance_mqtt_rejected_messages",
            "Messages refused before reaching the core, by reason (too_large, retained, "
            "topic, format).",
            ["reason"],
            registry=r,
        )
        self.mqtt_rule_readings = Counter(
            "appliance_mqtt_rule_readings", "Readings a stream rule accepted.", ["rule"],
            registry=r,
        )
        self.mqtt_rule_bad_readings = Counter(
            "appliance_mqtt_rule_bad_readings",
            "Readings a stream rule could not parse (logged once per source).",
            ["rule"],
            registry=r,
        )
        self.mqtt_rule_windows = Counter(
            "appliance_mqtt_rule_windows",
            "Windows a stream rule handled, by result (ok, anomaly, error, dropped).",
            ["rule", "result"],
            registry=r,
        )

    def count_request(
        self, transport: str, route: str, model: str, status: str, seconds: float
    ) -> None:
        """One finished request: ``appliance_requests`` and its latency histogram."""
        self._request_counts(transport, route, model, status).inc()
        self._request_seconds(transport, route, model).observe(seconds)

    def watch_queues(self, model: str, queues: Callable[[], Iterable[Queue]]) -> None:
        """Export the requests waiting for and running on ``model``, summed over ``queues()``
        when scraped: set on every change instead, they cost each request six updates."""
        self.queue_depth.labels(model).set_function(lambda: sum(q.waiting for q in queues()))
        self.running.labels(model).set_function(lambda: sum(q.running for q in queues()))

    def render(self) -> bytes:
        return generate_latest(self.registry)
