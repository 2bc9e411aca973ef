"""One WebSocket connection: read frames, run each request as a task, write replies.

The connection reads in its handler task only (as aiohttp requires) and runs every
``generate``, ``infer`` and ``embed`` as a named task of its own, held in a map by request
id, so a ``cancel`` can stop exactly that request and closing the connection stops all of
them. At most ``websocket.max_in_flight`` run at once per connection; the models' own queues
still bound the work across connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import msgpack
from aiohttp import WSMsgType, web

from appliance.config import WebSocketConfig
from appliance.core.service import Core
from appliance.core.toolcalls import CallCollector
from appliance.protocol import oip, oip_msgpack
from appliance.transports.ws import protocol
from appliance.transports.ws.errors import error_message, reply
from appliance.transports.ws.protocol import BadMessage, Cancel, Embed, Generate, Infer, Ping

log = logging.getLogger(__name__)

CANCELLED = 499  # status recorded in metrics for a request its client cancelled


class Connection:
    """The state of one WebSocket client."""

    def __init__(
        self, ws: web.WebSocketResponse, core: Core, config: WebSocketConfig, peer: str
    ) -> None:
        self.ws = ws
        self.core = core
        self.config = config
        self.peer = peer
        self._tasks: dict[Any, asyncio.Task[None]] = {}
        self._cancelling: set[Any] = set()

    async def serve(self) -> None:
        """Read until the client closes, then stop every request still running."""
        try:
            async for frame in self.ws:
                if frame.type is WSMsgType.TEXT:
                    await self._receive(frame.data, binary=False)
                elif frame.type is WSMsgType.BINARY:
                    await self._receive(frame.data, binary=True)
                elif frame.type is WSMsgType.ERROR:
                    # Too big (aiohttp has already closed with 1009) or a protocol error.
                    log.info("WebSocket %s: %s", self.peer, frame.data)
                    break
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- requests ---------------------------------------------------------------------

    async def _receive(self, data: str | bytes, *, binary: bool) -> None:
        try:
            request_id, message = protocol.decode(data)
        except BadMessage as bad:
            await self.send(error_message(bad.id, bad.error), binary=binary)
            return
        except Exception as exc:  # a bug in decoding must cost one message, not the socket
            await self.send(error_message(None, exc), binary=binary)
            return
        if isinstance(message, Ping):
            await self.send(protocol.pong(message.id), binary=binary)
        elif isinstance(message, Cancel):
            await self._cancel(message.id, binary=binary)
        elif isinstance(message, protocol.Models):
            await self.send(
                {
                    "type": "models",
                    "id": request_id,
                    "models": [_model(m) for m in self.core.list_models()],
                },
                binary=binary,
            )
        elif message.id in self._tasks:
            await self.send(
                reply(
                    message.id,
                    400,
                    f"a request with id {message.id!r} is already in flight on this connection",
                    param="id",
                ),
                binary=binary,
            )
        elif len(self._tasks) >= self.config.max_in_flight:
            await self.send(
                reply(
                    message.id,
                    429,
                    "too many requests in flight on this "
                    f"connection (at most {self.config.max_in_flight}); wait "
                    "for one to finish",
                    retry_after=1,
                ),
                binary=binary,
            )
        else:
            task = asyncio.create_task(
                self._run(message, binary), name=f"ws {self.peer} {message.type} {message.id!r}"
            )
            self._tasks[message.id] = task
            task.add_done_callback(lambda _: self._tasks.pop(message.id, None))

    async def _cancel(self, request_id: Any, *, binary: bool) -> None:
        task = self._tasks.get(request_id)
        if task is None:
            await self.send(
                reply(
                    request_id,
                    404,
                    f"no request with id {request_id!r} is in flight on this connection",
                    param="id",
                ),
                binary=binary,
            )
            return
        self._cancelling.add(request_id)
        task.cancel()

    async def _run(self, message: protocol.Work, binary: bool) -> None:
        """Serve one request; its replies or its one error go back in its frame kind."""
        started = time.perf_counter()
        status = 200
        try:
            if isinstance(message, Generate):
                await self._generate(message, binary)
            elif isinstance(message, Infer):
                await self._infer(message, binary)
            elif isinstance(message, Embed):
                await self._embed(message, binary)
        except asyncio.CancelledError:
            if message.id not in self._cancelling:
                raise  # the connection is closing: nobody to tell
            self._cancelling.discard(message.id)
            status = CANCELLED
            await self.send(protocol.cancelled(message.id), binary=binary)
        except Exception as exc:
            error = error_message(message.id, exc)
            status = error["status"]
            await self.send(error, binary=binary)
        finally:
            self._count(message, status, time.perf_counter() - started)

    async def _generate(self, message: Generate, binary: bool) -> None:
        stream = await self.core.generate(message.model, message.to_core())
        calls = CallCollector()
        async with stream:
            async for chunk in stream:
                calls.add(chunk)
                if chunk.finish_reason is not None:
                    made = calls.calls() if chunk.finish_reason == "tool_calls" else None
                    await self.send(
                        protocol.done(
                            message.id,
                            chunk.finish_reason,
                            chunk.prompt_tokens,
                            chunk.completion_tokens,
                            made,
                        ),
                        binary=binary,
                    )
                    continue
                if chunk.text:
                    await self.send(protocol.token(message.id, chunk.text), binary=binary)
                for delta in chunk.tool_calls:
                    await self.send(protocol.tool_call(message.id, delta), binary=binary)

    async def _infer(self, message: Infer, binary: bool) -> None:
        body = message.oip_body()
        decoded = oip_msgpack.decode_request(body) if binary else oip.decode_request(body)
        result = await self.core.infer(
            message.model, decoded.inputs, version=message.version, outputs=decoded.outputs
        )
        if binary:
            outputs = oip_msgpack.encode_outputs_msgpack(result.outputs)
        else:
            outputs, _ = oip.encode_outputs(result.outputs, set())
        info = self.core.model(message.model, message.version)
        await self.send(
            {
                "type": "result",
                "id": message.id,
                "model": info.name,
                "model_version": info.version,
                "outputs": outputs,
            },
            binary=binary,
        )

    async def _embed(self, message: Embed, binary: bool) -> None:
        result = await self.core.embed(message.model, message.texts())
        await self.send(
            {
                "type": "embeddings",
                "id": message.id,
                "model": message.model,
                "data": result.vectors,
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "total_tokens": result.prompt_tokens,
                },
            },
            binary=binary,
        )

    # -- output -----------------------------------------------------------------------

    async def send(self, message: dict[str, Any], *, binary: bool) -> None:
        """Write one message; a connection that is already closing drops it."""
        if self.ws.closed:
            return
        try:
            if binary:
                await self.ws.send_bytes(msgpack.packb(message, use_bin_type=True))
            else:
                await self.ws.send_str(json.dumps(message, ensure_ascii=False))
        except ConnectionError:
            log.debug("WebSocket %s went away while a reply was sent", self.peer)

    def _count(self, message: protocol.Work, status: int, seconds: float) -> None:
        self.core.count_request("ws", message.type, message.model, str(status), seconds)


def _model(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "runtime": info.runtime,
        "state": info.state.value,
        "capabilities": sorted(c.value for c in info.capabilities),
    }
