"""Stream rules fed by sensors publishing readings through a real broker (``mosquitto_pub``),
run through real models, results and anomalies read back with a real subscriber."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from appliance.core.types import ModelState
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
FIELDS = ["temperature", "humidity", "vibration"]


def readings(rows: list[list[float]]) -> list[str]:
    """One JSON reading per row, nested the way many sensors publish them."""
    return [
        json.dumps({"temperature": t, "humidity": h, "vibration": v, "battery": 87})
        for t, h, v in rows
    ]


async def publish_lines(broker: Broker, topic: str, lines: list[str]) -> None:
    """A sensor: ``mosquitto_pub -l`` publishes each stdin line as one message, in order."""
    rc, _, err = await run_tool(
        *broker.cli("mosquitto_pub", "-q", "1", "-t", topic, "-l"),
        stdin=("\n".join(lines) + "\n").encode(),
    )
    assert rc == 0, err


@pytest.fixture
def mean_model(tmp_path: Path) -> Path:
    """A tiny ONNX model over 8 single-channel readings: their mean, anomalous above 50."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("Greater", ["mean", "limit"], ["is_anomaly"]),
        ],
        "mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["batch"]),
        ],
        [helper.make_tensor("limit", TensorProto.FLOAT, [], [50.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "mean8.onnx"
    onnx.save(model, str(path))
    return path


async def test_sensor_readings_are_windowed_per_source_and_anomalies_published(
    broker: Broker, paho_clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.transports.mqtt")
    watcher = paho_clients(broker)
    for topic in (
        "appliance/rule-box/rules/#",
        "appliance/rule-box/anomalies/#",
        "appliance/rule-box/alert",
        "results/#",
    ):
        watcher.subscribe(topic)
    rules: list[dict[str, Any]] = [
        {"name": "env", "topic": "sensors/+/telemetry", "fields": FIELDS},
        {
            "name": "copy",
            "topic": "sensors/kitchen/#",
            "fields": FIELDS,
            "output": "results/{1}/{rule}",
            "anomaly_output": "",
        },
    ]
    async with appliance(broker, device="rule-box", mqtt={"rules": rules}) as server:
        kitchen = readings(window())
        # Unusable readings in between: counted, logged once for the source, never fatal.
        kitchen[5:5] = [
            "not a number",
            json.dumps({"temperature": "hot"}),
            json.dumps({"humidity": 50}),
        ]
        await publish_lines(broker, "sensors/kitchen/telemetry", kitchen)
        await publish_lines(broker, "sensors/garage/telemetry", readings(window(anomalous=True)))
        results = await watcher.wait("appliance/rule-box/rules/env/#", 2)
        anomalies = await watcher.wait("appliance/rule-box/anomalies/#")
        copied = await watcher.wait("results/kitchen/copy")
        await until(
            lambda: any(m.json()["state"] == "ON" for m in watcher.on("appliance/rule-box/alert"))
        )
        bad = server.metrics.registry.get_sample_value(
            "appliance_mqtt_rule_bad_readings_total", {"rule": "env"}
        )
    by_topic = {m.topic: m.json() for m in results}
    kitchen_result = by_topic["appliance/rule-box/rules/env/sensors/kitchen/telemetry"]
    garage_result = by_topic["appliance/rule-box/rules/env/sensors/garage/telemetry"]
    assert kitchen_result["rule"] == "env"
    assert kitchen_result["source"] == "sensors/kitchen/telemetry"
    assert kitchen_result["readings"] == 32
    assert kitchen_result["anomaly"] is False
    assert kitchen_result["outputs"]["score"] < 1.0
    assert garage_result["anomaly"] is True
    assert garage_result["outputs"]["is_anomaly"] is True
    assert [m.topic for m in anomalies] == [
        "appliance/rule-box/anomalies/env/sensors/garage/telemetry"
    ]
    assert copied[0].json()["rule"] == "copy"
    assert not watcher.on("results/garage/#")  # the copy rule only hears the kitchen
    alert = next(
        m.json() for m in watcher.on("appliance/rule-box/alert") if m.json()["state"] == "ON"
    )
    assert alert["anomalies"][0]["source"] == "sensors/garage/telemetry"
    assert bad == 3
    warnings = [
        r.getMessage()
        for r in caplog.records
        if "sensors/kitchen/telemetry" in r.getMessage() and "rule env" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings


async def test_plain_number_readings_with_a_sliding_window(
    broker: Broker, paho_clients: Clients, mean_model: Path
) -> None:
    watcher = paho_clients(broker)
    watcher.subscribe("power/#")
    rules = [
        {
            "name": "power",
            "topic": "meters/+/watts",
            "model": "mean8",
            "window": 8,
            "hop": 4,
            "output": "power/{1}/mean",
            "anomaly_output": "power/{1}/alarm",
        }
    ]
    models = {"dir": str(DEFAULT_MODELS), "files": [str(mean_model)]}
    async with appliance(broker, device="num-box", models=models, mqtt={"rules": rules}):
        values = [str(v) for v in range(10, 170, 10)]  # 16 readings: 10, 20, ... 160
        await publish_lines(broker, "meters/m1/watts", [*values[:3], "NaN", *values[3:]])
        means = await watcher.wait("power/m1/mean", 3)
        alarms = await watcher.wait("power/m1/alarm", 2)
    # Full after 8 readings, then every 4: windows 10..80, 50..120, 90..160.
    assert [m.json()["outputs"]["mean"] for m in means] == [45.0, 85.0, 125.0]
    assert [m.json()["outputs"]["is_anomaly"] for m in means] == [False, True, True]
    assert len(alarms) == 2


async def test_a_rule_loads_its_idle_unloaded_model_again(
    broker: Broker, paho_clients: Clients, mean_model: Path
) -> None:
    """keep_alive unloads an idle model; the next full window loads it again, as an HTTP
    request would, instead of being dropped."""
    watcher = paho_clients(broker)
    watcher.subscribe("power/#")
    rules = [
        {
            "name": "power",
            "topic": "meters/+/watts",
            "model": "mean8",
            "window": 8,
            "output": "power/{1}/mean",
        }
    ]
    models = {"dir": str(DEFAULT_MODELS), "files": [str(mean_model)], "keep_alive": 0.2}
    async with appliance(broker, device="idle-box", models=models, mqtt={"rules": rules}) as server:
        assert server.core is not None
        core = server.core
        await until(lambda: core.model("mean8").state is ModelState.UNLOADED)
        await publish_lines(broker, "meters/m2/watts", [str(v) for v in range(10, 90, 10)])
        (mean,) = await watcher.wait("power/m2/mean")
        dropped = server.metrics.registry.get_sample_value(
            "appliance_mqtt_rule_windows_total", {"rule": "power", "result": "dropped"}
        )
    assert mean.json()["outputs"]["mean"] == 45.0
    assert not dropped


async def test_a_sensor_gets_anomaly_scores_with_zero_configuration(
    broker: Broker, paho_clients: Clients
) -> None:
    """The default models and no rules: the built-in rule 'sensors' scores JSON readings
    published on sensors/+/telemetry; ``mqtt.sensor_rule = false`` turns it off."""
    client = paho_clients(broker)
    client.subscribe("appliance/zero-box/#")
    async with appliance(broker, device="zero-box", models={"dir": str(DEFAULT_MODELS)}):
        await publish_lines(broker, "sensors/kitchen/telemetry", readings(window()))
        await publish_lines(broker, "sensors/boiler/telemetry", readings(window(True)))
        kitchen = (await client.wait("appliance/zero-box/rules/sensors/sensors/kitchen/telemetry"))[
            0
        ].json()
        boiler = (await client.wait("appliance/zero-box/rules/sensors/sensors/boiler/telemetry"))[
            0
        ].json()
        anomaly = (await client.wait("appliance/zero-box/anomalies/sensors/#"))[0]
    assert kitchen["model"] == "sensor-anomaly" and kitchen["readings"] == 32
    assert kitchen["anomaly"] is False and boiler["anomaly"] is True
    assert anomaly.topic.endswith("sensors/boiler/telemetry")
    quiet = paho_clients(broker)
    quiet.subscribe("appliance/off-box/#")
    async with appliance(
        broker, device="off-box", models={"dir": str(DEFAULT_MODELS)}, mqtt={"sensor_rule": False}
    ):
        await publish_lines(broker, "sensors/kitchen/telemetry", readings(window()))
        await quiet.wait("appliance/off-box/info")
        # A request answered after the readings shows they were heard and not scored.
        quiet.publish(
            "appliance/off-box/infer/sensor-anomaly",
            json.dumps({"data": window()}),
            response_topic="replies/off",
            correlation=b"1",
        )
        quiet.subscribe("replies/off")
        quiet.publish(
            "appliance/off-box/infer/sensor-anomaly",
            json.dumps({"data": window()}),
            response_topic="replies/off",
            correlation=b"2",
        )
        await quiet.wait("replies/off")
    assert not quiet.on("appliance/off-box/rules/#")
