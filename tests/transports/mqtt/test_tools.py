"""Tool calling over MQTT: the same core checks and calls as over HTTP, with a real broker
and the default ``home-intent`` model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema

from tests.transports.mqtt.conftest import Broker, PahoClient, appliance, until

Clients = Callable[..., PahoClient]
TURN_ON = {
    "type": "function",
    "function": {
        "name": "HassTurnOn",
        "description": "Turns on a device or entity",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "area": {"type": "string"},
                "domain": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}


async def test_tools_over_mqtt_give_whole_calls_and_named_errors(
    broker: Broker, paho_clients: Clients, default_models: Path
) -> None:
    client = paho_clients(broker, v5=False)
    client.subscribe("replies/tools")
    async with appliance(broker, device="tool-box", models={"dir": str(default_models)}):
        client.publish(
            "appliance/tool-box/infer/home-intent",
            json.dumps(
                {
                    "id": "a",
                    "reply_to": "replies/tools",
                    "temperature": 0,
                    "tools": [TURN_ON],
                    "messages": [{"role": "user", "content": "turn on the kitchen lights"}],
                }
            ),
        )
        client.publish(
            "appliance/tool-box/infer/home-intent",
            json.dumps(
                {
                    "id": "b",
                    "reply_to": "replies/tools",
                    "tools": "HassTurnOn",
                    "messages": [{"role": "user", "content": "turn on the kitchen lights"}],
                }
            ),
        )
        await until(lambda: len(client.on("replies/tools")) >= 2)
    replies = {r.json()["id"]: r.json() for r in client.on("replies/tools")}
    good = replies["a"]
    assert good["status"] == "ok", good
    assert good["data"]["finish_reason"] == "tool_calls"
    [call] = good["data"]["tool_calls"]
    assert call["name"] == "HassTurnOn" and call["id"].startswith("call_")
    jsonschema.validate(call["arguments"], TURN_ON["function"]["parameters"])
    assert call["arguments"] == {"area": "kitchen", "domain": ["light"]}
    bad = replies["b"]
    assert bad["status"] == "error" and "tools must be a list" in json.dumps(bad["error"]), bad
