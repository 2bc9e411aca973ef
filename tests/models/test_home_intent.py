"""The project's own GGUF model (models/home-intent): it loads in llama-cpp-python, the
default daemon serves it; offered Home Assistant's intent tools it calls the right one with
arguments that validate (on commands written by hand, not by its training generator), and
without tools, with the intent JSON schema as ``response_format``, every answer is
schema-valid JSON (the grammars guarantee the form; training makes the content right)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any

import aiohttp
import jsonschema
import pytest

from tests.conftest import DEFAULT_MODELS, base_url, make_config, serving

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODEL_DIR = DEFAULT_MODELS / "home-intent"
HA_TOOLS = json.loads(
    (DEFAULT_MODELS.parent / "tests" / "transports" / "http" / "ha_ollama_chat.json").read_text()
)["tools"]
# Commands phrased by hand (not by build_intent_llm.py's templates) and the tool each means.
HAND_WRITTEN = [
    ("turn off the porch light", "HassTurnOff"),
    ("Turn on the lights in the living room", "HassTurnOn"),
    ("switch off the bedroom fan", "HassTurnOff"),
    ("please turn the kitchen light on", "HassTurnOn"),
    ("lights off in the office", "HassTurnOff"),
    ("turn on the coffee maker", "HassTurnOn"),
    ("dim the dining room lights to 25 percent", "HassLightSet"),
    ("set the bedroom lamp to 70%", "HassLightSet"),
    ("make the kitchen lights green", "HassLightSet"),
    ("set the thermostat to 22 degrees", "HassClimateSetTemperature"),
    ("heat the bathroom to 24 degrees", "HassClimateSetTemperature"),
    ("set the living room temperature to 20.5", "HassClimateSetTemperature"),
    ("set the volume to 40", "HassSetVolume"),
    ("pause the music", "HassMediaPause"),
    ("skip this song", "HassMediaNext"),
    ("open the garage door", "HassTurnOn"),
    ("close the blinds in the bedroom", "HassTurnOff"),
    ("lock the front door", "HassTurnOn"),
    ("unlock the back door", "HassTurnOff"),
    ("turn off all the lights in the kitchen", "HassTurnOff"),
    ("could you switch on the hallway lamp please", "HassTurnOn"),
    ("Turn off the TV", "HassTurnOff"),
    ("set the office fan to 50%", "HassFanSetSpeed"),
    ("resume the music in the den", "HassMediaUnpause"),
]
SCHEMA = json.loads((MODEL_DIR / "intent.schema.json").read_text())
COMMANDS = [
    ("turn on the kitchen lights", {"intent": "turn_on", "device": "light", "room": "kitchen"}),
    (
        "Switch off the fan in the bedroom please",
        {"intent": "turn_off", "device": "fan", "room": "bedroom"},
    ),
    (
        "set the living room thermostat to 21 degrees",
        {"intent": "set_temperature", "device": "thermostat", "room": "living_room", "value": 21},
    ),
    (
        "dim the office lamp to 40%",
        {"intent": "set_brightness", "device": "light", "room": "office", "value": 40},
    ),
    ("lock the garage door", {"intent": "lock", "device": "door", "room": "garage"}),
    ("how warm is the bathroom", {"intent": "get_temperature", "room": "bathroom"}),
    (
        "open the blinds in the dining room",
        {"intent": "open", "device": "blinds", "room": "dining_room"},
    ),
    ("is the hallway light on", {"intent": "get_state", "device": "light", "room": "hallway"}),
]


def manifest() -> dict[str, Any]:
    return tomllib.loads((MODEL_DIR / "manifest.toml").read_text())


def test_committed_file_matches_manifest_and_is_small() -> None:
    data = manifest()
    path = MODEL_DIR / data["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data["sha256"]
    assert path.stat().st_size <= 4 * 1024 * 1024


def test_loads_in_llama_cpp_with_its_own_tokenizer_and_template() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(MODEL_DIR / manifest()["file"]), n_ctx=256, verbose=False)
    try:
        assert llm.metadata["general.architecture"] == "llama"
        assert "<|assistant|>" in llm.metadata["tokenizer.chat_template"]
        assert "<tool_call>" in llm.metadata["tokenizer.chat_template"]
        text = "turn on the kitchen lights"
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(tokens).decode() == text
        # The call delimiters are single tokens that print as text.
        call = llm.tokenize(b"<tool_call>{}</tool_call>", add_bos=False)
        assert len(call) == 4 and llm.detokenize(call) == b"<tool_call>{}</tool_call>"
    finally:
        llm.close()


@pytest.mark.skipif(sys.platform != "linux", reason="llama.cpp build")
async def test_default_daemon_answers_schema_valid_intents(
    http: aiohttp.ClientSession,
) -> None:
    pytest.importorskip("llama_cpp")
    async with serving(make_config()) as server:
        url = base_url(server)
        async with http.get(url + "/v1/models") as resp:
            assert "home-intent" in {m["id"] for m in (await resp.json())["data"]}
        right = 0
        for command, expected in COMMANDS:
            body = {
                "model": "home-intent",
                "messages": [{"role": "user", "content": command}],
                "temperature": 0,
                "max_tokens": 120,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "intent", "schema": SCHEMA},
                },
            }
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = (await resp.json())["choices"][0]["message"]["content"]
            intent = json.loads(answer)
            jsonschema.validate(intent, SCHEMA)
            right += all(intent.get(k) == v for k, v in expected.items())
        # The form is guaranteed; the content is what training achieved (see models/README).
        assert right >= len(COMMANDS) - 2, right


@pytest.mark.skipif(sys.platform != "linux", reason="llama.cpp build")
async def test_default_daemon_decodes_concurrent_intents_together(
    http: aiohttp.ClientSession,
) -> None:
    """The shipped manifest gives home-intent four slots: concurrent requests share decode
    steps (continuous batching) and each still gets its own schema-valid answer."""
    pytest.importorskip("llama_cpp")
    assert manifest()["options"]["parallel"] == 4

    async def ask(command: str) -> dict[str, Any]:
        body = {
            "model": "home-intent",
            "messages": [{"role": "user", "content": command}],
            "temperature": 0,
            "max_tokens": 120,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "intent", "schema": SCHEMA},
            },
        }
        async with http.post(url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return dict(json.loads((await resp.json())["choices"][0]["message"]["content"]))

    async with serving(make_config()) as server:
        url = base_url(server)
        commands = [command for command, _ in COMMANDS[:4]]
        together = await asyncio.gather(*(ask(c) for c in commands))
        alone = [await ask(c) for c in commands]
        async with http.get(url + "/metrics") as resp:
            metrics = await resp.text()
    assert together == alone  # greedy decoding: sharing steps changes no answer
    for intent in together:
        jsonschema.validate(intent, SCHEMA)

    def sample(prefix: str) -> float:
        (line,) = [
            x for x in metrics.splitlines() if x.startswith(prefix) and 'model="home-intent"' in x
        ]
        return float(line.split()[-1])

    steps = sample("appliance_batch_size_count")
    single = sample('appliance_batch_size_bucket{le="1",')
    assert steps > single, "no decode step ran more than one sequence"


@pytest.mark.skipif(sys.platform != "linux", reason="llama.cpp build")
async def test_default_daemon_answers_home_assistant_tools(http: aiohttp.ClientSession) -> None:
    """Hand-written commands with Home Assistant's tools: every call validates against its
    schema; the right tool for at least 20 of 24 (models/README.md has the figure)."""
    pytest.importorskip("llama_cpp")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in HA_TOOLS}
    right = 0
    async with serving(make_config()) as server:
        url = base_url(server)
        for command, tool in HAND_WRITTEN:
            body = {
                "model": "home-intent",
                "temperature": 0,
                "tools": HA_TOOLS,
                "messages": [{"role": "user", "content": command}],
            }
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                message = (await resp.json())["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            for call in calls:
                jsonschema.validate(
                    json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]]
                )
            right += bool(calls) and calls[0]["function"]["name"] == tool
    assert right >= 20, right
