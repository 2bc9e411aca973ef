"""Per-model request statistics, read from the daemon's own request metrics.

Reading the metrics (as typed values, :meth:`Core.request_totals`) rather than hooking each
transport means every transport that counts its requests there (HTTP, MQTT, WebSocket,
gRPC) is included without knowing about health.
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
    http_5xx: int = 0  # server errors: 5xx answers except shed load
    http_shed: int = 0  # 503s of a full queue (backpressure)


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
    totals = core.request_totals()
    for row in totals.counts:
        if _is_probe(row.route):
            continue
        if row.transport == "http":
            out.http_total += row.count
            if row.status.startswith("5"):
                out.http_5xx += row.count
        if row.model:
            out.requests[row.model] = out.requests.get(row.model, 0) + row.count
            if _is_error(row.status):
                out.errors[row.model] = out.errors.get(row.model, 0) + row.count
    for latency in totals.latencies:
        model = latency.model
        if not model or _is_probe(latency.route):
            continue
        out.latency_sum[model] = out.latency_sum.get(model, 0.0) + latency.seconds
        out.latency_count[model] = out.latency_count.get(model, 0) + latency.count
        per = out.buckets.setdefault(model, {})
        for le, value in latency.buckets.items():
            per[le] = per.get(le, 0.0) + value
    out.tokens = {m: n for m, n in totals.tokens.items() if m}
    out.load_failures = {m: n for m, n in totals.load_failures.items() if m}
    out.http_shed = sum(
        n
        for (transport, route), n in totals.shed.items()
        if transport == "http" and not _is_probe(route)
    )
    # Shed load is answered 503 (and counted so in appliance_requests) but is no failure.
    out.http_5xx = max(0, out.http_5xx - out.http_shed)
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
