"""The hub's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class HubMetrics:
    """Every metric the hub exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "appliance_hub_http_requests",
            "HTTP requests, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.ingest_records = Counter(
            "appliance_hub_ingest_records",
            "Uploaded records, by result (accepted, duplicate).",
            ["result"],
            registry=r,
        )
        self.ingest_batches = Counter(
            "appliance_hub_ingest_batches",
            "Upload batches, by status.",
            ["status"],
            registry=r,
        )
        self.ingest_duration = Histogram(
            "appliance_hub_ingest_duration_seconds",
            "Time to store one upload batch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.devices = Gauge(
            "appliance_hub_devices", "Enrolled devices, by status.", ["status"], registry=r
        )
        self.alerts_firing = Gauge(
            "appliance_hub_alerts_firing", "Alerts firing across the fleet.", registry=r
        )
        self.offline_marked = Counter(
            "appliance_hub_devices_marked_offline",
            "Times a device was marked offline.",
            registry=r,
        )
        self.retention_downsampled = Counter(
            "appliance_hub_heartbeats_downsampled",
            "Raw heartbeats folded into averages.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
