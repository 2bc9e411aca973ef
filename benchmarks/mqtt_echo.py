"""The MQTT ceiling: a bare aiomqtt responder answering a canned reply.

It subscribes to a request filter as the appliance does (``<base>/infer/#`` at QoS 1,
MQTT 5), parses each request's payload with the appliance's own JSON reader
(:func:`appliance.protocol.strictjson.loads`) and publishes a fixed reply, the bytes the
appliance answered the same request with, to the request's response topic with its
correlation data and the same content type, at QoS 1 as the appliance publishes. Replies
are published concurrently (a task each), so its round trips/s is what aiomqtt and the
broker alone can do on this box.

Run as ``python -m benchmarks.mqtt_echo PORT FILTER REPLY_FILE``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.protocol.strictjson import loads


async def serve(port: int, topic_filter: str, reply: bytes) -> None:
    tasks: set[asyncio.Task[None]] = set()
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier="bench-echo", protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        client.pending_calls_threshold = 1 << 30  # no warning per publish beyond 10 at once
        await client.subscribe(topic_filter, options=SubscribeOptions(qos=1))
        async for message in client.messages:
            props = message.properties
            payload = message.payload
            loads(payload if isinstance(payload, bytes) else str(payload).encode())
            out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            out.ContentType = "application/json"
            out.PayloadFormatIndicator = 1
            out.CorrelationData = getattr(props, "CorrelationData", None)
            task = asyncio.create_task(
                client.publish(
                    getattr(props, "ResponseTopic", "bench/replies"),
                    reply,
                    qos=1,
                    properties=out,
                )
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)


def main() -> None:
    port, topic_filter, reply = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).read_bytes()
    asyncio.run(serve(port, topic_filter, reply))


if __name__ == "__main__":
    main()
