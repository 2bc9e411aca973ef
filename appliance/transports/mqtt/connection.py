"""One broker connection, kept alive forever: connect, serve, and reconnect with backoff.

The session is persistent (no clean start; MQTT 5 session expiry), so the broker keeps the
subscriptions and queues QoS 1 requests while the appliance is away. The last will is the
retained ``offline`` on the availability topic; a graceful stop publishes it itself. State
changes are logged once each, so a missing broker does not flood the journal.

Received messages are acknowledged by the application, not on receipt: every message comes
with a :class:`Delivery` whose ``ack()`` sends the PUBACK. aiomqtt 2 has no option for that,
so the connection switches on paho-mqtt's ``manual_ack`` on the paho client aiomqtt wraps
(``Client._client``, the one private attribute used; aiomqtt is pinned below 3, and 3 drops
paho). A message left unacknowledged when the connection ends is redelivered by the broker
on the next connect; acknowledgements are therefore only ever sent on the connection the
message came by.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import MqttConfig
from appliance.transports.mqtt.broker import client_options, mqtt_properties
from appliance.transports.mqtt.metrics import MqttMetrics
from appliance.transports.mqtt.outbox import Outgoing, PublishQueue

log = logging.getLogger(__name__)

_CONNECTION_GONE = (paho.MQTT_ERR_NO_CONN, paho.MQTT_ERR_CONN_LOST)
PUBLISH_WINDOW = 10  # awaiting the broker's acknowledgement at once (aiomqtt warns beyond)
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another client connected with our id


class Backoff:
    """Capped exponential backoff with jitter: each wait is 50-100 % of min(high, low·2ⁿ),
    so a fleet that lost its broker does not reconnect in lockstep."""

    def __init__(self, low: float, high: float, rng: Callable[[], float] = random.random):
        self.low = low
        self.high = high
        self._rng = rng
        self._failures = 0

    def next(self) -> float:
        ceiling = min(self.high, self.low * (1 << min(self._failures, 32)))
        self._failures += 1
        return ceiling * (0.5 + self._rng() / 2)

    def reset(self) -> None:
        self._failures = 0


# ------------------------------------------------------------------------ connection


class Delivery:
    """The acknowledgement of one received message: ``ack()`` sends it, at most once."""

    __slots__ = ("_send",)

    def __init__(self, send: Callable[[], None] | None) -> None:
        self._send = send  # None: QoS 0, or acknowledged already

    def ack(self) -> None:
        send, self._send = self._send, None
        if send is not None:
            send()


OnConnect = Callable[[aiomqtt.Client], Awaitable[None]]
OnMessage = Callable[[aiomqtt.Message, Delivery], None]


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _reason(exc: BaseException) -> int | None:
    """The MQTT reason code behind an aiomqtt error (it is often the cause of the error
    raised from message iteration), or ``None``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiomqtt.MqttCodeError) and seen.rc is not None:
            rc = seen.rc
            return int(rc.value) if isinstance(rc, ReasonCode) else int(rc)
        seen = seen.__cause__ or seen.__context__
    return None


class Connection:
    """Keeps the appliance connected. ``on_connect`` runs after every (re)connect (publish
    state, subscribe); ``on_message`` gets every message; the outbox drains while connected.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        will_topic: str,
        password: str | None,
        tls: ssl.SSLContext | None,
        outbox: PublishQueue,
        metrics: MqttMetrics,
        on_connect: OnConnect,
        on_message: OnMessage,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.will_topic = will_topic
        self.v5 = config.protocol == "5"
        self.broker = f"{'mqtts' if tls else 'mqtt'}://{config.host}:{config.port}"
        self._password = password
        self._tls = tls
        self._outbox = outbox
        self._metrics = metrics
        self._on_connect = on_connect
        self._on_message = on_message
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.state = "stopped"
        self.since = time.time()
        self.last_error: str | None = None
        self.connects = 0
        self._problem: str | None = None
        self._paho: paho.Client | None = None  # the connection messages may be acked on
        self._taken_over = False  # logged once until a connection ends another way

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="appliance-mqtt-connection")

    async def close(self) -> None:
        """Stop: drain the outbox (up to ``timeout``), publish ``offline``, disconnect."""
        self._closing.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 3 * self.config.timeout + 1)
        except asyncio.TimeoutError:
            log.warning("MQTT connection did not close in time; cutting it")
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(self.config.reconnect_min, self.config.reconnect_max)
        while not self._closing.is_set():
            self._set_state("connecting")
            try:
                client = aiomqtt.Client(
                    **client_options(
                        self.config,
                        client_id=self.client_id,
                        will_topic=self.will_topic,
                        password=self._password,
                        tls=self._tls,
                    )
                )
                # Requests are acknowledged once answered (see the module docstring).
                client._client.manual_ack_set(True)
                async with client:
                    self._paho = client._client
                    # aiomqtt keeps why the connection ended in a future that nothing awaits
                    # when the end is noticed elsewhere (a failed publish, a stop): mark it
                    # retrieved, or asyncio logs "Future exception was never retrieved".
                    client._disconnected.add_done_callback(_retrieved)
                    backoff.reset()
                    await self._on_connect(client)  # subscribed and announced: now connected
                    self._connected()
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                self._failed(exc)
            except Exception as exc:  # never let the MQTT side take the daemon down
                if repr(exc) != self._problem:
                    log.exception("MQTT connection failed unexpectedly")
                self._failed(exc, problem=repr(exc))
            finally:
                self._paho = None
            if self._closing.is_set():
                break
            # Taken over: reconnecting at once would take the session back and start a tug
            # of war with the other client; wait the longest backoff instead.
            wait = self.config.reconnect_max if self._taken_over else backoff.next()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), wait)
        self._set_state("stopped")
        self._metrics.mqtt_connected.set(0)
        if self._outbox.unsent():
            log.warning("MQTT stopped with %d unsent messages", self._outbox.unsent())

    async def _serve(self, client: aiomqtt.Client) -> None:
        reader = asyncio.create_task(self._read(client), name="appliance-mqtt-reader")
        writer = asyncio.create_task(self._write(client), name="appliance-mqtt-publisher")
        closing = asyncio.create_task(self._closing.wait(), name="appliance-mqtt-closing")
        tasks = {reader, writer, closing}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if closing not in done:
                for task in done:
                    task.result()  # the reason the connection ended (an MqttError)
                raise aiomqtt.MqttError("the MQTT session ended")
            # Stopping: what is queued (replies of finished requests) goes out first.
            drained = asyncio.create_task(self._outbox.drained(), name="appliance-mqtt-drain")
            tasks.add(drained)
            done, _ = await asyncio.wait(
                {drained, reader, writer},
                timeout=self.config.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if drained not in done:
                log.warning(
                    "MQTT stopping with %d messages not yet acknowledged by the broker",
                    self._outbox.unsent(),
                )
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            # A graceful disconnect does not fire the will: say goodbye ourselves.
            await client.publish(self.will_topic, b"offline", qos=1, retain=True)
            self._metrics.mqtt_published.labels("state").inc()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client) -> None:
        session = client._client
        async for message in client.messages:
            delivery = Delivery(
                functools.partial(self._ack, session, message.mid, message.qos)
                if message.qos > 0
                else None
            )
            try:
                self._on_message(message, delivery)
            except Exception:
                log.exception("MQTT message on %s could not be handled", message.topic.value)
                delivery.ack()  # it would fail the same way when redelivered

    def _ack(self, session: paho.Client, mid: int, qos: int) -> None:
        # A message of an earlier connection is redelivered by the broker: acknowledging its
        # old packet id on this connection would acknowledge some other message.
        if session is self._paho and self.connected:
            session.ack(mid, qos)

    async def _write(self, client: aiomqtt.Client) -> None:
        """Publish the outbox, :data:`PUBLISH_WINDOW` messages in flight (one at a time, the
        replies of concurrent requests would each wait a broker round trip), handed to paho
        in queue order, which the broker keeps. Raises why publishing stopped."""
        self._outbox.rewind()  # what the last connection left unacknowledged goes again
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        feeder = asyncio.create_task(self._feed(client, failed), name="appliance-mqtt-feed")
        try:
            await failed
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def _feed(self, client: aiomqtt.Client, failed: asyncio.Future[None]) -> None:
        window = asyncio.Semaphore(PUBLISH_WINDOW)
        publishing: set[asyncio.Task[None]] = set()

        async def publish(message: Outgoing) -> None:
            try:
                await self._publish(client, message)
            except Exception as exc:
                if not failed.done():
                    failed.set_exception(exc)
            finally:
                window.release()

        try:
            while True:
                await window.acquire()
                message = await self._outbox.next()
                task = asyncio.create_task(publish(message), name="appliance-mqtt-publish")
                publishing.add(task)
                task.add_done_callback(publishing.discard)
        finally:
            for task in publishing:
                task.cancel()
            await asyncio.gather(*publishing, return_exceptions=True)

    async def _publish(self, client: aiomqtt.Client, message: Outgoing) -> None:
        try:
            await client.publish(
                message.topic,
                message.payload,
                qos=1,
                retain=message.retain,
                properties=self._properties(message),
            )
        except aiomqtt.MqttCodeError as exc:
            if exc.rc in _CONNECTION_GONE:
                raise
            self._undeliverable(message, exc)  # e.g. larger than the broker allows
            return
        except ValueError as exc:  # paho refuses the message itself
            self._undeliverable(message, exc)
            return
        self._outbox.done(message)

    def _undeliverable(self, message: Outgoing, exc: Exception) -> None:
        log.error(
            "MQTT message to %s (%d bytes) cannot be published and is dropped: %s",
            message.topic,
            len(message.payload),
            exc,
        )
        self._outbox.done(message, delivered=False)  # counted as dropped

    def _properties(self, message: Outgoing) -> Properties | None:
        if not self.v5 or (message.content_type is None and message.correlation is None):
            return None
        properties = mqtt_properties(PacketTypes.PUBLISH)
        if message.content_type is not None:
            properties.ContentType = message.content_type
            if message.content_type == "application/json":
                properties.PayloadFormatIndicator = 1  # UTF-8 text
        if message.correlation is not None:
            properties.CorrelationData = message.correlation
        return properties

    # -- state ---------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()

    def _connected(self) -> None:
        self._set_state("connected")
        self.connects += 1
        self.last_error = None
        self._problem = None
        self._metrics.mqtt_connects.inc()
        self._metrics.mqtt_connected.set(1)
        log.info(
            "MQTT connected to %s as %s (MQTT %s)",
            self.broker,
            self.client_id,
            self.config.protocol,
        )

    def _failed(self, exc: Exception, problem: str | None = None) -> None:
        was_connected = self.state == "connected"
        text = str(exc) or type(exc).__name__
        key = problem or text
        self.last_error = text
        self._set_state("disconnected")
        self._metrics.mqtt_connected.set(0)
        self._metrics.mqtt_connect_failures.inc()
        taken_over = _reason(exc) == SESSION_TAKEN_OVER
        if taken_over:
            self.last_error = "session taken over by another client with the same client id"
        if self._closing.is_set():
            log.debug("MQTT connection ended while stopping: %s", text)
        elif taken_over:
            if not self._taken_over:
                log.warning(
                    "MQTT broker %s disconnected this appliance: session taken over (reason "
                    "0x8E), another client connected with the same client id %r. Give each "
                    "appliance its own device.id or mqtt.client_id; retrying every %gs",
                    self.broker,
                    self.client_id,
                    self.config.reconnect_max,
                )
            else:
                log.debug("MQTT session taken over again by another client as %r", self.client_id)
        elif was_connected:
            log.warning("MQTT connection to %s lost (%s); reconnecting", self.broker, text)
        elif key != self._problem:
            log.warning(
                "MQTT broker %s unavailable (%s); retrying with backoff up to %gs",
                self.broker,
                text,
                self.config.reconnect_max,
            )
        else:
            log.debug("MQTT broker %s still unavailable: %s", self.broker, text)
        self._problem = key
        self._taken_over = taken_over
