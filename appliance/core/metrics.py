"""Prometheus metrics, in a registry owned by one daemon (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
