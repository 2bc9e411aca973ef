"""Home Assistant MQTT discovery: the appliance as one device with sensors and an alert.

Each entity is announced with a retained config message on
``<prefix>/<component>/<device id>/<object id>/config``. Sensors read the retained stats
document, the alert binary sensor reads ``<base>/alert``, and every entity's availability
is the appliance's availability topic, so the last will marks them all unavailable. The
announcement is repeated on every connect and whenever Home Assistant publishes ``online``
on ``<prefix>/status`` (it restarted and forgot them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from appliance import __version__
from appliance.core.types import ModelInfo, ModelState
from appliance.transports.mqtt.topics import Topics

_SLUG = re.compile(r"[^A-Za-z0-9_-]")


def slug(name: str) -> str:
    return _SLUG.sub("_", name)


def discovery(
    topics: Topics,
    *,
    device_id: str,
    device_name: str,
    http_url: str,
    models: Sequence[ModelInfo],
    system: bool,
) -> list[tuple[str, dict[str, Any]]]:
    """Every discovery message as ``(topic, payload)``. ``system``: announce the system
    sensors (CPU temperature, memory ...), which need the health unit's readings."""
    assert topics.discovery_prefix is not None
    prefix = topics.discovery_prefix
    device: dict[str, Any] = {
        "identifiers": [f"appliance_{device_id}"],
        "name": device_name,
        "manufacturer": "Appliance",
        "model": "Edge AI appliance",
        "sw_version": __version__,
    }
    if http_url.startswith(("http://", "https://")):
        device["configuration_url"] = http_url
    common: dict[str, Any] = {
        "availability_topic": topics.availability,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "origin": {"name": "appliance", "sw_version": __version__},
        "qos": 1,
    }

    def entity(component: str, object_id: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        unique = f"appliance_{slug(device_id)}_{object_id}"
        payload = {"unique_id": unique, **fields, **common}
        return f"{prefix}/{component}/{slug(device_id)}/{object_id}/config", payload

    stats = topics.stats
    out = [
        entity(
            "sensor",
            "status",
            name="Status",
            state_topic=stats,
            value_template="{{ value_json.status }}",
            device_class="enum",
            options=["loading", "unavailable", "degraded", "ok"],
            icon="mdi:chip",
        ),
        entity(
            "sensor",
            "inference_latency",
            name="Inference latency",
            state_topic=stats,
            value_template="{{ value_json.latency_ms }}",
            unit_of_measurement="ms",
            state_class="measurement",
            icon="mdi:timer-outline",
        ),
        entity(
            "sensor",
            "requests",
            name="Requests",
            state_topic=stats,
            value_template="{{ value_json.requests_total }}",
            state_class="total_increasing",
            icon="mdi:counter",
        ),
        entity(
            "sensor",
            "uptime",
            name="Uptime",
            state_topic=stats,
            value_template="{{ value_json.uptime_s }}",
            unit_of_measurement="s",
            device_class="duration",
            entity_category="diagnostic",
        ),
        entity(
            "binary_sensor",
            "alert",
            name="Alert",
            state_topic=topics.alert,
            value_template="{{ value_json.state }}",
            payload_on="ON",
            payload_off="OFF",
            device_class="problem",
            json_attributes_topic=topics.alert,
        ),
    ]
    if system:
        out += [
            entity(
                "sensor",
                "cpu_temperature",
                name="CPU temperature",
                state_topic=stats,
                value_template="{{ value_json.system.max_temperature_c }}",
                unit_of_measurement="°C",
                device_class="temperature",
                state_class="measurement",
            ),
            entity(
                "sensor",
                "memory",
                name="Memory used",
                state_topic=stats,
                value_template="{{ value_json.system.memory_percent }}",
                unit_of_measurement="%",
                state_class="measurement",
                icon="mdi:memory",
            ),
            entity(
                "sensor",
                "cpu",
                name="CPU",
                state_topic=stats,
                value_template="{{ value_json.system.cpu_percent }}",
                unit_of_measurement="%",
                state_class="measurement",
                icon="mdi:cpu-64-bit",
            ),
        ]
    for model in models:
        key = model.name.replace("'", "\\'")
        out.append(
            entity(
                "sensor",
                f"model_{slug(model.name)}",
                name=f"Model {model.name}",
                state_topic=stats,
                value_template=f"{{{{ value_json.models['{key}'].state }}}}",
                device_class="enum",
                options=[s.value for s in ModelState],
                icon="mdi:brain",
                entity_category="diagnostic",
            )
        )
    return out
