"""How an Ollama answer goes out: one JSON document, or NDJSON lines as tokens come.

The first token is awaited before the status is sent, so a request the model rejects still
gets a 4xx; an error after streaming started can only travel as a last ``{"error": ...}``
line, as Ollama does. The last answer carries Ollama's timing fields (nanoseconds) and token
counts; tool calls are sent whole, in a line before the last one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from appliance.core.service import TokenStream
from appliance.core.toolcalls import CallCollector
from appliance.core.types import TokenChunk
from appliance.errors import ApplianceError
from appliance.transports.http.keys import MODEL

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"


class Timing:
    """Ollama's durations (nanoseconds): models are loaded ahead, so loading takes none."""

    def __init__(self, started: int, first: int) -> None:
        self.started, self.first, self.end = started, first, time.perf_counter_ns()


def final_fields(chunk: TokenChunk, timing: Timing | None) -> dict[str, Any]:
    if timing is None:
        return {}
    return {
        # Ollama ends an answer with calls as any other: "stop".
        "done_reason": "stop" if chunk.finish_reason == "tool_calls" else chunk.finish_reason,
        "total_duration": timing.end - timing.started,
        "load_duration": 0,
        "prompt_eval_count": chunk.prompt_tokens,
        "prompt_eval_duration": timing.first - timing.started,
        "eval_count": chunk.completion_tokens,
        "eval_duration": timing.end - timing.first,
    }


Answer = Callable[..., BaseModel]  # (chunk, timing or None[, whole tool calls])


async def respond(
    request: web.Request, stream: TokenStream, answer: Answer, streaming: bool, started: int
) -> web.StreamResponse:
    async with stream:
        chunks: AsyncIterator[TokenChunk] = aiter(stream)
        # The first piece decides the status: an error raised by the model is still a 4xx.
        first = await anext(chunks)
        first_at = time.perf_counter_ns()
        calls = CallCollector()
        if not streaming:
            parts = [first] + [piece async for piece in chunks]
            last = parts[-1]
            text = "".join(p.text for p in parts)
            for part in parts:
                calls.add(part)
            whole = TokenChunk(
                text=text,
                finish_reason=last.finish_reason,
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
            )
            made = calls.calls() if last.finish_reason == "tool_calls" else []
            if made:
                return json_answer(answer(whole, Timing(started, first_at), made))
            return json_answer(answer(whole, Timing(started, first_at)))
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        try:
            async for chunk in _prepend(first, chunks):
                calls.add(chunk)
                if chunk.finish_reason is not None:
                    # Ollama streams each call whole, in a line before the last one.
                    made = calls.calls() if chunk.finish_reason == "tool_calls" else []
                    if made:
                        await _line(response, answer(TokenChunk(text=""), None, made))
                    await _line(response, answer(chunk, Timing(started, first_at)))
                elif chunk.text:
                    await _line(response, answer(chunk, None))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            # The status is sent: the error can only travel as a last line now.
            log.error("generation failed mid-stream on model %s", request.get(MODEL), exc_info=exc)
            message = str(exc) if isinstance(exc, ApplianceError) else "generation failed"
            await response.write(b'{"error": ' + _quote(message) + b"}\n")
        await response.write_eof()
        return response


async def _prepend(first: TokenChunk, rest: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
    yield first
    async for chunk in rest:
        yield chunk


async def _line(response: web.StreamResponse, answer: BaseModel) -> None:
    await response.write(answer.model_dump_json(exclude_none=True).encode() + b"\n")


def _quote(text: str) -> bytes:
    return json.dumps(text).encode()


def now() -> str:
    """The time now as Ollama writes times."""
    return _format(datetime.now(timezone.utc))


def json_answer(model: BaseModel) -> web.Response:
    return web.Response(
        body=model.model_dump_json(exclude_none=True).encode(),
        content_type="application/json",
        charset="utf-8",
    )


def iso(unix: float) -> str:
    """A Unix time as Ollama writes times (UTC, microseconds, ``Z``)."""
    return _format(datetime.fromtimestamp(unix, timezone.utc))


def _format(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


__all__ = ["NDJSON", "Answer", "Timing", "final_fields", "iso", "json_answer", "now", "respond"]
