"""``examples/`` work as shipped: ``request.json`` against the real daemon with curl, the
MQTT publisher against a real Mosquitto and that daemon (readings through a stream rule,
and a request with a correlated reply), and the Home Assistant snippet reads the topic and
fields the results actually arrive with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, daemon
from tests.transports.mqtt.conftest import Broker

pytestmark = pytest.mark.timeout(180)

EXAMPLES = ROOT / "examples"
DEVICE = "greenhouse-3"


def test_examples_against_a_real_daemon_and_broker(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    broker = Broker(tmp_path)
    broker.start()
    # No configuration: the default stream rule (sensors/+/telemetry) scores the readings.
    env = {
        "APPLIANCE_DEVICE__ID": DEVICE,
        "APPLIANCE_MQTT__ENABLED": "true",
        "APPLIANCE_MQTT__HOST": broker.host,
        "APPLIANCE_MQTT__PORT": str(broker.port),
    }
    try:
        with daemon(env=env) as box:
            # The README's curl line, with the shipped body.
            curl = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--fail-with-body",
                    "-H",
                    "Content-Type: application/json",
                    f"{box.url}/v2/models/sensor-anomaly/infer",
                    "-d",
                    f"@{EXAMPLES / 'request.json'}",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert curl.returncode == 0, curl.stdout + curl.stderr
            outputs = {o["name"]: o["data"] for o in json.loads(curl.stdout)["outputs"]}
            assert outputs["is_anomaly"] == [False]  # the example readings are normal

            publisher = [
                sys.executable,
                str(EXAMPLES / "mqtt_publisher.py"),
                "--host",
                broker.host,
                "--port",
                str(broker.port),
                "--device",
                DEVICE,
                "--wait",
                "60",
            ]
            readings = subprocess.run(
                [*publisher, "--sensor", "greenhouse", "--interval", "0.01"],
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert readings.returncode == 0, readings.stderr
            topic, _, payload = readings.stdout.strip().partition(" ")
            result = json.loads(payload)
            assert result["rule"] == "sensors" and result["readings"] == 32
            assert isinstance(result["outputs"]["score"], float) and not result["anomaly"]
            spiked = subprocess.run(
                [*publisher, "--sensor", "greenhouse", "--interval", "0.01", "--spike"],
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert spiked.returncode == 0, spiked.stderr
            assert json.loads(spiked.stdout.partition(" ")[2])["anomaly"] is True

            reply = subprocess.run(
                [*publisher, "--request"], capture_output=True, text=True, timeout=90, check=False
            )
            assert reply.returncode == 0, reply.stderr
            answer = json.loads(reply.stdout)
            assert answer.get("status", "ok") == "ok", answer
            assert "outputs" in json.dumps(answer)
    finally:
        broker.stop()

    # The Home Assistant snippet reads exactly that topic and those fields.
    snippet = yaml.safe_load((EXAMPLES / "homeassistant.yaml").read_text(encoding="utf-8"))
    entities = snippet["mqtt"]["sensor"] + snippet["mqtt"]["binary_sensor"]
    for entity in entities:
        assert entity["state_topic"].replace("DEVICE_ID", DEVICE) == topic
        assert entity["availability_topic"] == "appliance/DEVICE_ID/availability"
    assert "value_json.outputs.score" in snippet["mqtt"]["sensor"][0]["value_template"]
    assert "value_json.anomaly" in snippet["mqtt"]["binary_sensor"][0]["value_template"]
    assert "anomaly" in result
