"""The metrics of the ``appliance.ops`` units, registered on the daemon's shared registry.

Each class belongs to one unit and is made once per registry through
``Metrics.unit`` (``core.unit_metrics`` for units that hold the core).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge


class SystemMetrics:
    """Box health, set by the health collector (``appliance.ops.health``)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.system_cpu_percent = Gauge(
            "appliance_system_cpu_percent", "Whole-machine CPU use.", registry=r
        )
        self.system_memory_percent = Gauge(
            "appliance_system_memory_percent", "Whole-machine memory use.", registry=r
        )
        self.temperature = Gauge(
            "appliance_temperature_celsius",
            "Temperature by sensor (thermal zone).",
            ["sensor"],
            registry=r,
        )
        self.gpu_utilization = Gauge(
            "appliance_gpu_utilization_percent", "GPU utilisation.", ["gpu"], registry=r
        )
        self.process_rss = Gauge(
            "appliance_process_resident_memory_bytes", "The daemon's resident memory.", registry=r
        )

    def export(
        self,
        cpu_percent: float,
        memory_percent: float,
        rss_bytes: int,
        temperatures: Mapping[str, float],
        gpus: Mapping[str, float],
    ) -> None:
        """Set the gauges from one health reading (GPU utilisation by GPU name)."""
        self.system_cpu_percent.set(cpu_percent)
        self.system_memory_percent.set(memory_percent)
        self.process_rss.set(rss_bytes)
        for sensor, celsius in temperatures.items():
            self.temperature.labels(sensor).set(celsius)
        for gpu, percent in gpus.items():
            self.gpu_utilization.labels(gpu).set(percent)


class AlertMetrics:
    """Alerts, set by the alert engine (``appliance.ops.alerts``)."""

    def __init__(self, r: CollectorRegistry) -> None:
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

    def firing(self) -> list[tuple[str, str]]:
        """``(rule, subject)`` of every alert firing now, as the gauge says: units that do
        not hold the alert engine (MQTT) read it here."""
        return [
            (sample.labels["rule"], sample.labels["subject"])
            for family in self.alert_firing.collect()
            for sample in family.samples
            if sample.value >= 1
        ]


class OutboxMetrics:
    """The hub outbox (``appliance.ops.outbox``)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.outbox_records = Gauge(
            "appliance_outbox_records", "Records waiting in the hub outbox.", registry=r
        )
        self.outbox_bytes = Gauge(
            "appliance_outbox_bytes", "Payload bytes waiting in the hub outbox.", registry=r
        )
        self.outbox_appended = Counter(
            "appliance_outbox_appended",
            "Records durably appended to the outbox.",
            ["kind"],
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


class HubMetrics:
    """Uploads to the hub (``appliance.ops.hubsync``)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.hub_uploads = Counter(
            "appliance_hub_uploads",
            "Upload attempts to the hub, by result.",
            ["result"],
            registry=r,
        )
        self.hub_last_upload = Gauge(
            "appliance_hub_last_upload_timestamp_seconds",
            "Unix time of the last upload the hub acknowledged.",
            registry=r,
        )


__all__ = ["AlertMetrics", "HubMetrics", "OutboxMetrics", "SystemMetrics"]
