"""The MQTT transport as one lifecycle unit: wires the connection, requests, stream rules,
state documents and Home Assistant discovery together, and dispatches incoming messages.

Start-up never waits for the broker: the connection loop runs in the background and keeps
retrying, so HTTP serves whether the broker is there or not. Shutdown answers new requests
``unavailable``, lets running ones finish (``http.shutdown_timeout``), publishes what is
queued, then ``offline``, and disconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.config import Config
from appliance.core.service import Core
from appliance.errors import RequestError
from appliance.protocol import strictjson
from appliance.transports.mqtt import documents, homeassistant
from appliance.transports.mqtt.broker import mqtt_properties, read_password, tls_context
from appliance.transports.mqtt.connection import Connection, Delivery
from appliance.transports.mqtt.documents import HealthSource
from appliance.transports.mqtt.envelope import Format
from appliance.transports.mqtt.metrics import MqttMetrics
from appliance.transports.mqtt.outbox import Outgoing, PublishQueue, ReplyCache
from appliance.transports.mqtt.replies import Request
from appliance.transports.mqtt.requests import Requests
from appliance.transports.mqtt.rules import StreamRules
from appliance.transports.mqtt.topics import Topics

log = logging.getLogger(__name__)

# MQTT 5 subscription identifiers (rules take SUB_RULES + their filter's index).
SUB_REQUESTS, SUB_FLEET, SUB_HOMEASSISTANT, SUB_SELF, SUB_RULES = 1, 2, 3, 4, 16


class MqttTransport:
    """``async with MqttTransport(core, config, http_url=...)``: MQTT for one daemon."""

    def __init__(
        self,
        core: Core,
        config: Config,
        *,
        http_url: str,
        instance: str,
        health: HealthSource | None = None,
    ) -> None:
        self._core = core
        self._config = config
        self._http_url = http_url
        self._health = health
        mqtt = config.mqtt
        self.topics = Topics(
            base=mqtt.base_topic or f"appliance/{config.device.id}",
            fleet=mqtt.fleet_topic,
            shared_group=mqtt.shared_group,
            discovery_prefix=mqtt.discovery_prefix if mqtt.homeassistant else None,
        )
        # Daemons on one host share the device id (from /etc/machine-id); one on a state
        # directory of its own gets a client id of its own (``instance``: ops/instance.py's
        # instance_suffix), or the two would take each other's session over and back.
        self.client_id = mqtt.client_id or "-".join(
            filter(None, ("appliance", config.device.id, instance))
        )
        self._metrics = core.unit_metrics(MqttMetrics)
        self._outbox = PublishQueue(mqtt.reply_queue_size, self._metrics)
        self._requests = Requests(
            core, config, self.topics, self._outbox, ReplyCache(mqtt.dedup_ttl, mqtt.dedup_size)
        )
        rules = mqtt.effective_rules({m.name for m in core.list_models()})
        self._rules = StreamRules(
            rules,
            core,
            self._outbox,
            self.topics,
            config.device.id,
            on_alert=self._publish_alert,
            max_payload=mqtt.max_payload_bytes,
        )
        self._connection: Connection | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._cleanup: list[Callable[[], None]] = []
        self._alert_state: tuple[str, tuple[str, ...]] | None = None
        # Who this process is, in the retained info document: a daemon that finds another
        # one's there, with the device online, shares its device id and client id.
        self.instance = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "id": uuid.uuid4().hex[:12],
            "client_id": self.client_id,
        }
        self._retained_online = False
        self._twin_reported = False

    @property
    def connection(self) -> Connection:
        assert self._connection is not None, "the MQTT transport is not started"
        return self._connection

    # -- lifecycle -----------------------------------------------------------------

    async def __aenter__(self) -> MqttTransport:
        mqtt = self._config.mqtt
        # Both read files: off the loop, and before anything starts, so a bad path stops
        # start-up with a message naming the key.
        password = await asyncio.to_thread(read_password, mqtt)
        tls = await asyncio.to_thread(tls_context, mqtt) if mqtt.tls else None
        self._connection = Connection(
            mqtt,
            client_id=self.client_id,
            will_topic=self.topics.availability,
            password=password,
            tls=tls,
            outbox=self._outbox,
            metrics=self._metrics,
            on_connect=self._on_connect,
            on_message=self._on_message,
        )
        self._cleanup.append(self._core.add_status("mqtt", self.status))
        self._cleanup.append(self._core.add_model_listener(self._models_changed))
        self._rules.start()
        self._connection.start()
        if mqtt.stats_interval > 0:
            self._stats_task = asyncio.create_task(self._stats_loop(), name="appliance-mqtt-stats")
        log.info("MQTT transport for %s: base topic %s", self._connection.broker, self.topics.base)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._requests.begin_shutdown()
            await self._requests.wait(self._config.http.shutdown_timeout)
            if self._stats_task is not None:
                self._stats_task.cancel()
                await asyncio.gather(self._stats_task, return_exceptions=True)
            await self._rules.close()
            await self.connection.close()
        finally:
            for undo in reversed(self._cleanup):
                undo()
            self._cleanup.clear()

    def status(self) -> dict[str, Any]:
        """The ``mqtt`` entry of ``/health``."""
        connection = self.connection
        return {
            "state": connection.state,
            "broker": connection.broker,
            "client_id": self.client_id,
            "protocol": self._config.mqtt.protocol,
            "since": round(connection.since, 3),
            "connects": connection.connects,
            "last_error": connection.last_error,
            "outbox": len(self._outbox),
            "base_topic": self.topics.base,
        }

    # -- connect -------------------------------------------------------------------

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        """Subscribe, then announce: availability, info, stats, alert, discovery."""
        await self._subscribe(client)
        self._outbox.drop_state()  # what was queued while away is stale: publish afresh
        await self._publish_now(client, self.topics.availability, b"online")
        for message in self._state_messages() + self._discovery_messages():
            await self._publish_now(client, message.topic, message.payload)

    def _subscriptions(self) -> list[tuple[int, str, bool]]:
        """``(subscription identifier, filter, no local)`` for everything this unit hears.

        With MQTT 5 each filter gets its own identifier: a broker such as Mosquitto sends one
        copy of a message per matching subscription, and the identifier tells which one a
        copy is for, so overlapping filters never feed a reading (or a request) twice.
        """
        wanted = [
            (SUB_REQUESTS, self.topics.requests, False),
            # Our own retained state, read once per connect (see _check_twin).
            (SUB_SELF, self.topics.availability, False),
            (SUB_SELF, self.topics.info, False),
        ]
        if self.topics.shared_requests:
            wanted.append((SUB_FLEET, self.topics.shared_requests, False))
        if self.topics.homeassistant_status:
            wanted.append((SUB_HOMEASSISTANT, self.topics.homeassistant_status, False))
        # No Local: a rule never hears what this appliance publishes (its own results).
        wanted += [(SUB_RULES + i, topic, True) for i, topic in enumerate(self._rules.filters)]
        return wanted

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        wanted = self._subscriptions()
        if self.connection.v5:
            granted: list[Any] = []
            for identifier, topic, no_local in wanted:
                props = mqtt_properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = identifier
                granted += await client.subscribe(
                    topic, options=SubscribeOptions(qos=1, noLocal=no_local), properties=props
                )
        else:
            granted = list(await client.subscribe([(topic, 1) for _, topic, _ in wanted]))
        for (_, topic, _), code in zip(wanted, granted, strict=False):
            value = code.value if isinstance(code, ReasonCode) else code
            if isinstance(value, int) and value >= 0x80:
                log.warning("MQTT broker refused the subscription to %s (%s)", topic, code)

    async def _publish_now(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        await client.publish(topic, payload, qos=1, retain=True)
        self._metrics.mqtt_published.labels("state").inc()

    # -- incoming ------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message, delivery: Delivery) -> None:
        """Dispatch one message. A request is acknowledged to the broker once its reply is
        published (so one cut short by a crash is redelivered); anything else at once."""
        topic = message.topic.value
        payload = (
            message.payload
            if isinstance(message.payload, bytes)
            else bytes(str(message.payload or ""), "utf-8")
        )
        props = message.properties
        # MQTT 5: the subscriptions this copy is for; 3.1.1: unknown, go by topic.
        ids: set[int] | None = set(getattr(props, "SubscriptionIdentifier", None) or []) or None
        metrics = self._metrics
        target = self.topics.parse_request(topic)
        if target is not None and (ids is None or ids & {SUB_REQUESTS, SUB_FLEET}):
            if message.retain:
                # A retained request would run again on every reconnect.
                metrics.mqtt_rejected.labels("retained").inc()
                log.warning("MQTT: ignoring a retained request on %s", topic)
                delivery.ack()
                return
            metrics.mqtt_received.labels("request").inc()
            fmt = (
                target.format
                or Format.from_content_type(getattr(props, "ContentType", None))
                or Format.JSON
            )
            self._requests.submit(
                Request(
                    topic=topic,
                    model=target.model,
                    format=fmt,
                    payload=payload,
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation=getattr(props, "CorrelationData", None),
                    delivery=delivery,
                )
            )
            return
        delivery.ack()  # readings and control messages: handled on receipt
        if topic in (self.topics.availability, self.topics.info) and (
            ids is None or SUB_SELF in ids
        ):
            self._check_twin(topic, payload, retained=message.retain)
            return
        if topic == self.topics.homeassistant_status and (ids is None or SUB_HOMEASSISTANT in ids):
            metrics.mqtt_received.labels("control").inc()
            if payload.strip() == b"online":
                log.info("Home Assistant is online: announcing the device again")
                for item in self._discovery_messages():
                    self._outbox.put(item)
            return
        filters = None
        if ids is not None:
            names = self._rules.filters
            filters = {names[i - SUB_RULES] for i in ids if 0 <= i - SUB_RULES < len(names)}
        if filters != set() and self._rules.feed(
            topic, payload, retained=message.retain, filters=filters
        ):
            metrics.mqtt_received.labels("reading").inc()
        else:
            log.debug("MQTT: no handler for a message on %s", topic)

    def _check_twin(self, topic: str, payload: bytes, *, retained: bool) -> None:
        """Another daemon publishing as this device (same device id, so same topics): its
        info documents arrive live, or, on connect, retained while the device is ``online``
        (the broker hands over the retained availability, then info). With a client id of
        its own (another state directory) both stay connected, but both answer requests and
        their retained state flips; with the same one the broker hands the session back and
        forth (brokers that say so send reason 0x8E; Mosquitto 2.0 just closes)."""
        if topic == self.topics.availability:
            if retained:
                self._retained_online = payload.strip() == b"online"
            return
        online, self._retained_online = self._retained_online, False
        try:
            other = strictjson.loads(payload, what="the info document").get("instance")
        except (RequestError, AttributeError):
            return
        if not isinstance(other, dict) or other.get("id") == self.instance["id"]:
            return
        # Retained, it may be this daemon's previous run (killed and restarted before the
        # broker noticed): the same client id. Another client id online is another daemon.
        if retained and (not online or other.get("client_id") == self.client_id):
            return
        if not self._twin_reported:
            self._twin_reported = True
            log.warning(
                "MQTT: another appliance daemon (pid %s on %s, client id %r) is online as "
                "this device (device id %r, base topic %s): both answer its requests and "
                "its retained state flips between them. Give each its own device.id",
                other.get("pid"),
                other.get("host"),
                other.get("client_id"),
                self._config.device.id,
                self.topics.base,
            )

    # -- state documents -----------------------------------------------------------

    def _state(self, key: str, topic: str, document: dict[str, Any]) -> Outgoing:
        payload = json.dumps(document, separators=(",", ":")).encode()
        return Outgoing(
            topic, payload, "state", retain=True, key=key, content_type="application/json"
        )

    def _state_messages(self) -> list[Outgoing]:
        info = documents.info_document(
            self._core,
            device_id=self._config.device.id,
            device_name=self._config.device.name,
            http_url=self._http_url,
            topics=self.topics,
            protocol=self._config.mqtt.protocol,
        )
        info["instance"] = self.instance
        return [
            self._state("info", self.topics.info, info),
            self._state("stats", self.topics.stats, self._stats()),
            self._state("alert", self.topics.alert, self._alert_document()),
        ]

    def _discovery_messages(self) -> list[Outgoing]:
        if self.topics.discovery_prefix is None:
            return []
        entities = homeassistant.discovery(
            self.topics,
            device_id=self._config.device.id,
            device_name=self._config.device.name,
            http_url=self._http_url,
            models=self._core.list_models(),
            system=self._health is not None,
        )
        return [self._state(f"ha:{topic}", topic, payload) for topic, payload in entities]

    def _stats(self) -> dict[str, Any]:
        connection = self._connection
        mqtt = {
            "state": connection.state if connection else "stopped",
            "connects": connection.connects if connection else 0,
            "outbox": len(self._outbox),
        }
        health = self._health() if self._health is not None else None
        return documents.stats_document(self._core, health, mqtt)

    def _alert_document(self) -> dict[str, Any]:
        document = documents.alert_document(
            self._rules.anomalies, documents.firing_alerts(self._core)
        )
        self._alert_state = (document["state"], tuple(document["health_alerts"]))
        return document

    def _publish_alert(self) -> None:
        self._outbox.put(self._state("alert", self.topics.alert, self._alert_document()))

    def _models_changed(self) -> None:
        for message in self._state_messages()[:2]:  # info and stats
            self._outbox.put(message)

    async def _stats_loop(self) -> None:
        interval = self._config.mqtt.stats_interval
        while True:
            await asyncio.sleep(interval)
            if not self.connection.connected:
                continue  # a fresh document is published on reconnect
            self._outbox.put(self._state("stats", self.topics.stats, self._stats()))
            before = self._alert_state
            document = self._alert_document()
            if self._alert_state != before:  # a health alert started or stopped firing
                self._outbox.put(self._state("alert", self.topics.alert, document))
