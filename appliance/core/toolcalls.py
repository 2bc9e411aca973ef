"""Generated text back into tool calls, as it streams.

A runtime generating for a request with tools streams plain text in which calls appear as
``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` (see :mod:`appliance.core.tools`;
the grammar guarantees that form once a call has started). :func:`with_tool_calls` turns
that stream into one transports can serialise without parsing anything: text before the
calls stays text (a possible start of ``<tool_call>`` is held back until it is known not
to be one), each call becomes :class:`~appliance.core.types.ToolCallDelta` pieces — its id
and name as soon as the name is complete, then its arguments in pieces as they are
generated — and the last chunk says ``finish_reason: "tool_calls"`` when calls were made.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from appliance.core.tools import CALL_CLOSE, CALL_OPEN, new_call_id
from appliance.core.types import TokenChunk, ToolCall, ToolCallDelta, ToolUse

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class _Call:
    index: int
    id: str
    text: str = ""  # everything after <tool_call>
    name: str | None = None
    args_start: int = -1  # where the arguments begin in text
    sent: int = 0  # characters of the arguments streamed so far
    # JSON scanner over the arguments, to know where they end without waiting for the rest.
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    end: int = -1  # index in text just past the arguments

    def scan(self) -> str:
        """Arguments text not streamed yet that is certainly part of the arguments."""
        if self.args_start < 0:
            head = _HEAD.match(self.text)
            if head is None:
                return ""
            self.name = json.loads('"' + head.group(1) + '"')
            self.args_start = head.end()
        start = self.args_start + self.sent
        stop = len(self.text) if self.end < 0 else self.end
        for i in range(start, stop):
            if self.end >= 0:
                break
            ch = self.text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
        stop = len(self.text) if self.end < 0 else self.end
        piece = self.text[start:stop]
        self.sent += len(piece)
        return piece


@dataclass
class ToolCallParser:
    """Feeds on generated text; returns the text and call pieces to send for each piece."""

    calls: list[ToolCall] = field(default_factory=list)
    _held: str = ""
    _call: _Call | None = None
    _count: int = 0
    _after_call: bool = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out_text: list[str] = []
        deltas: list[ToolCallDelta] = []
        pending = self._held + text
        self._held = ""
        while pending:
            if self._call is None:
                at = pending.find(CALL_OPEN)
                if at < 0:
                    cut = len(pending) - _prefix_overlap(pending, CALL_OPEN)
                    out_text.append(self._plain(pending[:cut]))
                    self._held = pending[cut:]
                    break
                out_text.append(self._plain(pending[:at]))
                self._call = _Call(index=self._count, id=new_call_id())
                self._count += 1
                pending = pending[at + len(CALL_OPEN) :]
                continue
            call = self._call
            joined = call.text + pending
            close = joined.find(CALL_CLOSE, max(0, len(call.text) - len(CALL_CLOSE)))
            if close < 0:
                call.text, pending = joined, ""
            else:
                call.text, pending = joined[:close], joined[close + len(CALL_CLOSE) :]
            had_name = call.name is not None
            piece = call.scan()
            if call.name is not None and not had_name:
                deltas.append(ToolCallDelta(index=call.index, id=call.id, name=call.name))
            if piece:
                deltas.append(ToolCallDelta(index=call.index, arguments=piece))
            if close >= 0:
                self._finish_call(call)
        return "".join(out_text), deltas

    def _plain(self, text: str) -> str:
        # Whitespace between or after calls is layout, not an answer.
        if self._after_call and not text.strip():
            return ""
        return text

    def _finish_call(self, call: _Call) -> None:
        self._call = None
        self._after_call = True
        try:
            parsed = json.loads(call.text)
        except ValueError:
            return  # only text cut short fails here (the grammar holds the form)
        if isinstance(parsed, dict) and isinstance(parsed.get("arguments"), dict):
            self.calls.append(
                ToolCall(id=call.id, name=str(parsed.get("name")), arguments=parsed["arguments"])
            )

    def finish(self) -> str:
        """Text held back at the end of the generation (an unfinished call is dropped)."""
        text, self._held = self._held, ""
        return "" if self._call is not None else self._plain(text)


def _prefix_overlap(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


async def with_tool_calls(
    chunks: AsyncIterator[TokenChunk], use: ToolUse
) -> AsyncIterator[TokenChunk]:
    """A runtime's chunks for a request with tools, its calls parsed out (see module doc)."""
    parser = ToolCallParser()
    async for chunk in chunks:
        text, deltas = parser.feed(chunk.text)
        if chunk.finish_reason is None:
            if text or deltas:
                yield TokenChunk(text=text, tool_calls=tuple(deltas))
            continue
        text += parser.finish()
        if text or deltas:  # the last pieces, then (as runtimes do) an empty final chunk
            yield TokenChunk(text=text, tool_calls=tuple(deltas))
        reason = chunk.finish_reason
        if parser.calls and reason == "stop":
            reason = "tool_calls"
        yield replace(chunk, text="", finish_reason=reason)
        return


class CallCollector:
    """Joins a stream's call pieces into whole calls, for transports that answer whole
    calls (a non-streamed answer; Ollama, which streams each call in one piece)."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments text]

    def add(self, chunk: TokenChunk) -> None:
        for delta in chunk.tool_calls:
            call = self._calls.setdefault(delta.index, ["", "", ""])
            call[0] = delta.id or call[0]
            call[1] = delta.name or call[1]
            call[2] += delta.arguments

    def calls(self) -> list[ToolCall]:
        """The calls made, once the stream has ended with ``finish_reason: "tool_calls"``
        (a call cut short by the token limit is not one)."""
        out = []
        for index in sorted(self._calls):
            call_id, name, arguments = self._calls[index]
            try:
                parsed = json.loads(arguments)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                out.append(ToolCall(id=call_id, name=name, arguments=parsed))
        return out
