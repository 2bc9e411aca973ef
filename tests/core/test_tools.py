"""The core's tool-calling rules: checked tools, the grammar's schema, and the parser that
turns generated text back into calls however the text is split into pieces."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from appliance.core.toolcalls import CallCollector, ToolCallParser, with_tool_calls
from appliance.core.tools import (
    check_conversation,
    generic_messages,
    grammar_schema,
    tool_calls_of,
    tool_use,
)
from appliance.core.types import ChatMessage, TokenChunk, ToolCall
from appliance.errors import RequestError

LIGHT = {
    "type": "function",
    "function": {
        "name": "light",
        "parameters": {
            "type": "object",
            "properties": {
                "area": {"type": "string"},
                "level": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["area"],
        },
    },
}


def test_tool_use_defaults_and_choices() -> None:
    use = tool_use([LIGHT])
    assert use is not None and use.choice == "auto" and use.parallel
    assert tool_use([LIGHT], "none") is None
    assert tool_use(None) is None and tool_use([]) is None
    named = tool_use([LIGHT], {"type": "function", "function": {"name": "light"}})
    assert named is not None and named.function == "light" and not named.parallel
    required = tool_use([LIGHT], "required", False)
    assert required is not None and required.choice == "required" and not required.parallel


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ("light", None, "tools"),
        ([{"type": "function", "function": {}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            None,
            "tools[0].function.parameters",
        ),
        ([LIGHT, LIGHT], None, "tools[1].function.name"),
        ([LIGHT], {"type": "function", "function": {"name": "dark"}}, "tool_choice"),
        ([LIGHT], "maybe", "tool_choice"),
        (None, "required", "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        tool_use(tools, choice)
    assert caught.value.param == param


def test_conversation_tool_results_must_answer_a_call() -> None:
    calls = tool_calls_of(
        [{"id": "c1", "function": {"name": "light", "arguments": '{"area": "hall"}'}}],
        "messages[1].tool_calls",
    )
    assert calls == (ToolCall("c1", "light", {"area": "hall"}),)
    ollama_style = tool_calls_of(
        [{"function": {"name": "light", "arguments": {"area": "x"}}}], "tc"
    )
    assert ollama_style[0].id.startswith("call_")
    turns = [
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "", tool_calls=calls),
        ChatMessage("tool", "{}", tool_call_id="c1"),
    ]
    check_conversation(turns, ids_required=True)
    with pytest.raises(RequestError) as caught:
        check_conversation([*turns, ChatMessage("tool", "{}", tool_call_id="c2")])
    assert caught.value.param == "messages[3].tool_call_id"
    with pytest.raises(RequestError) as caught:
        check_conversation([*turns, ChatMessage("tool", "{}")], ids_required=True)
    assert caught.value.param == "messages[3].tool_call_id"
    check_conversation([*turns, ChatMessage("tool", "{}")])  # Ollama sends no ids


def test_grammar_schema_spells_out_bounds_and_keeps_values_valid() -> None:
    use = tool_use([LIGHT])
    assert use is not None
    schema = grammar_schema(use)
    level = schema["properties"]["arguments"]["properties"]["level"]
    assert level == {"enum": [0, 1, 2, 3]}
    area = schema["properties"]["arguments"]["properties"]["area"]
    assert area["maxLength"] > 0
    for value in level["enum"]:
        jsonschema.validate({"area": "a", "level": value}, LIGHT["function"]["parameters"])


def test_generic_format_puts_the_tools_in_the_system_prompt() -> None:
    use = tool_use([LIGHT], "required")
    assert use is not None
    call = ToolCall("c1", "light", {"area": "hall"})
    out = generic_messages(
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "on"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "ok", tool_call_id="c1"),
        ],
        use,
    )
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "light"' in out[0]["content"] and "at least one" in out[0]["content"]
    assert (
        out[2]["content"] == '<tool_call>{"name": "light", "arguments": {"area": "hall"}}'
        "</tool_call>"
    )
    assert out[3] == {"role": "user", "content": "<tool_response>\nok\n</tool_response>"}


TEXT = (
    'Sure. <tool_call>{"name": "light", "arguments": {"area": "hall \\"x\\" }", '
    '"level": 2}}</tool_call>\n<tool_call>\n{"name": "light", "arguments": '
    '{"area": "den"}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TEXT)])
def test_parser_finds_calls_however_the_text_is_split(size: int) -> None:
    parser = ToolCallParser()
    text = ""
    deltas = []
    for i in range(0, len(TEXT), size):
        piece, found = parser.feed(TEXT[i : i + size])
        text += piece
        deltas += found
    text += parser.finish()
    assert text == "Sure. "
    assert [(c.name, dict(c.arguments)) for c in parser.calls] == [
        ("light", {"area": 'hall "x" }', "level": 2}),
        ("light", {"area": "den"}),
    ]
    firsts = [d for d in deltas if d.id is not None]
    assert [(d.index, d.name) for d in firsts] == [(0, "light"), (1, "light")]
    for index, call in enumerate(parser.calls):
        arguments = "".join(d.arguments for d in deltas if d.index == index)
        assert json.loads(arguments) == call.arguments
        assert firsts[index].id == call.id


def test_parser_holds_back_what_may_start_a_call_only() -> None:
    parser = ToolCallParser()
    assert parser.feed("a <tool") == ("a ", [])
    assert parser.feed("box> b") == ("<toolbox> b", [])
    assert parser.finish() == ""
    parser = ToolCallParser()
    assert parser.feed("x <") == ("x ", [])
    assert parser.finish() == "<"


async def test_stream_ends_with_tool_calls_and_collects_whole_calls() -> None:
    async def chunks() -> AsyncIterator[TokenChunk]:
        for i in range(0, len(TEXT), 5):
            yield TokenChunk(text=TEXT[i : i + 5])
        yield TokenChunk(text="", finish_reason="stop", prompt_tokens=3, completion_tokens=9)

    use = tool_use([LIGHT])
    assert use is not None
    out = [c async for c in with_tool_calls(chunks(), use)]
    assert out[-1].finish_reason == "tool_calls" and out[-1].text == ""
    assert out[-1].completion_tokens == 9
    collector = CallCollector()
    for chunk in out:
        collector.add(chunk)
    assert [c.arguments for c in collector.calls()] == [
        {"area": 'hall "x" }', "level": 2},
        {"area": "den"},
    ]
    assert "".join(c.text for c in out) == "Sure. "
