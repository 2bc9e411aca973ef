"""OpenAI-compatible routes: models, chat completions, completions, embeddings.

Handlers parse and validate the body, call the core and serialise; streaming answers are
Server-Sent Events ending in ``data: [DONE]``. The first token is awaited before the
response starts, so a request the model rejects still gets a proper 4xx status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import numpy as np
from aiohttp import web
from pydantic import BaseModel
from pydantic_core import to_json

from appliance.core.repository import model_ref
from appliance.core.service import TokenStream
from appliance.core.toolcalls import CallCollector
from appliance.core.types import ModelState, TokenChunk, ToolCallDelta
from appliance.errors import ApplianceError
from appliance.transports.http.errors import read_json
from appliance.transports.http.keys import CONFIG, CORE, MODEL
from appliance.transports.http.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    FunctionCall,
    FunctionDelta,
    ModelCard,
    ModelList,
    ToolCallDeltaOut,
    ToolCallOut,
    Usage,
    parse,
)

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    core = request.app[CORE]
    owner = request.app[CONFIG].device.id
    cards = [
        ModelCard(id=m.name, created=m.created, owned_by=owner, state=m.state.value)
        for m in core.list_models()
        if m.state is not ModelState.FAILED
    ]
    return _json(ModelList(data=cards))


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    info = request.app[CORE].model(*model_ref(request.match_info["model"]))
    owner = request.app[CONFIG].device.id
    return _json(
        ModelCard(id=info.name, created=info.created, owned_by=owner, state=info.state.value)
    )


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    body: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
    name, version = model_ref(body.model)
    request[MODEL] = name
    stream = await request.app[CORE].generate(name, body.to_core(), version=version)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if not body.stream:
        parts: list[TokenChunk] = []
        text, last = await _collect(stream, parts)
        # Only whole calls are answered; one cut short by max_tokens ends as "length".
        calls = _calls(parts) if last.finish_reason == "tool_calls" else []
        message = (
            AssistantMessage(content=text or None, tool_calls=calls or None)
            if calls
            else AssistantMessage(content=text)
        )
        return _json(
            ChatCompletion(
                id=ident,
                created=created,
                model=body.model,
                choices=[ChatChoice(message=message, finish_reason=last.finish_reason)],
                usage=_usage(last),
            )
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def event(chunk: TokenChunk | None, *, role: bool = False) -> BaseModel:
        if chunk is None:  # the usage-only event at the end
            return ChatCompletionChunk(id=ident, created=created, model=body.model, choices=[])
        delta = (
            Delta(role="assistant", content="")
            if role
            else Delta(
                content=chunk.text if chunk.text or not chunk.tool_calls else None,
                tool_calls=[_delta(d) for d in chunk.tool_calls] or None,
            )
        )
        if chunk.finish_reason is not None:
            delta = Delta()  # the final chunk carries no text (runtimes and the core agree)
        return ChatCompletionChunk(
            id=ident,
            created=created,
            model=body.model,
            choices=[ChunkChoice(delta=delta, finish_reason=chunk.finish_reason)],
        )

    return await _sse(request, stream, event, include_usage, opening=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    body: CompletionRequest = parse(CompletionRequest, await read_json(request))
    name, version = model_ref(body.model)
    request[MODEL] = name
    stream = await request.app[CORE].generate(name, body.to_core(), version=version)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prefix = body.prompt_text() if body.echo else ""

    if not body.stream:
        text, last = await _collect(stream)
        return _json(
            Completion(
                id=ident,
                created=created,
                model=body.model,
                choices=[CompletionChoice(text=prefix + text, finish_reason=last.finish_reason)],
                usage=_usage(last),
            )
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def event(chunk: TokenChunk | None, *, role: bool = False) -> BaseModel:
        if chunk is None:
            return Completion(id=ident, created=created, model=body.model, choices=[])
        text = (prefix + chunk.text) if role else chunk.text
        return Completion(
            id=ident,
            created=created,
            model=body.model,
            choices=[CompletionChoice(text=text, finish_reason=chunk.finish_reason)],
        )

    return await _sse(request, stream, event, include_usage, opening=bool(prefix))


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body: EmbeddingRequest = parse(EmbeddingRequest, await read_json(request))
    name, version = model_ref(body.model)
    request[MODEL] = name
    core = request.app[CORE]
    result = await core.embed(name, body.texts(), version=version)
    data = []
    for i, vector in enumerate(result.vectors):
        if body.dimensions is not None:
            vector = vector[: body.dimensions]
        value: list[float] | str = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append(Embedding(index=i, embedding=value))
    return _json(
        EmbeddingList(
            data=data,
            model=body.model,
            usage=Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        )
    )


# ------------------------------------------------------------------------ helpers

EventFactory = Callable[..., BaseModel]


def _delta(delta: ToolCallDelta) -> ToolCallDeltaOut:
    return ToolCallDeltaOut(
        index=delta.index,
        id=delta.id,
        type="function" if delta.id is not None else None,
        function=FunctionDelta(name=delta.name, arguments=delta.arguments),
    )


def _calls(chunks: list[TokenChunk]) -> list[ToolCallOut]:
    """The whole calls of a collected answer (``arguments`` as one JSON text)."""
    collector = CallCollector()
    for chunk in chunks:
        collector.add(chunk)
    return [
        ToolCallOut(
            id=c.id,
            function=FunctionCall(
                name=c.name, arguments=json.dumps(dict(c.arguments), ensure_ascii=False)
            ),
        )
        for c in collector.calls()
    ]


async def _collect(
    stream: TokenStream, chunks: list[TokenChunk] | None = None
) -> tuple[str, TokenChunk]:
    parts: list[str] = []
    last: TokenChunk | None = None
    async with stream:
        async for chunk in stream:
            parts.append(chunk.text)
            if chunks is not None:
                chunks.append(chunk)
            last = chunk
    assert last is not None
    assert last.finish_reason is not None
    return "".join(parts), last


async def _sse(
    request: web.Request,
    stream: TokenStream,
    event: EventFactory,
    include_usage: bool,
    *,
    opening: bool,
) -> web.StreamResponse:
    events = _Events(event)
    async with stream:
        chunks: AsyncIterator[TokenChunk] = aiter(stream)
        # Wait for the first piece before committing to a 200: errors raised by the model
        # (a prompt it rejects, say) still become a 4xx.
        first = await anext(chunks)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        if opening:
            await _send(response, event(TokenChunk(text=""), role=True))
        chunk: TokenChunk | None = first
        last = first
        try:
            while chunk is not None:
                last = chunk
                await response.write(events.encode(chunk))
                chunk = await anext(chunks, None)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # Headers are sent: the error can only travel as an event now.
            log.error("generation failed mid-stream on model %s", request.get(MODEL), exc_info=exc)
            message = str(exc) if isinstance(exc, ApplianceError) else "generation failed"
            payload = {
                "error": {"message": message, "type": "server_error", "param": None, "code": None}
            }
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())
            await response.write_eof()
            return response
        if include_usage:
            final = event(None)
            final_dict = final.model_dump(mode="json")
            final_dict["usage"] = _usage(last).model_dump()
            await response.write(f"data: {json.dumps(final_dict)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _send(response: web.StreamResponse, event: BaseModel) -> None:
    await response.write(_event_bytes(event))


def _event_bytes(event: BaseModel) -> bytes:
    return b"data: " + event.model_dump_json(exclude_none=False).encode() + b"\n\n"


class _Events:
    """The SSE bytes of one stream's events.

    A plain text piece — no finish reason, no tool calls, nearly every event of a stream —
    is spliced into bytes pydantic wrote once for the stream, its text encoded by the same
    serializer: the same bytes as building and dumping the event model, which cost ~50 µs
    a token on the event loop (most of the loop's work per streamed token).
    """

    _MARK = "\x00text\x00"

    def __init__(self, event: EventFactory) -> None:
        self._event = event
        mark = to_json(self._MARK)
        head, found, tail = _event_bytes(event(TokenChunk(text=self._MARK))).partition(mark)
        self._parts = (head, tail) if found and mark not in tail else None

    def encode(self, chunk: TokenChunk) -> bytes:
        if self._parts is not None and chunk.finish_reason is None and not chunk.tool_calls:
            head, tail = self._parts
            return head + to_json(chunk.text) + tail
        return _event_bytes(self._event(chunk))


def _usage(chunk: TokenChunk) -> Usage:
    return Usage(
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


def _json(model: BaseModel) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), content_type="application/json")


__all__ = ["routes"]
