"""The streamed OpenAI events spliced from a template are the bytes pydantic writes.

Every text piece of a stream is written by splicing its JSON string into the event's bytes
rendered once; these checks compare that with building and dumping the event model, for
text that needs escaping (control characters from byte tokens, quotes, line separators) and
for the events the template must not take (finish reason, tool calls).
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from appliance.core.types import TokenChunk, ToolCallDelta
from appliance.transports.http.openai import EventFactory, _event_bytes, _Events
from appliance.transports.http.openai_schema import (
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    FunctionDelta,
    ToolCallDeltaOut,
)

TEXTS = ["", " hello", "\x05", "\x00", "é", "\ufffd", '"', "\\", "\n\t\r", "\u2028", "🦙", "</s>"]


def completion(chunk: TokenChunk | None, *, role: bool = False) -> BaseModel:
    return Completion(
        id="cmpl-1",
        created=1,
        model="m",
        choices=[
            CompletionChoice(text=chunk.text if chunk else "", finish_reason=chunk.finish_reason)
        ]
        if chunk
        else [],
    )


def chat(chunk: TokenChunk | None, *, role: bool = False) -> BaseModel:
    assert chunk is not None
    delta = Delta(
        content=chunk.text if chunk.text or not chunk.tool_calls else None,
        tool_calls=[
            ToolCallDeltaOut(index=d.index, function=FunctionDelta(arguments=d.arguments))
            for d in chunk.tool_calls
        ]
        or None,
    )
    if chunk.finish_reason is not None:
        delta = Delta()
    return ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[ChunkChoice(delta=delta, finish_reason=chunk.finish_reason)],
    )


@pytest.mark.parametrize("factory", [completion, chat])
@pytest.mark.parametrize("text", TEXTS)
def test_spliced_text_is_what_pydantic_writes(factory: EventFactory, text: str) -> None:
    events = _Events(factory)
    chunk = TokenChunk(text=text)
    assert events.encode(chunk) == _event_bytes(factory(chunk))


@pytest.mark.parametrize("factory", [completion, chat])
def test_final_and_tool_call_events_are_built_whole(factory: EventFactory) -> None:
    events = _Events(factory)
    final = TokenChunk(text="", finish_reason="length", prompt_tokens=3, completion_tokens=4)
    call = TokenChunk(text="", tool_calls=(ToolCallDelta(index=0, arguments='{"a": 1}'),))
    for chunk in (final, call):
        assert events.encode(chunk) == _event_bytes(factory(chunk))
    assert b'"finish_reason":"length"' in events.encode(final)
