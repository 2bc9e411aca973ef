"""Prometheus metrics, in a registry owned by one daemon (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

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
U = TypeVar("U")


class Queue(Protocol):
    """What the queue gauges read (``appliance.core.admission.Admission``)."""

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...


@dataclass(frozen=True)
class RequestCount:
    """``appliance_requests`` of one label set."""

    transport: str
    route: str
    model: str
    status: str
    count: int


@dataclass(frozen=True)
class RequestLatency:
    """``appliance_request_duration_seconds`` of one label set; ``buckets`` cumulative, by
    upper bound."""

    transport: str
    route: str
    model: str
    seconds: float
    count: int
    buckets: dict[float, float]


@dataclass(frozen=True)
class RequestTotals:
    """What health reads back of the request metrics: typed values, not metric names."""

    counts: list[RequestCount]
    latencies: list[RequestLatency]
    tokens: dict[str, int]  # generated, by model
    load_failures: dict[str, int]  # by model
    # appliance_requests_shed: 503s of full queues (backpressure), by (transport, route)
    shed: dict[tuple[str, str], int] = field(default_factory=dict)


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
        # Of those, the 503s that were backpressure (a full queue), not failures: the
        # http_5xx alert leaves them out.
        self.requests_shed = Counter(
            "appliance_requests_shed",
            "Requests answered 503 because a queue was full (shed load), by transport, route.",
            ["transport", "route"],
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
            "appliance_model_load_seconds",
            "How long the last load of a model took.",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "appliance_cache_hits",
            "Requests answered from the result cache.",
            ["model"],
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
        self._units: dict[Callable[[CollectorRegistry], object], object] = {}

    def unit(self, factory: Callable[[CollectorRegistry], U]) -> U:
        """The metrics of one unit outside the core (``factory(registry)`` registers them),
        made once per registry: every unit exports through the same ``/metrics``, and the
        core knows none of them."""
        made = self._units.get(factory)
        if made is None:
            made = self._units[factory] = factory(self.registry)
        return cast(U, made)

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
            "appliance_canary_active",
            "1 while a canary version of a model runs.",
            ["model", "version"],
            registry=r,
        )
        self.canary_requests = Counter(
            "appliance_canary_requests",
            "Requests measured during a canary, by version, side (stable, canary) and result.",
            ["model", "version", "side", "result"],
            registry=r,
        )
        self.canary_decisions = Counter(
            "appliance_canary_decisions",
            "Canary outcomes (promoted, rolled_back).",
            ["model", "decision"],
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

    def totals(self) -> RequestTotals:
        """The cumulative request counts and latencies, tokens and load failures."""
        counts = [
            RequestCount(
                s.labels["transport"],
                s.labels["route"],
                s.labels["model"],
                s.labels["status"],
                int(s.value),
            )
            for s in _samples(self.requests, "_total")
        ]
        latencies: dict[tuple[str, str, str], RequestLatency] = {}
        for suffix in ("_sum", "_count", "_bucket"):
            for sample in _samples(self.request_latency, suffix):
                labels = sample.labels
                key = (labels["transport"], labels["route"], labels["model"])
                row = latencies.setdefault(key, RequestLatency(*key, 0.0, 0, {}))
                if suffix == "_sum":
                    latencies[key] = RequestLatency(*key, sample.value, row.count, row.buckets)
                elif suffix == "_count":
                    latencies[key] = RequestLatency(
                        *key, row.seconds, int(sample.value), row.buckets
                    )
                else:
                    row.buckets[float(labels["le"])] = sample.value
        return RequestTotals(
            counts=counts,
            latencies=list(latencies.values()),
            tokens={
                s.labels["model"]: int(s.value) for s in _samples(self.tokens_generated, "_total")
            },
            load_failures={
                s.labels["model"]: int(s.value)
                for s in _samples(self.model_load_failures, "_total")
            },
            shed={
                (s.labels["transport"], s.labels["route"]): int(s.value)
                for s in _samples(self.requests_shed, "_total")
            },
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _samples(metric: MetricWrapperBase, suffix: str) -> list[Sample]:
    """The samples of ``metric`` of one kind (``_total``, ``_sum``, ``_bucket``...)."""
    return [
        sample
        for family in metric.collect()
        for sample in family.samples
        if sample.name == family.name + suffix
    ]
