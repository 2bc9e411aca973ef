"""Tool calling over HTTP with the real ``openai`` and ``ollama`` clients.

One daemon subprocess serves the default models (``home-intent`` knows Home Assistant's
intent tools through its chat template) and the TinyStories GGUF (it knows nothing of
tools: the generic format, and only the grammar makes its calls valid). Every returned
``arguments`` is validated against its tool's schema with ``jsonschema``. The request Home
Assistant's Ollama integration sends (``ha_ollama_chat.json``: its system prompt, its
intent tools as ``homeassistant/components/ollama/entity.py`` formats them, ``options``,
``keep_alive``, ``think``) is replayed, and so is its second round with the tool result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest

from tests.conftest import DaemonProcess, daemon

HERE = Path(__file__).parent
HA_REQUEST: dict[str, Any] = json.loads((HERE / "ha_ollama_chat.json").read_text())
HA_TOOLS: list[dict[str, Any]] = HA_REQUEST["tools"]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in HA_TOOLS}

# A tool whose schema exercises what the grammar must hold: types, enum, required, bounds,
# nested objects and arrays.
SCENE = {
    "type": "function",
    "function": {
        "name": "set_scene",
        "description": "Set a lighting scene in a room.",
        "parameters": {
            "type": "object",
            "properties": {
                "room": {"type": "string", "enum": ["kitchen", "bedroom", "office"]},
                "level": {"type": "integer", "minimum": 10, "maximum": 20},
                "warmth": {"type": "number", "minimum": 0, "maximum": 1},
                "on": {"type": "boolean"},
                "lights": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "integer", "minimum": 1, "maximum": 9},
                            "color": {"type": "string", "maxLength": 12},
                        },
                        "required": ["id"],
                    },
                    "maxItems": 3,
                },
            },
            "required": ["room", "level", "on", "lights"],
        },
    },
}
STORY_TOOLS = [
    SCENE,
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on a device",
            "parameters": SCHEMAS["HassTurnOn"],
        },
    },
]
ALL_SCHEMAS = {**SCHEMAS, "set_scene": SCENE["function"]["parameters"]}


@pytest.fixture(scope="module")
def served(stories_gguf: Path, default_models: Path) -> Iterator[DaemonProcess]:
    with daemon("--models-dir", str(default_models), "--model", str(stories_gguf)) as proc:
        yield proc


@pytest.fixture
def oai(served: DaemonProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def oll(served: DaemonProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=served.url) as c:
        yield c


def valid(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    jsonschema.validate(arguments, ALL_SCHEMAS[name])
    return arguments


def porch_off(name: str, arguments: dict[str, Any]) -> bool:
    """A right answer to "turn off the porch light", as Home Assistant resolves names."""
    by_area = arguments.get("area", "").lower() == "porch" and "light" in arguments.get(
        "domain", ["light"]
    )
    return name == "HassTurnOff" and (by_area or arguments.get("name", "").lower() == "porch light")


# ------------------------------------------------------------------------ OpenAI


def test_openai_home_intent_calls_the_intent_tool(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="home-intent",
        temperature=0,
        tools=HA_TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "turn off the porch light"}],
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert isinstance(call.function.arguments, str)
    arguments = valid(call.function.name, json.loads(call.function.arguments))
    assert porch_off(call.function.name, arguments), call


def test_openai_streams_calls_as_the_spec_does(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="home-intent",
        temperature=0,
        tools=HA_TOOLS,
        stream=True,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "turn on the kitchen lights and the office lights"}],
    )
    pieces: dict[int, dict[str, Any]] = {}
    finish = None
    for event in stream:
        for choice in event.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                entry = pieces.setdefault(
                    delta.index, {"id": None, "name": None, "args": [], "first": None}
                )
                if entry["first"] is None:  # the first piece of a call names it
                    entry["first"] = (delta.id, delta.function and delta.function.name)
                if delta.function and delta.function.arguments:
                    entry["args"].append(delta.function.arguments)
    assert finish == "tool_calls"
    assert sorted(pieces) == [0, 1], pieces
    for entry in pieces.values():
        call_id, name = entry["first"]
        assert call_id and call_id.startswith("call_") and name == "HassTurnOn"
        assert len(entry["args"]) > 1  # the arguments come in pieces
        arguments = valid(name, json.loads("".join(entry["args"])))
        assert arguments.get("domain") == ["light"]
    assert {json.loads("".join(e["args"]))["area"] for e in pieces.values()} == {
        "kitchen",
        "office",
    }


def test_openai_parallel_tool_calls_false_gives_one_call(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="home-intent",
        temperature=0,
        tools=HA_TOOLS,  # type: ignore[arg-type]
        parallel_tool_calls=False,
        messages=[{"role": "user", "content": "turn on the kitchen lights and the office lights"}],
    )
    calls = answer.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1


def test_openai_tool_choice_none_answers_in_text(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="home-intent",
        temperature=0,
        tools=HA_TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        messages=[{"role": "user", "content": "turn on the kitchen lights"}],
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert json.loads(choice.message.content or "")["intent"] == "turn_on"  # its JSON intent


def test_openai_follow_up_round_with_the_tool_result(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(
        model="home-intent",
        temperature=0,
        tools=HA_TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "turn off the porch light"}],
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    result = {
        "speech": {},
        "response_type": "action_done",
        "data": {
            "targets": [],
            "success": [{"name": "Porch", "type": "area", "id": "porch"}],
            "failed": [],
        },
    }
    second = oai.chat.completions.create(
        model="home-intent",
        temperature=0,
        tools=HA_TOOLS,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "turn off the porch light"},
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
        ],
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "Done."


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "set_scene"}}]
)
@pytest.mark.parametrize("stream", [False, True])
def test_openai_tiny_model_without_tools_still_calls_validly(
    oai: openai.OpenAI, choice: Any, stream: bool
) -> None:
    kwargs: dict[str, Any] = {
        "model": "stories260K",
        "temperature": 0,
        "max_tokens": 1000,
        "tools": STORY_TOOLS,
        # One call: left to go on, this model calls again and again until max_tokens.
        "tool_choice": choice,
        "parallel_tool_calls": False,
        "messages": [{"role": "user", "content": "Lily went to the"}],
    }
    if not stream:
        answer = oai.chat.completions.create(**kwargs)
        assert answer.choices[0].finish_reason == "tool_calls"
        calls = answer.choices[0].message.tool_calls or []
        made = [(c.function.name, c.function.arguments) for c in calls]
    else:
        args: dict[int, list[str]] = {}
        names: dict[int, str] = {}
        finish = None
        for event in oai.chat.completions.create(stream=True, **kwargs):
            for ch in event.choices:
                finish = ch.finish_reason or finish
                for d in ch.delta.tool_calls or []:
                    if d.function and d.function.name:
                        names[d.index] = d.function.name
                    args.setdefault(d.index, []).append(
                        (d.function.arguments if d.function else None) or ""
                    )
        assert finish == "tool_calls"
        made = [(names[i], "".join(args[i])) for i in sorted(args)]
    assert made
    for name, arguments in made:
        if isinstance(choice, dict):
            assert name == "set_scene"
        valid(name, json.loads(arguments))


def test_openai_tiny_model_with_auto_may_answer_in_text(oai: openai.OpenAI) -> None:
    answer = oai.chat.completions.create(
        model="stories260K",
        temperature=0,
        max_tokens=40,
        tools=STORY_TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Once upon a time"}],
    )
    choice = answer.choices[0]
    assert choice.message.content and not choice.message.tool_calls


BAD = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
        "tools[0].function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
        "tools[0].function.parameters",
    ),
    (
        {"tools": [SCENE], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tools": [SCENE], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [SCENE], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    (
        {
            "tools": [SCENE],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_nothing", "content": "{}"},
            ],
        },
        "messages[1].tool_call_id",
    ),
    (
        {
            "tools": [SCENE],
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "set_scene", "arguments": "{not json"},
                        }
                    ],
                },
            ],
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    ({"tools": [SCENE], "response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize(("change", "field"), BAD)
def test_openai_bad_tool_input_is_a_400_naming_the_field(
    oai: openai.OpenAI, change: dict[str, Any], field: str
) -> None:
    body: dict[str, Any] = {
        "model": "home-intent",
        "messages": [{"role": "user", "content": "turn on the lights"}],
    }
    body.update(change)
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(**body)
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == field, error
    assert field.split("[")[0].split(".")[0] in error["message"], error


# ------------------------------------------------------------------------ Ollama


def test_ollama_client_gets_calls_with_object_arguments(oll: ollama.Client) -> None:
    answer = oll.chat(
        model="home-intent",
        tools=HA_TOOLS,
        options={"temperature": 0},
        messages=[{"role": "user", "content": "turn off the porch light"}],
    )
    calls = answer.message.tool_calls
    assert calls and len(calls) == 1
    arguments = dict(calls[0].function.arguments)
    assert porch_off(calls[0].function.name, valid(calls[0].function.name, arguments))
    assert answer.done_reason == "stop"


def test_ollama_streams_calls_and_tiny_model_is_valid(oll: ollama.Client) -> None:
    for model, tools, prompt in (
        ("home-intent", HA_TOOLS, "dim the kitchen lights to 40%"),
        ("stories260K", STORY_TOOLS, "Lily"),
    ):
        calls = []
        for part in oll.chat(
            model=model,
            tools=tools,
            stream=True,
            options={"temperature": 0, "num_predict": 600},
            messages=[{"role": "user", "content": prompt}],
        ):
            calls += part.message.tool_calls or []
        if model == "home-intent":
            assert len(calls) == 1 and calls[0].function.name == "HassLightSet"
            assert dict(calls[0].function.arguments) == {"area": "kitchen", "brightness": 40}
        for call in calls:
            valid(call.function.name, dict(call.function.arguments))


def test_home_assistant_request_and_its_follow_up(oll: ollama.Client) -> None:
    """Home Assistant's own request, as its integration sends it, then its second round."""
    request = dict(HA_REQUEST)
    calls = []
    text = ""
    for part in oll.chat(**request):
        calls += part.message.tool_calls or []
        text += part.message.content or ""
    assert len(calls) == 1, text
    call = calls[0]
    arguments = valid(call.function.name, dict(call.function.arguments))
    assert porch_off(call.function.name, arguments)
    # Home Assistant runs the intent and sends the result back (entity.py _convert_content).
    result = {
        "speech": {},
        "response_type": "action_done",
        "data": {
            "targets": [],
            "success": [{"name": "Porch", "type": "area", "id": "porch"}],
            "failed": [],
        },
    }
    request["messages"] = [
        *HA_REQUEST["messages"],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": call.function.name, "arguments": arguments}}],
        },
        {"role": "tool", "content": json.dumps({"data": result, "error": None})},
    ]
    reply = "".join(part.message.content or "" for part in oll.chat(**request))
    assert reply == "Done."


def test_ollama_images_for_a_text_model_are_a_400(oll: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        oll.chat(
            model="home-intent",
            tools=HA_TOOLS,
            messages=[{"role": "user", "content": "what is this", "images": ["aGVsbG8="]}],
        )
    assert caught.value.status_code == 400 and "images" in caught.value.error


def test_ollama_bad_tools_are_a_400(oll: ollama.Client, served: DaemonProcess) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps(
        {
            "model": "home-intent",
            "stream": False,
            "tools": [{"function": {}}],
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    req = urllib.request.Request(served.url + "/api/chat", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=30)
    assert caught.value.code == 400
    assert "tools[0].function.name" in json.loads(caught.value.read())["error"]
