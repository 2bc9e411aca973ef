"""Per-model request statistics, read from the daemon's own Prometheus registry.

Reading the registry rather than hooking each transport means every transport that counts
its requests there (HTTP, MQTT, WebSocket, gRPC) is included without knowing about health.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.core.service import Core


@dataclass
class Counters:
    """Cumulative per-model numbers read from the Prometheus registry."""

    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latency_sum: dict[str, float] = field(default_factory=dict)
    latency_count: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    load_failures: dict[str, int] = field(default_factory=dict)
    http_total: int = 0
    http_5xx: int = 0


def _is_probe(route: str) -> bool:
    """Health and readiness checks: their 503 while loading is an answer, not an error."""
    return route == "/health" or route.startswith("/v2/health") or route.endswith("/ready")


# Server-side failures in the MQTT and WebSocket reply codes (HTTP uses 5xx statuses).
_ERROR_CODES = frozenset({"error", "busy", "unavailable", "internal"})


def _is_error(status: str) -> bool:
    return status.startswith("5") or status in _ERROR_CODES


def read_counters(core: Core) -> Counters:
    """Sum the daemon's request metrics per model (over transports and routes)."""
    out = Counters()
    for family in core.metrics.registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if _is_probe(labels.get("route", "")):
                continue
            model = labels.get("model", "")
            value = sample.value
            if sample.name == "appliance_requests_total":
                status = labels.get("status", "")
                if labels.get("transport") == "http":
                    out.http_total += int(value)
                    if status.startswith("5"):
                        out.http_5xx += int(value)
                if model:
                    out.requests[model] = out.requests.get(model, 0) + int(value)
                    if _is_error(status):
                        out.errors[model] = out.errors.get(model, 0) + int(value)
            elif not model:
                continue
            elif sample.name == "appliance_request_duration_seconds_sum":
                out.latency_sum[model] = out.latency_sum.get(model, 0.0) + value
            elif sample.name == "appliance_request_duration_seconds_count":
                out.latency_count[model] = out.latency_count.get(model, 0) + int(value)
            elif sample.name == "appliance_request_duration_seconds_bucket":
                le = float(labels["le"])
                per = out.buckets.setdefault(model, {})
                per[le] = per.get(le, 0.0) + value
            elif sample.name == "appliance_tokens_generated_total":
                out.tokens[model] = int(value)
            elif sample.name == "appliance_model_load_failures_total":
                out.load_failures[model] = int(value)
    return out


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile`` as Prometheus computes it, from cumulative bucket counts."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the largest finite bucket: its bound is all we know
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
