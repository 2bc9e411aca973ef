"""Request/response over MQTT: parse → call the core → publish the reply envelope.

Every request runs in its own task, so a slow model never stalls the MQTT loop. Where its
replies go and how they are built is :mod:`appliance.transports.mqtt.replies`.

A request is acknowledged to the broker only once its final reply has been acknowledged by
the broker, so one that was running when the daemon was killed is delivered again. Copies
(the broker redelivering, a client retrying) are told apart by correlation data or ``id``:
one still running is not run again (the copy is acknowledged with the original's reply),
one answered already gets the same reply again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

from appliance.config import Config
from appliance.core.service import Core, TokenStream
from appliance.core.toolcalls import CallCollector
from appliance.core.types import TokenChunk
from appliance.errors import Overloaded, PayloadTooLarge, RequestError, ShuttingDown
from appliance.transports.mqtt import envelope, forms
from appliance.transports.mqtt.envelope import Format
from appliance.transports.mqtt.metrics import MqttMetrics
from appliance.transports.mqtt.outbox import Outgoing, PublishQueue, ReplyCache, StreamGaps
from appliance.transports.mqtt.replies import Replies, ReplyTo, Request
from appliance.transports.mqtt.topics import Topics

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 256


class Requests:
    """Runs requests and publishes their replies through the outbox."""

    def __init__(
        self,
        core: Core,
        config: Config,
        topics: Topics,
        outbox: PublishQueue,
        cache: ReplyCache,
    ) -> None:
        self._core = core
        self._config = config
        self._mqtt = config.mqtt
        self._topics = topics
        self._outbox = outbox
        self._cache = cache
        self._device = config.device.id
        self._replies = Replies(topics, outbox, cache, self._device)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def submit(self, request: Request) -> None:
        task = asyncio.create_task(
            self._handle(request), name=f"appliance-mqtt-request-{request.model}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def begin_shutdown(self) -> None:
        """New requests are answered ``unavailable`` from now on."""
        self._closing = True

    async def wait(self, timeout: float) -> None:
        """Let running requests finish for up to ``timeout`` seconds, then cancel them."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- one request -------------------------------------------------------------------

    async def _handle(self, request: Request) -> None:
        started = time.perf_counter()
        reply: ReplyTo | None = None
        request_id: Any = None
        key: Hashable | None = None
        ack = request.delivery.ack
        model, route, status = "", "infer", "ok"
        try:
            reply = self._replies.address(request)
            size = len(request.payload)
            if size > self._mqtt.max_payload_bytes:
                raise PayloadTooLarge(
                    f"the payload is {size} bytes; at most {self._mqtt.max_payload_bytes} are "
                    "accepted",
                    param="payload",
                )
            if not request.model:
                raise RequestError(
                    f"request topics are {self._topics.base}/infer/<model>, optionally followed "
                    "by /msgpack",
                    param="topic",
                )
            if self._config.logging.log_payloads:
                log.debug("MQTT request on %s: %r", request.topic, request.payload[:2048])
            body = envelope.decode(request.payload, request.format, allow_text=True)
            if isinstance(body, dict):
                request_id = _request_id(body)
                if reply is None and body.get("reply_to") is not None:
                    reply = self._replies.reply_to(body["reply_to"])
            if self._closing:
                raise ShuttingDown("the appliance is shutting down")
            if len(self._tasks) > self._mqtt.max_inflight:
                raise Overloaded(request.model, self._config.models.retry_after)
            key = _dedup_key(reply, request, request_id)
            if key is not None and not self._first_time(key, ack):
                status = "duplicate"
                return
            info = self._core.model(request.model)
            model = request.model
            call = forms.parse(body, info, binary=request.format is Format.MSGPACK)
            if isinstance(call, forms.TensorCall):
                result = await self._core.infer(model, call.inputs, outputs=call.outputs)
                data = forms.tensor_reply(call, info, result)
                final = self._replies.ok(request, reply, request_id, data, "reply")
            elif isinstance(call, forms.GenerateCall):
                route = "generate"
                stream = await self._core.generate(model, call.request)
                final, status = await self._stream(request, reply, request_id, stream, call.stream)
            else:
                route = "embed"
                embedded = await self._core.embed(model, call.texts)
                data = {
                    "embeddings": embedded.vectors,
                    "usage": {"prompt_tokens": embedded.prompt_tokens},
                }
                final = self._replies.ok(request, reply, request_id, data, "reply")
            self._replies.settle(key, final, ack, cache=status not in envelope.RETRYABLE)
        except asyncio.CancelledError as exc:
            status = "unavailable"
            if isinstance(exc, _Answered):
                self._replies.settle(key, exc.message, ack, cache=False)
            else:
                self._replies.fail(request, reply, request_id, key, _stopped(), ack)
            raise
        except Exception as exc:
            status = self._replies.fail(request, reply, request_id, key, exc, ack)
        finally:
            self._core.count_request("mqtt", route, model, status, time.perf_counter() - started)

    async def _stream(
        self,
        request: Request,
        reply: ReplyTo | None,
        request_id: Any,
        stream: TokenStream,
        chunked: bool,
    ) -> tuple[Outgoing, str]:
        """Run a generation; with ``chunked`` publish each piece as it comes (``seq`` 0, 1 ...)
        and end with ``done: true``. Returns the final message and the metrics status.

        A piece whose predecessor is still waiting in the outbox (the broker is slow or away)
        is merged into it instead of queued behind it, so a stream never floods the outbox:
        slower links simply get fewer, larger chunks, still numbered without gaps. A chunk
        the appliance had to drop (outbox full) is named in the final message, which says
        ``complete: false`` and lists the ``gaps``; its ``text`` is whole either way.
        """
        parts: list[str] = []
        last: TokenChunk | None = None
        seq = 0
        waiting: Outgoing | None = None  # the latest chunk, if it may still be merged into
        waiting_text = ""
        gaps = StreamGaps(self._outbox)
        calls = CallCollector()
        async with stream:
            try:
                async for chunk in stream:
                    calls.add(chunk)
                    if chunk.finish_reason is not None:
                        last = chunk
                        continue
                    if not chunk.text:
                        continue
                    parts.append(chunk.text)
                    if not chunked:
                        continue
                    if waiting is not None:
                        merged = self._replies.message(
                            request,
                            reply,
                            envelope.ok(
                                {"text": waiting_text + chunk.text},
                                request_id=request_id,
                                device=self._device,
                                seq=seq - 1,
                                done=False,
                            ),
                            "chunk",
                        )
                        if self._outbox.replace(waiting, merged):
                            waiting, waiting_text = merged, waiting_text + chunk.text
                            continue
                    waiting = self._replies.ok(
                        request,
                        reply,
                        request_id,
                        {"text": chunk.text},
                        "chunk",
                        seq=seq,
                        done=False,
                        on_drop=gaps.dropper(seq),
                    )
                    waiting_text = chunk.text
                    seq += 1
            except (Exception, asyncio.CancelledError) as exc:
                if seq == 0:
                    raise  # nothing sent yet: an ordinary error reply
                cancelled = isinstance(exc, asyncio.CancelledError)
                if not cancelled:
                    log.error(
                        "generation failed mid-stream on model %s", request.model, exc_info=exc
                    )
                body = envelope.error_body(_stopped() if cancelled else exc)
                failed = gaps.final(
                    lambda extra: self._replies.send(
                        request,
                        reply,
                        envelope.failure(
                            body,
                            request_id=request_id,
                            device=self._device,
                            seq=seq,
                            done=True,
                            **extra,
                        ),
                        "chunk",
                        error=True,
                        queue=False,
                    )
                )
                if cancelled:
                    raise _Answered(failed) from exc  # the stream is closed: stop
                return failed, str(body["code"])
        assert last is not None
        data: dict[str, Any] = {
            "text": "".join(parts),
            "finish_reason": last.finish_reason,
            "usage": {
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens,
            },
        }
        if last.finish_reason == "tool_calls":
            data["tool_calls"] = [
                {"id": c.id, "name": c.name, "arguments": dict(c.arguments)} for c in calls.calls()
            ]
        if not chunked:
            return self._replies.ok(request, reply, request_id, data, "reply"), "ok"
        final = gaps.final(
            lambda extra: self._replies.ok(
                request, reply, request_id, data, "chunk", seq=seq, done=True, queue=False, **extra
            )
        )
        return final, "ok"

    # -- copies ----------------------------------------------------------------------

    def _first_time(self, key: Hashable, ack: Callable[[], None]) -> bool:
        seen = self._cache.begin(key, waiter=ack)
        if seen is True:
            return True
        self._core.unit_metrics(MqttMetrics).mqtt_duplicates.inc()
        if seen is not False:  # answered already: answer again, do not run again
            for message in seen:
                self._outbox.put(message)
            self._outbox.when_sent(seen[-1], ack)
        # (Still running: ``ack`` runs with the original's reply.)
        log.info("MQTT duplicate request %r answered from the reply cache", key)
        return False


class _Answered(asyncio.CancelledError):
    """Cancelled, and the client has already been told (a stream's final message)."""

    def __init__(self, message: Outgoing) -> None:
        super().__init__()
        self.message = message


def _stopped() -> ShuttingDown:
    return ShuttingDown("the appliance stopped before finishing this request")


def _request_id(body: dict[str, Any]) -> Any:
    value = body.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError("'id' must be a string or an integer", param="id")
    if isinstance(value, str) and len(value) > MAX_ID_LENGTH:
        raise RequestError(f"'id' is longer than {MAX_ID_LENGTH} characters", param="id")
    return value


def _dedup_key(reply: ReplyTo | None, request: Request, request_id: Any) -> Hashable | None:
    """Who asked and under which id; ``None`` when the request cannot be told apart."""
    topic = reply.topic if reply is not None else ""
    if reply is not None and reply.correlation is not None:
        return (request.model, topic, "correlation", reply.correlation)
    if request_id is not None:
        return (request.model, topic, "id", request_id)
    return None
