"""The MQTT transport's metrics, registered on the daemon's shared registry.

Its requests are also counted in ``appliance_requests`` with ``transport="mqtt"`` (by the
core); these are what only MQTT has: the broker connection, messages, stream rules.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class MqttMetrics:
    """Made once per registry: ``core.unit_metrics(MqttMetrics)``."""

    def __init__(self, r: CollectorRegistry) -> None:
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
            "appliance_mqtt_rule_readings",
            "Readings a stream rule accepted.",
            ["rule"],
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


__all__ = ["MqttMetrics"]
