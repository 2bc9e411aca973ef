"""Request/response over a real Mosquitto: MQTT 5 (response topic + correlation data) and
3.1.1 (``reply_to`` + ``id`` in the payload), JSON and MessagePack, tensors, text and
embeddings, and answering a redelivered request from the reply cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from tests.conftest import DEFAULT_MODELS
from tests.transports.mqtt.conftest import (
    Broker,
    PahoClient,
    appliance,
    run_tool,
    until,
    window,
)

Clients = Callable[..., PahoClient]
MODEL = "sensor-anomaly"


def oip_body(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": rows}],
        **extra,
    }


async def test_mosquitto_rr_mqtt5_open_inference_protocol(broker: Broker) -> None:
    async with appliance(broker, device="rr-box"):
        rc, out, err = await run_tool(
            *broker.cli(
                "mosquitto_rr",
                "-t",
                f"appliance/rr-box/infer/{MODEL}",
                "-e",
                "replies/rr",
                "-q",
                "1",
                "-W",
                "15",
                "-m",
                json.dumps(oip_body(window(), id="oip-1")),
            )
        )
    assert rc == 0, err
    reply = json.loads(out)
    assert reply["status"] == "ok"
    assert reply["device"] == "rr-box"
    data = reply["data"]
    assert data["model_name"] == MODEL
    assert data["id"] == "oip-1"
    outputs = {t["name"]: t for t in data["outputs"]}
    assert outputs["score"]["datatype"] == "FP32"
    assert outputs["score"]["shape"] == [1]
    assert 0 < outputs["score"]["data"][0] < 1.0
    assert outputs["is_anomaly"]["data"] == [False]


async def test_mqtt311_reply_to_and_id_in_the_payload(
    broker: Broker, paho_clients: Clients
) -> None:
    client = paho_clients(broker, v5=False)
    client.subscribe("devices/sensor-7/replies")
    async with appliance(broker, device="v311-box"):
        for request_id, rows in (("normal", window()), (17, window(anomalous=True))):
            client.publish(
                f"appliance/v311-box/infer/{MODEL}",
                json.dumps(
                    {"id": request_id, "reply_to": "devices/sensor-7/replies", "data": rows}
                ),
            )
        replies = await client.wait("devices/sensor-7/replies", 2)
    by_id = {r.json()["id"]: r.json() for r in replies}
    assert set(by_id) == {"normal", 17}
    assert by_id["normal"]["status"] == "ok"
    assert by_id["normal"]["data"]["outputs"]["is_anomaly"] is False
    assert by_id[17]["data"]["outputs"]["is_anomaly"] is True
    assert by_id[17]["data"]["outputs"]["score"] > 1.0


async def test_mqtt5_correlation_data_and_content_type_are_echoed(
    broker: Broker, paho_clients: Clients
) -> None:
    client = paho_clients(broker)
    client.subscribe("replies/v5")
    async with appliance(broker, device="v5-box"):
        for n in range(3):
            client.publish(
                f"appliance/v5-box/infer/{MODEL}",
                json.dumps({"inputs": {"window": window(anomalous=n == 1)}}),
                response_topic="replies/v5",
                correlation=b"\x00corr-%d" % n,
            )
        replies = await client.wait("replies/v5", 3)
    by_corr = {r.properties.CorrelationData: r for r in replies}
    assert set(by_corr) == {b"\x00corr-0", b"\x00corr-1", b"\x00corr-2"}
    for corr, reply in by_corr.items():
        assert reply.properties.ContentType == "application/json"
        body = reply.json()
        assert "id" not in body  # none was given
        assert body["data"]["outputs"]["is_anomaly"] is (corr == b"\x00corr-1")


async def test_messagepack_by_content_type_and_by_topic_suffix(
    broker: Broker, paho_clients: Clients
) -> None:
    v5 = paho_clients(broker)
    v5.subscribe("replies/mp")
    v311 = paho_clients(broker, v5=False)
    v311.subscribe("replies/mp311")
    raw = np.asarray(window(anomalous=True), dtype="<f4").tobytes()
    async with appliance(broker, device="mp-box"):
        # MQTT 5: the content type says MessagePack; the tensor travels as raw bytes.
        v5.publish(
            f"appliance/mp-box/infer/{MODEL}",
            msgpack.packb(
                {
                    "inputs": [
                        {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": raw}
                    ]
                }
            ),
            response_topic="replies/mp",
            correlation=b"m1",
            content_type="application/msgpack",
        )
        # MQTT 3.1.1 has no content type: the /msgpack suffix says it.
        v311.publish(
            f"appliance/mp-box/infer/{MODEL}/msgpack",
            msgpack.packb({"id": "m2", "reply_to": "replies/mp311", "data": window()}),
        )
        first = (await v5.wait("replies/mp"))[0]
        second = (await v311.wait("replies/mp311"))[0]
    assert first.properties.ContentType == "application/msgpack"
    body = msgpack.unpackb(first.payload)
    assert body["status"] == "ok"
    # Numeric tensors come back as raw little-endian bytes, as over HTTP.
    outputs = {t["name"]: t["data"] for t in body["data"]["outputs"]}
    assert np.frombuffer(outputs["is_anomaly"], np.bool_).tolist() == [True]
    assert np.frombuffer(outputs["score"], "<f4")[0] > 1.0
    body = msgpack.unpackb(second.payload)
    assert body["id"] == "m2"
    assert body["data"]["outputs"]["is_anomaly"] is False


async def test_language_model_prompt_chat_and_embeddings(
    broker: Broker, paho_clients: Clients, stories_repo: Path
) -> None:
    client = paho_clients(broker)
    client.subscribe("replies/llm/#")
    async with appliance(broker, device="llm-box", models={"dir": str(stories_repo)}):
        topic = "appliance/llm-box/infer/stories"
        # Plain text is a prompt (what `mosquitto_rr -m 'Once upon a time'` sends).
        rc, out, err = await run_tool(
            *broker.cli(
                "mosquitto_rr",
                "-t",
                topic,
                "-e",
                "replies/llm/rr",
                "-q",
                "1",
                "-W",
                "15",
                "-m",
                "Once upon a time",
            )
        )
        assert rc == 0, err
        text_reply = json.loads(out)
        client.publish(
            topic,
            json.dumps(
                {
                    "messages": [{"role": "user", "content": "Tell me a story about a cat."}],
                    "max_tokens": 12,
                    "seed": 7,
                    "temperature": 0,
                }
            ),
            response_topic="replies/llm/chat",
            correlation=b"c",
        )
        client.publish(
            topic,
            json.dumps({"input": ["a cat", "a dog"]}),
            response_topic="replies/llm/embed",
            correlation=b"e",
        )
        chat = (await client.wait("replies/llm/chat"))[0].json()
        embed = (await client.wait("replies/llm/embed"))[0].json()
    assert text_reply["status"] == "ok"
    assert text_reply["data"]["text"]
    assert text_reply["data"]["usage"]["prompt_tokens"] > 0
    assert chat["status"] == "ok", chat
    assert chat["data"]["finish_reason"] in ("stop", "length")
    assert chat["data"]["text"]
    assert chat["data"]["usage"]["completion_tokens"] > 0
    assert embed["status"] == "ok", embed
    vectors = embed["data"]["embeddings"]
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) > 0


async def test_request_without_reply_topic_is_answered_on_the_result_topic(
    broker: Broker, paho_clients: Clients
) -> None:
    client = paho_clients(broker, v5=False)
    client.subscribe("appliance/res-box/result/#")
    async with appliance(broker, device="res-box"):
        rc, _, err = await run_tool(
            *broker.cli(
                "mosquitto_pub",
                "-V",
                "mqttv311",
                "-q",
                "1",
                "-t",
                f"appliance/res-box/infer/{MODEL}",
                "-m",
                json.dumps({"id": "fire", "data": window()}),
            )
        )
        assert rc == 0, err
        reply = (await client.wait(f"appliance/res-box/result/{MODEL}"))[0].json()
    assert reply["id"] == "fire"
    assert reply["status"] == "ok"


def inference_count(server: Any) -> float:
    value = server.metrics.registry.get_sample_value(
        "appliance_inference_duration_seconds_count", {"model": MODEL}
    )
    return float(value or 0)


def sample(server: Any, name: str, labels: dict[str, str] | None = None) -> float:
    return float(server.metrics.registry.get_sample_value(name, labels or {}) or 0)


async def test_redelivered_request_is_answered_from_the_cache_not_run_twice(
    broker: Broker, paho_clients: Clients
) -> None:
    v5 = paho_clients(broker)
    v5.subscribe("replies/dup/#")
    v311 = paho_clients(broker, v5=False)
    v311.subscribe("replies/dup311")
    topic = f"appliance/dup-box/infer/{MODEL}"
    async with appliance(broker, device="dup-box") as server:
        body = json.dumps({"data": window()})
        v5.publish(topic, body, response_topic="replies/dup/a", correlation=b"same")
        first = (await v5.wait("replies/dup/a"))[0]
        assert inference_count(server) == 1
        # The same request again, as a QoS 1 redelivery brings it: answered, not run.
        v5.publish(topic, body, response_topic="replies/dup/a", correlation=b"same")
        second = (await v5.wait("replies/dup/a", 2))[1]
        body311 = json.dumps({"id": "once", "reply_to": "replies/dup311", "data": window()})
        v311.publish(topic, body311)
        await v311.wait("replies/dup311")
        v311.publish(topic, body311)
        replies = await v311.wait("replies/dup311", 2)
        assert inference_count(server) == 2
        # A duplicate that arrives while the original still runs gets the original's reply.
        v5.publish(topic, body, response_topic="replies/dup/b", correlation=b"burst")
        v5.publish(topic, body, response_topic="replies/dup/b", correlation=b"burst")
        await v5.wait("replies/dup/b")
        await until(lambda: sample(server, "appliance_mqtt_duplicate_requests_total") == 3)
        # Another id is another request, and runs.
        v311.publish(topic, body311.replace("once", "twice"))
        await v311.wait("replies/dup311", 3)
        assert inference_count(server) == 4
    assert second.payload == first.payload
    assert second.properties.CorrelationData == b"same"
    assert replies[0].payload == replies[1].payload


async def test_plain_text_to_a_chat_model_goes_through_its_chat_template(
    broker: Broker, paho_clients: Clients
) -> None:
    """What a person types into ``mosquitto_rr -m`` reaches home-intent as a user turn of
    its chat template (as Ollama's /api/generate does), so it answers with its intent JSON
    instead of continuing the raw text."""
    async with appliance(broker, device="intent-box", models={"dir": str(DEFAULT_MODELS)}):
        rc, out, err = await run_tool(
            *broker.cli(
                "mosquitto_rr",
                "-t",
                "appliance/intent-box/infer/home-intent",
                "-e",
                "replies/intent",
                "-q",
                "1",
                "-W",
                "60",
                "-m",
                "turn on the kitchen lights",
            ),
            timeout=90,
        )
    assert rc == 0, err
    reply = json.loads(out)
    assert reply["status"] == "ok", reply
    intent = {k: v for k, v in json.loads(reply["data"]["text"]).items() if v is not None}
    assert intent == {"intent": "turn_on", "device": "light", "room": "kitchen"}, intent
