"""A sensor for the appliance: publishes temperature, humidity and vibration readings.

Two ways to get anomaly scores back, both with the appliance's own virtual environment
(it has aiomqtt): ``.venv/bin/python examples/mqtt_publisher.py --help``.

- Readings, one JSON object per message, on ``sensors/<sensor>/telemetry``: the appliance's
  default stream rule (``sensors``, docs/mqtt.md) windows them and publishes a score
  per window under ``appliance/<device id>/rules/...``; this script prints those.
- ``--request``: one window of 32 readings as a request to
  ``appliance/<device id>/infer/sensor-anomaly``, and the correlated reply (MQTT 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid

import aiomqtt


def reading(i: int, *, spike: bool = False) -> dict[str, float]:
    """A reading of a quiet greenhouse, one a minute (what sensor-anomaly was trained on:
    models/README.md); ``spike`` puts the temperature sensor at an error value, 85 °C."""
    return {
        "temperature": 85.0 if spike else round(24.7 - 0.012 * i + random.gauss(0, 0.04), 3),
        "humidity": round(67.5 + 0.02 * i + random.gauss(0, 0.25), 3),
        "vibration": round(0.02 * (1 + random.gauss(0, 0.03)), 4),
    }


async def first_message(client: aiomqtt.Client, *, with_topic: bool) -> None:
    async for message in client.messages:
        text = message.payload.decode() if isinstance(message.payload, bytes) else str(
            message.payload)
        print(f"{message.topic} {text}" if with_topic else text)
        return


async def publish_readings(args: argparse.Namespace) -> None:
    topic = f"sensors/{args.sensor}/telemetry"
    results = f"appliance/{args.device}/rules/#"
    async with aiomqtt.Client(args.host, args.port, username=args.username,
                              password=args.password) as client:
        await client.subscribe(results)
        for i in range(args.count):
            spike = args.spike and i >= args.count - 8
            await client.publish(topic, json.dumps(reading(i, spike=spike)), qos=1)
            await asyncio.sleep(args.interval)
        print(f"published {args.count} readings to {topic}; waiting for results on {results}",
              file=sys.stderr)
        await asyncio.wait_for(first_message(client, with_topic=True), args.wait)


async def request(args: argparse.Namespace) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topic = f"appliance/{args.device}/infer/sensor-anomaly"
    reply_to = f"replies/{uuid.uuid4().hex}"
    window = [list(reading(i, spike=args.spike and i > 24).values()) for i in range(32)]
    body = {"inputs": [{"name": "window", "shape": [1, 32, 3], "datatype": "FP32",
                        "data": window}]}
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = reply_to
    properties.CorrelationData = uuid.uuid4().bytes
    async with aiomqtt.Client(args.host, args.port, username=args.username,
                              password=args.password,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(reply_to)
        await client.publish(topic, json.dumps(body), qos=1, properties=properties)
        await asyncio.wait_for(first_message(client, with_topic=False), args.wait)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="localhost", help="the broker (default: localhost)")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--username", default=None)
    parser.add_argument("--password", default=None)
    parser.add_argument("--device", required=True,
                        help="the appliance's device id (appliance config | grep id)")
    parser.add_argument("--sensor", default="greenhouse", help="this sensor's name in topics")
    parser.add_argument("--count", type=int, default=32, help="readings to publish")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between them")
    parser.add_argument("--spike", action="store_true",
                        help="the last 8 readings read 85 °C: an anomaly")
    parser.add_argument("--wait", type=float, default=30, help="seconds to wait for a result")
    parser.add_argument("--request", action="store_true",
                        help="send one window as a request and print the reply instead")
    args = parser.parse_args()
    try:
        asyncio.run(request(args) if args.request else publish_readings(args))
    except asyncio.TimeoutError:
        print(f"no answer within {args.wait:g} s", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        print(f"MQTT: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
