"""Home Assistant MQTT discovery, read back from a real broker, with every value template
rendered by Jinja (Home Assistant's template engine) against the documents they point at."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.transports.mqtt.conftest import Broker, PahoClient, appliance, until

Clients = Callable[..., PahoClient]
CONFIGS = "homeassistant/+/ha-box/+/config"


async def test_discovery_announces_the_device_and_repeats_when_home_assistant_returns(
    broker: Broker, paho_clients: Clients
) -> None:
    jinja2 = pytest.importorskip("jinja2")
    ha = paho_clients(broker)
    async with appliance(
        broker, device="ha-box", mqtt={"stats_interval": 0.1}, health={"interval": 0.2}
    ):
        ha.subscribe("homeassistant/#")
        ha.subscribe("appliance/ha-box/#")
        first = await ha.wait(CONFIGS, 10)
        await until(
            lambda: any(
                m.json()["system"]["memory_percent"] is not None
                for m in ha.on("appliance/ha-box/stats")
            )
        )
        # Home Assistant restarted: its birth message asks for the announcement again.
        ha.publish("homeassistant/status", "online")
        await ha.wait(CONFIGS, 20)
    configs = {m.topic: m.json() for m in first}
    assert all(m.retain for m in first)
    assert set(configs) == {
        f"homeassistant/sensor/ha-box/{name}/config"
        for name in (
            "status",
            "inference_latency",
            "requests",
            "uptime",
            "cpu_temperature",
            "memory",
            "cpu",
            "model_sensor-anomaly",
            "model_home-intent",
        )
    } | {"homeassistant/binary_sensor/ha-box/alert/config"}
    unique = {c["unique_id"] for c in configs.values()}
    assert len(unique) == len(configs)
    for config in configs.values():
        assert config["availability_topic"] == "appliance/ha-box/availability"
        assert config["payload_available"] == "online"
        assert config["payload_not_available"] == "offline"
        assert config["device"]["identifiers"] == ["appliance_ha-box"]
        assert config["device"]["name"] == "Test box"
        assert config["device"]["configuration_url"].startswith("http://127.0.0.1:")
    temperature = configs["homeassistant/sensor/ha-box/cpu_temperature/config"]
    assert temperature["device_class"] == "temperature"
    assert temperature["unit_of_measurement"] == "°C"
    alert = configs["homeassistant/binary_sensor/ha-box/alert/config"]
    assert alert["device_class"] == "problem"
    assert alert["state_topic"] == "appliance/ha-box/alert"

    documents: dict[str, Any] = {
        m.topic: m.json()
        for m in ha.on("appliance/ha-box/#")
        if m.topic != "appliance/ha-box/availability"
    }
    documents["appliance/ha-box/stats"] = next(
        m.json()
        for m in reversed(ha.on("appliance/ha-box/stats"))
        if m.json()["system"]["memory_percent"] is not None
    )
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    values = {}
    for topic, config in configs.items():
        document = documents[config["state_topic"]]
        values[topic.split("/")[3]] = env.from_string(config["value_template"]).render(
            value_json=document
        )
    assert values["model_sensor-anomaly"] == "ready"
    assert values["status"] == "ok"
    assert values["alert"] == "OFF"
    assert 0 <= float(values["memory"]) <= 100
    assert float(values["uptime"]) >= 0
    assert values["requests"] == "0"
    assert values["cpu_temperature"] == "None" or float(values["cpu_temperature"]) > -50
