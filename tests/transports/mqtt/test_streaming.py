"""Streamed generation over MQTT: ordered chunks and a final message, and not one reply lost
when the broker is killed and restarted in the middle of a stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import daemon
from tests.transports.mqtt.conftest import (
    WAIT,
    Broker,
    PahoClient,
    Received,
    appliance,
    until,
)

Clients = Callable[..., PahoClient]


def finals(messages: list[Received]) -> list[dict[str, Any]]:
    return [m.json() for m in messages if m.json().get("done") is True]


def check_stream(messages: list[dict[str, Any]]) -> str:
    """Every chunk of one stream is there, first seen in order; returns the joined text."""
    first_seen: dict[int, dict[str, Any]] = {}
    for message in messages:  # QoS 1 may bring a message twice, never reorder a stream
        first_seen.setdefault(message["seq"], message)
    order = list(first_seen)
    assert order == sorted(order), order
    final = [m for m in first_seen.values() if m["done"]]
    assert len(final) == 1
    last = final[0]
    assert sorted(first_seen) == list(range(last["seq"] + 1)), "a chunk is missing"
    chunks = [first_seen[seq]["data"]["text"] for seq in range(last["seq"])]
    assert all(first_seen[seq]["done"] is False for seq in range(last["seq"]))
    text = "".join(chunks)
    assert last["data"]["text"] == text
    return text


async def test_streamed_generation_arrives_as_ordered_chunks_and_a_final_message(
    broker: Broker, paho_clients: Clients, stories_repo: Path
) -> None:
    v5 = paho_clients(broker)
    v5.subscribe("replies/stream")
    v311 = paho_clients(broker, v5=False)
    v311.subscribe("replies/stream311")
    async with appliance(broker, device="st-box", models={"dir": str(stories_repo)}):
        v5.publish(
            "appliance/st-box/infer/stories",
            json.dumps({"prompt": "Once upon a time", "stream": True, "max_tokens": 48, "seed": 3}),
            response_topic="replies/stream",
            correlation=b"s1",
        )
        v311.publish(
            "appliance/st-box/infer/stories",
            json.dumps(
                {
                    "id": "s2",
                    "reply_to": "replies/stream311",
                    "stream": True,
                    "max_tokens": 24,
                    "messages": [{"role": "user", "content": "Tell me about a dog."}],
                }
            ),
        )
        await until(lambda: len(finals(v5.on("replies/stream"))) == 1)
        await until(lambda: len(finals(v311.on("replies/stream311"))) == 1)
    replies = v5.on("replies/stream")
    assert all(r.properties.CorrelationData == b"s1" for r in replies)
    bodies = [r.json() for r in replies]
    text = check_stream(bodies)
    assert [b["seq"] for b in bodies] == list(range(len(bodies)))
    assert len(bodies) > 1 and text
    final = bodies[-1]
    assert final["status"] == "ok"
    assert final["data"]["finish_reason"] == "length"
    assert final["data"]["usage"]["completion_tokens"] == 48
    chat = [r.json() for r in v311.on("replies/stream311")]
    assert all(c["id"] == "s2" for c in chat)
    assert check_stream(chat)


async def _get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        return await (resp.json() if url.endswith("/health") else resp.text())


async def test_broker_killed_and_restarted_mid_stream_loses_no_reply(
    broker: Broker, paho_clients: Clients, stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    """QoS 1 end to end across a ``kill -9`` of the broker.

    The daemon is paused (SIGSTOP) for the instant of the kill only so that the broker has
    written every message it acknowledged to its database; a message Mosquitto acknowledged
    but had not yet saved is the broker's own durability window, not the appliance's.
    While the broker is gone the daemon keeps generating; its replies wait in the outbox and
    go out after the reconnect.
    """
    requester = paho_clients(broker, client_id="requester-crash", clean=False)
    requester.subscribe("replies/crash/#")
    requester.subscribe("appliance/crash-box/availability")
    env = {
        "APPLIANCE_MQTT__ENABLED": "true",
        "APPLIANCE_MQTT__HOST": broker.host,
        "APPLIANCE_MQTT__PORT": str(broker.port),
        "APPLIANCE_DEVICE__ID": "crash-box",
        "APPLIANCE_MQTT__RECONNECT_MIN": "0.05",
        "APPLIANCE_MQTT__RECONNECT_MAX": "0.3",
    }
    streams = 3
    with daemon("--model", str(stories_gguf), env=env) as proc:
        await requester.wait("appliance/crash-box/availability")
        for n in range(streams):
            requester.publish(
                "appliance/crash-box/infer/stories260K",
                json.dumps(
                    {"prompt": "Once upon a time", "stream": True, "max_tokens": 400, "seed": n}
                ),
                response_topic=f"replies/crash/{n}",
                correlation=b"%d" % n,
            )
        await requester.wait("replies/crash/0")
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            # Quiet: everything the broker had has reached the requester.
            seen = -1
            while seen != len(requester.messages):
                seen = len(requester.messages)
                await asyncio.sleep(0.3)
            broker.stop(signal.SIGKILL)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        # The daemon goes on generating; with no broker its replies queue up.
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            health = await _get(http, proc.url + "/health")
            mqtt = health["units"]["mqtt"]
            if mqtt["state"] != "connected" and mqtt["outbox"] > 0:
                break
            assert asyncio.get_running_loop().time() < deadline, "no replies queued"
            await asyncio.sleep(0.05)
        assert health["status"] == "ok"  # HTTP serves on
        broker.start()
        await until(
            lambda: all(finals(requester.on(f"replies/crash/{n}")) for n in range(streams)),
            timeout=60,
        )
        metrics = await _get(http, proc.url + "/metrics")
    for n in range(streams):
        bodies = [m.json() for m in requester.on(f"replies/crash/{n}")]
        check_stream(bodies)
        assert bodies[-1]["data"]["usage"]["completion_tokens"] == 400
    assert "appliance_mqtt_connects_total 2.0" in metrics
    assert 'appliance_mqtt_messages_dropped_total{kind="chunk"}' not in metrics


async def test_a_stream_cut_by_shutdown_still_ends_with_a_final_message(
    broker: Broker, paho_clients: Clients, stories_gguf: Path
) -> None:
    client = paho_clients(broker)
    client.subscribe("replies/cut")
    client.subscribe("appliance/cut-box/availability")
    async with appliance(
        broker,
        device="cut-box",
        models={"files": [str(stories_gguf)]},
        http={"shutdown_timeout": 0},
    ):
        client.publish(
            "appliance/cut-box/infer/stories260K",
            json.dumps({"id": "long", "prompt": "Once upon a time", "stream": True}),
            response_topic="replies/cut",
        )
        await client.wait("replies/cut")  # under way; now stop the daemon
    await until(lambda: bool(finals(client.on("replies/cut"))))
    bodies = [m.json() for m in client.on("replies/cut")]
    final = bodies[-1]
    assert final["status"] == "error" and final["done"] is True
    assert final["error"]["code"] == "unavailable"
    assert [b["seq"] for b in bodies] == list(range(len(bodies)))
    # ... and the appliance said goodbye.
    assert client.on("appliance/cut-box/availability")[-1].payload == b"offline"
