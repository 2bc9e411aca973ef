"""What a request's replies look like and where they go.

MQTT 5 requests name a response topic (and correlation data, echoed); MQTT 3.1.1 requests
carry ``reply_to`` (and ``id``, echoed) in the payload. A successful request with neither is
answered on ``<base>/result/<model>``; an error that has no reply topic to go to is
published on ``<base>/error`` (always JSON) with the request topic. A reply topic inside the
request space is refused, since the reply would come back as a request.

:meth:`Replies.settle` makes a message the request's last word: the reply cache remembers it
(unless the failure is worth a retry), and the request, with any copies that came
meanwhile, is acknowledged to the broker once the message is published.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import RequestError
from appliance.transports.mqtt import envelope
from appliance.transports.mqtt.connection import Delivery
from appliance.transports.mqtt.envelope import Format
from appliance.transports.mqtt.outbox import Outgoing, PublishQueue, ReplyCache
from appliance.transports.mqtt.topics import Topics, valid_topic_name


@dataclass(frozen=True)
class Request:
    """A request as it arrived."""

    topic: str
    model: str  # "" when the topic is malformed
    format: Format
    payload: bytes
    response_topic: str | None = None  # MQTT 5
    correlation: bytes | None = None  # MQTT 5
    # Acknowledges the request to the broker; called once its reply is out.
    delivery: Delivery = field(default_factory=lambda: Delivery(None))


@dataclass(frozen=True)
class ReplyTo:
    topic: str
    correlation: bytes | None


class Replies:
    """Builds, addresses and queues the replies of requests."""

    def __init__(
        self, topics: Topics, outbox: PublishQueue, cache: ReplyCache, device: str
    ) -> None:
        self._topics = topics
        self._outbox = outbox
        self._cache = cache
        self._device = device

    def address(self, request: Request) -> ReplyTo | None:
        if request.response_topic is None:
            return None
        return self.reply_to(request.response_topic, correlation=request.correlation)

    def reply_to(self, topic: Any, *, correlation: bytes | None = None) -> ReplyTo:
        if not isinstance(topic, str) or not valid_topic_name(topic):
            raise RequestError(
                "'reply_to' must be a topic name without wildcards", param="reply_to"
            )
        if self._topics.is_request_space(topic):
            raise RequestError(
                f"reply topic {topic!r} is a request topic; replies there would loop",
                param="reply_to",
            )
        return ReplyTo(topic, correlation)

    def settle(
        self, key: Hashable | None, message: Outgoing, ack: Callable[[], None], *, cache: bool
    ) -> None:
        """``message`` is the request's last word: remember it (``cache``) or let a retry run,
        and acknowledge the request, and copies that came meanwhile, once it is published."""
        waiters: list[Callable[[], None]] = []
        if key is not None:
            waiters = self._cache.finish(key, [message]) if cache else self._cache.forget(key)
        for callback in (ack, *waiters):
            self._outbox.when_sent(message, callback)

    def ok(
        self,
        request: Request,
        reply: ReplyTo | None,
        request_id: Any,
        data: dict[str, Any],
        kind: str,
        *,
        queue: bool = True,
        on_drop: Callable[[], None] | None = None,
        **extra: Any,
    ) -> Outgoing:
        body = envelope.ok(data, request_id=request_id, device=self._device, **extra)
        return self.send(request, reply, body, kind, queue=queue, on_drop=on_drop)

    def fail(
        self,
        request: Request,
        reply: ReplyTo | None,
        request_id: Any,
        key: Hashable | None,
        exc: BaseException,
        ack: Callable[[], None],
    ) -> str:
        """Publish the error reply for ``exc``; returns its code (the metrics status)."""
        body = envelope.error_body(exc)
        message = self.send(
            request,
            reply,
            envelope.failure(body, request_id=request_id, device=self._device),
            "reply",
            error=True,
        )
        # A retryable failure is not remembered: a retry should really run.
        self.settle(key, message, ack, cache=body["code"] not in envelope.RETRYABLE)
        return str(body["code"])

    def send(
        self,
        request: Request,
        reply: ReplyTo | None,
        body: dict[str, Any],
        kind: str,
        *,
        error: bool = False,
        queue: bool = True,
        on_drop: Callable[[], None] | None = None,
    ) -> Outgoing:
        """The message for ``body``, queued unless ``queue`` is false."""
        message = self.message(request, reply, body, kind, error=error)
        if queue:
            self._outbox.put(message, on_drop=on_drop)
        return message

    def message(
        self,
        request: Request,
        reply: ReplyTo | None,
        body: dict[str, Any],
        kind: str,
        *,
        error: bool = False,
    ) -> Outgoing:
        fmt = request.format
        if reply is not None:
            topic, correlation = reply.topic, reply.correlation
        elif error:
            # The shared error topic always speaks JSON and says which request failed.
            topic, correlation, fmt = self._topics.error, None, Format.JSON
            body = {**body, "topic": request.topic}
        else:
            topic, correlation = self._topics.result(request.model), None
        return Outgoing(
            topic=topic,
            payload=envelope.encode(body, fmt),
            kind=kind,
            content_type=fmt.content_type,
            correlation=correlation,
        )


__all__ = ["Replies", "ReplyTo", "Request"]
