"""Delivery across crashes with real daemon processes and a real Mosquitto: a request is
acknowledged to the broker only once it is answered, so one cut short by ``kill -9`` of
the daemon is delivered again to the restarted daemon and answered there."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import daemon
from tests.transports.mqtt.conftest import Broker, PahoClient, Received, until

Clients = Callable[..., PahoClient]


def daemon_env(broker: Broker, device: str, state: Path) -> dict[str, str]:
    return {
        "APPLIANCE_MQTT__ENABLED": "true",
        "APPLIANCE_MQTT__HOST": broker.host,
        "APPLIANCE_MQTT__PORT": str(broker.port),
        "APPLIANCE_DEVICE__ID": device,
        "APPLIANCE_MQTT__RECONNECT_MIN": "0.05",
        "APPLIANCE_MQTT__RECONNECT_MAX": "0.3",
        "STATE_DIRECTORY": str(state),
    }


def finals(messages: list[Received]) -> list[Received]:
    return [m for m in messages if m.json().get("done") is True]


async def test_a_request_running_when_the_daemon_is_killed_is_answered_after_restart(
    broker: Broker, paho_clients: Clients, stories_gguf: Path, tmp_path: Path
) -> None:
    requester = paho_clients(broker, client_id="requester-kill", clean=False)
    requester.subscribe("replies/kill")
    requester.subscribe("appliance/kill-box/availability")
    env = daemon_env(broker, "kill-box", tmp_path / "state")
    with daemon("--model", str(stories_gguf), env=env) as first:
        await until(
            lambda: any(
                m.payload == b"online" for m in requester.on("appliance/kill-box/availability")
            )
        )
        requester.publish(
            "appliance/kill-box/infer/stories260K",
            json.dumps(
                {"prompt": "Once upon a time", "stream": True, "max_tokens": 400, "seed": 1}
            ),
            response_topic="replies/kill",
            correlation=b"k1",
        )
        await requester.wait("replies/kill")  # under way ...
        first.stop(signal.SIGKILL)  # ... and killed: no final message from this one
    assert not finals(requester.on("replies/kill"))
    with daemon("--model", str(stories_gguf), env=env):
        # The broker delivers the unacknowledged request again; the new daemon answers it.
        await until(lambda: bool(finals(requester.on("replies/kill"))), timeout=60)
    final = finals(requester.on("replies/kill"))[0].json()
    assert final["status"] == "ok" and final["complete"] is True
    assert final["data"]["usage"]["completion_tokens"] == 400
