"""The project's own GGUF model (models/home-intent): it loads in llama-cpp-python, the
default daemon serves it, and with the intent JSON schema as ``response_format`` every
answer is schema-valid JSON (the schema grammar guarantees the form; training makes the
content right)."""

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
SCHEMA = json.loads((MODEL_DIR / "intent.schema.json").read_text())
COMMANDS = [
    ("turn on the kitchen lights", {"intent": "turn_on", "device": "light", "room": "kitchen"}),
    ("Switch off the fan in the bedroom please",
     {"intent": "turn_off", "device": "fan", "room": "bedroom"}),
    ("set the living room thermostat to 21 degrees",
     {"intent": "set_temperature", "device": "thermostat", "room": "living_room", "value": 21}),
    ("dim the office lamp to 40%",
     {"intent": "set_brightness", "device": "light", "room": "office", "value": 40}),
    ("lock the garage door", {"intent": "lock", "device": "door", "room": "garage"}),
    ("how warm is the bathroom", {"intent": "get_temperature", "room": "bathroom"}),
    ("open the blinds in the dining room",
     {"intent": "open", "device": "blinds", "room": "dining_room"}),
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
    llm = llama_cpp.Llama(model_path=str(MODEL_DIR / manifest()["file"]), n_ctx=256,
                          verbose=False)
    try:
        assert llm.metadata["general.architecture"] == "llama"
        assert "<|assistant|>" in llm.metadata["tokenizer.chat_template"]
        text = "turn on the kitchen lights"
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(tokens).decode() == text
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
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "intent", "schema": SCHEMA}},
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
        body = {"model": "home-intent", "messages": [{"role": "user", "content": command}],
                "temperature": 0, "max_tokens": 120,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "intent", "schema": SCHEMA}}}
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
        (line,) = [x for x in metrics.splitlines()
                   if x.startswith(prefix) and 'model="home-intent"' in x]
        return float(line.split()[-1])

    steps = sample("appliance_batch_size_count")
    single = sample('appliance_batch_size_bucket{le="1",')
    assert steps > single, "no decode step ran more than one sequence"
