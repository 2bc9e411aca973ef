"""The Ollama-compatible API: the real ``ollama`` client and Home Assistant's requests.

One daemon subprocess serves the TinyStories GGUF and the default ONNX model for the whole
module. The ``ollama`` Python client from PyPI is used unchanged; the requests Home
Assistant's Ollama integration sends (``homeassistant/components/ollama``: ``list`` and
``ps`` to find models, then streaming ``chat`` with ``tools``, ``keep_alive`` in seconds,
``options.num_ctx`` and an optional ``format`` schema) are replayed both through
``ollama.AsyncClient`` exactly as the integration calls it and as raw HTTP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import gguf
import numpy as np
import ollama
import pytest

from tests.conftest import STORIES, DaemonProcess, daemon

LLM = "stories260K"
TAG = f"{LLM}:latest"
ONNX = "sensor-anomaly"
GREEDY = ", there was a little girl named Lily."


@pytest.fixture(scope="module")
def llm_daemon(
    stories_gguf: Path, default_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    # One tensor model (never listed) and one language model: the default models without
    # home-intent, so the listings below name exactly stories260K.
    models = tmp_path_factory.mktemp("models")
    (models / "sensor-anomaly").symlink_to(default_models / "sensor-anomaly")
    with daemon("--models-dir", str(models), "--model", str(stories_gguf)) as proc:
        yield proc


@pytest.fixture
def client(llm_daemon: DaemonProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=llm_daemon.url) as c:
        yield c


@pytest.fixture
async def async_client(llm_daemon: DaemonProcess) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=llm_daemon.url) as c:
        yield c


# ------------------------------------------------------------------- discovery


async def test_root_answers_like_ollama(
    llm_daemon: DaemonProcess, http: aiohttp.ClientSession
) -> None:
    async with http.get(llm_daemon.url + "/") as response:
        assert response.status == 200
        assert await response.text() == "Ollama is running"
    async with http.head(llm_daemon.url + "/") as response:
        assert response.status == 200
    async with http.get(llm_daemon.url + "/api/version") as response:
        assert response.status == 200
        version = (await response.json())["version"]
    assert all(part.isdigit() for part in version.split("."))


def test_list_shows_language_models_only(client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == [TAG]
    (model,) = models
    assert model.size and model.size > 100_000
    assert model.digest and len(model.digest) == 64
    assert model.modified_at is not None
    assert model.details is not None and model.details.format == "gguf"


def test_ps_and_show(client: ollama.Client) -> None:
    (running,) = client.ps().models
    assert running.model == TAG
    assert running.context_length == 2048
    assert running.expires_at is not None and running.expires_at.year > 2100
    shown = client.show(TAG)
    assert shown.capabilities == ["completion", "embedding"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["appliance.context_length"] == 2048
    # Family, size and quantization from the GGUF file itself, read here with gguf-py.
    reader = gguf.GGUFReader(str(STORIES))
    params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    (tensor_type,) = {t.tensor_type.name for t in reader.tensors}  # no general.file_type
    assert shown.details is not None
    assert shown.details.family == "llama"
    assert shown.details.parameter_size == f"{params / 1e3:.1f}K"
    assert shown.details.quantization_level == tensor_type == "F32"
    (listed,) = client.list().models
    assert listed.details is not None and listed.details == shown.details


# ------------------------------------------------------------------- generation


def test_generate_raw_is_the_greedy_story(client: ollama.Client) -> None:
    result = client.generate(
        model=LLM,
        prompt="Once upon a time",
        raw=True,
        options={"temperature": 0, "num_predict": 12},
    )
    assert (result.response or "").startswith(GREEDY)
    assert result.done is True
    assert result.done_reason == "length"
    assert result.prompt_eval_count == 5  # BOS + 4 tokens
    assert result.eval_count and result.eval_count >= 10  # re-tokenised text, as on /v1
    assert result.total_duration and result.eval_duration


def test_streaming_generate_matches_non_streaming(client: ollama.Client) -> None:
    kwargs: dict[str, Any] = {
        "model": TAG,
        "prompt": "Once upon a time",
        "raw": True,
        "options": {"temperature": 0, "num_predict": 20},
    }
    whole = client.generate(**kwargs)
    parts = list(client.generate(stream=True, **kwargs))
    assert len(parts) > 2
    assert all(not p.done for p in parts[:-1])
    assert parts[-1].done is True and parts[-1].done_reason == whole.done_reason
    assert "".join(p.response or "" for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count


def test_generate_uses_the_template_unless_raw(client: ollama.Client) -> None:
    templated = client.generate(
        model=LLM,
        prompt="Once upon a time",
        system="Tell a story.",
        options={"temperature": 0, "num_predict": 12},
    )
    assert templated.prompt_eval_count and templated.prompt_eval_count > 5
    assert templated.response


def test_chat_streaming_matches_non_streaming(client: ollama.Client) -> None:
    kwargs: dict[str, Any] = {
        "model": LLM,
        "messages": [
            {"role": "system", "content": "Tell a story."},
            {"role": "user", "content": "Once upon a time"},
        ],
        "options": {"temperature": 0, "num_predict": 16, "stop": ["\n\n"]},
    }
    whole = client.chat(**kwargs)
    assert whole.message.role == "assistant"
    assert whole.message.content
    assert whole.done_reason in ("stop", "length")
    parts = list(client.chat(stream=True, **kwargs))
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done is True


def test_seed_and_temperature_options_are_used(client: ollama.Client) -> None:
    def sample(seed: int) -> str:
        return (
            client.generate(
                model=LLM,
                prompt="Once upon a time",
                raw=True,
                options={"temperature": 1.0, "seed": seed, "num_predict": 24},
            ).response
            or ""
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 5)}) > 1


def test_format_json_schema_constrains_the_answer(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
        "additionalProperties": False,
    }
    result = client.chat(
        model=LLM,
        messages=[{"role": "user", "content": "Name a girl."}],
        format=schema,
        options={"temperature": 0, "num_predict": 60},
    )
    assert set(json.loads(result.message.content or "")) == {"name"}
    plain = client.generate(
        model=LLM,
        prompt="Once upon a time",
        raw=True,
        format="json",
        options={"temperature": 0, "num_predict": 40},
    )
    # JSON by grammar (cut off by num_predict, so not necessarily complete).
    assert (plain.response or "").lstrip().startswith("{")


def test_empty_requests_load_and_unload_like_ollama(client: ollama.Client) -> None:
    loaded = client.generate(model=LLM)
    assert loaded.done is True and loaded.done_reason == "load"
    unloaded = client.chat(model=LLM, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    # The model unloads once idle; the next request loads it again and just works.
    assert client.generate(model=LLM, prompt="Once", raw=True, options={"num_predict": 2}).response


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    result = client.embed(model=LLM, input=["a cat", "a dog", "a cat"])
    vectors = result.embeddings
    assert len(vectors) == 3
    assert vectors[0] == pytest.approx(vectors[2])
    assert sum(v * v for v in vectors[0]) == pytest.approx(1.0, abs=1e-4)
    assert result.prompt_eval_count and result.prompt_eval_count > 0
    short = client.embed(model=LLM, input="a cat", dimensions=8).embeddings[0]
    assert len(short) == 8
    assert sum(v * v for v in short) == pytest.approx(1.0, abs=1e-4)
    legacy = client.embeddings(model=LLM, prompt="a cat").embedding
    assert legacy == pytest.approx(vectors[0], abs=1e-5)


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (
            lambda c: c.chat(model="no-such-model", messages=[{"role": "user", "content": "Hi"}]),
            404,
            "model 'no-such-model' not found",
        ),
        (lambda c: c.generate(model=f"{LLM}:7", prompt="Hi"), 404, "version '7' not found"),
        (
            lambda c: c.chat(
                model=LLM,
                messages=[{"role": "user", "content": "Hi"}],
                tools=[{"type": "function", "function": {"description": "x"}}],
            ),
            400,
            "tools[0].function.name is required",
        ),
        (
            lambda c: c.chat(model=LLM, messages=[{"role": "user", "content": "Hi"}], think=True),
            400,
            "does not support thinking",
        ),
        (
            lambda c: c.generate(model=LLM, prompt="Hi", options={"temperature": -1}),
            400,
            "temperature must be at least 0",
        ),
        (
            lambda c: c.generate(model=LLM, prompt="Hi", options={"num_predict": 0}),
            400,
            "options.num_predict",
        ),
        (
            lambda c: c.generate(model=LLM, prompt="Hi", keep_alive="five minutes"),
            400,
            "invalid duration",
        ),
        (
            lambda c: c.generate(model=LLM, prompt="Hi", suffix="end"),
            400,
            "does not support insert",
        ),
        (
            lambda c: c.chat(model=ONNX, messages=[{"role": "user", "content": "Hi"}]),
            400,
            "does not support text generation",
        ),
        (lambda c: c.embed(model=ONNX, input="Hi"), 400, "does not support embeddings"),
    ],
    ids=[
        "unknown-model",
        "unknown-tag",
        "tools",
        "think",
        "temperature",
        "num-predict",
        "keep-alive",
        "suffix",
        "chat-on-onnx",
        "embed-on-onnx",
    ],
)
def test_errors_reach_the_client_as_ollama_errors(
    client: ollama.Client, call: Any, status: int, message: str
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        call(client)
    assert caught.value.status_code == status
    assert message in caught.value.error


def test_streaming_errors_come_before_the_stream(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        list(
            client.chat(
                model="no-such-model", stream=True, messages=[{"role": "user", "content": "Hi"}]
            )
        )
    assert caught.value.status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/chat", b"{not json", "invalid JSON"),
        ("/api/chat", b"[]", "must be a JSON object"),
        ("/api/chat", b'{"messages": []}', "model is required"),
        ("/api/generate", b'{"model": "stories260K", "prompt": 5}', "prompt"),
        (
            "/api/chat",
            b'{"model": "stories260K", "messages": [{"role": "robot"}]}',
            "messages.0.role",
        ),
        ("/api/chat", b'{"model": "stories260K", "format": "yaml", "messages": []}', "format"),
        (
            "/api/chat",
            b'{"model": "stories260K", "options": {"top_p": "high"}, "messages": []}',
            "options.top_p",
        ),
        ("/api/embed", b'{"model": "stories260K", "input": [1, 2]}', "input"),
        ("/api/show", b"{}", "model is required"),
    ],
)
async def test_bad_bodies_get_ollama_error_shape(
    llm_daemon: DaemonProcess, http: aiohttp.ClientSession, path: str, body: bytes, message: str
) -> None:
    async with http.post(
        llm_daemon.url + path, data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        payload = await response.json()
    assert set(payload) == {"error"}
    assert message in payload["error"]


# ------------------------------------------------------------- Home Assistant


async def test_home_assistant_setup_and_conversation(async_client: ollama.AsyncClient) -> None:
    """The calls homeassistant/components/ollama makes, in its order, with its arguments."""
    # config_flow / __init__ / coordinator: list the models, then the loaded ones.
    installed = await async_client.list()
    downloaded = {m["model"] for m in installed.get("models", [])}
    assert TAG in downloaded  # so the integration does not try to pull it
    loaded = await async_client.ps()
    assert [m.model for m in loaded.models] == [TAG]
    # entity.py: a streaming chat with keep_alive in seconds and the context size.
    stream = await async_client.chat(
        model=TAG,
        messages=[
            ollama.Message(role="system", content="You are a voice assistant."),
            ollama.Message(role="user", content="Tell me a story."),
        ],
        tools=None,
        stream=True,
        keep_alive="-1s",
        options={"num_ctx": 8192, "num_predict": 48},  # num_predict: keeps the test short
        think=None,
        format=None,
    )
    chunks = [chunk async for chunk in stream]
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    assert "".join(c["message"].get("content") or "" for c in chunks)
    assert chunks[-1].done is True
    # The same with Home Assistant's "control" API enabled: a model that knows nothing of
    # tools answers in text or with a call the grammar made valid (test_tool_calls.py has
    # the model that knows Home Assistant's intents).
    stream = await async_client.chat(
        model=TAG,
        messages=[ollama.Message(role="user", content="Turn on the light")],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "HassTurnOn",
                    "description": "Turns on a device",
                    "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
                },
            }
        ],
        stream=True,
        keep_alive="-1s",
        options={"num_ctx": 8192, "num_predict": 48},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].done is True
    for chunk in chunks:
        for call in chunk.message.tool_calls or []:
            assert call.function.name == "HassTurnOn"
            assert set(call.function.arguments) <= {"name"}


async def test_home_assistant_raw_requests(
    llm_daemon: DaemonProcess, http: aiohttp.ClientSession
) -> None:
    """Home Assistant's request bodies on the wire (``model_dump(exclude_none=True)``)."""
    url = llm_daemon.url
    async with http.get(url + "/api/tags") as response:
        assert response.status == 200
        assert [m["model"] for m in (await response.json())["models"]] == [TAG]
    body = {
        "model": TAG,
        "messages": [
            {"role": "system", "content": "You are a voice assistant."},
            {"role": "user", "content": "Once upon a time"},
            {"role": "assistant", "content": "there was a cat."},
            {"role": "user", "content": "Go on."},
        ],
        "tools": [],
        "stream": True,
        "keep_alive": "-1s",
        "options": {"num_ctx": 8192, "num_predict": 48},  # num_predict: keeps the test short
    }
    async with http.post(url + "/api/chat", json=body) as response:
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        lines = [json.loads(line) for line in (await response.text()).splitlines()]
    assert lines[-1]["done"] is True
    assert lines[-1]["done_reason"] in ("stop", "length")
    assert lines[-1]["eval_count"] >= len(lines) - 1
    assert all(not line["done"] and line["message"]["content"] for line in lines[:-1])
    # ai_task.py: structured output through ``format`` and no streaming.
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 12}},
        "required": ["answer"],
    }
    body = {
        **body,
        "stream": False,
        "format": schema,
        "options": {"num_ctx": 8192, "num_predict": 60, "temperature": 0},
    }
    async with http.post(url + "/api/chat", json=body) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["done"] is True
    assert "answer" in json.loads(answer["message"]["content"])


async def test_null_stream_means_the_default(
    llm_daemon: DaemonProcess, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": LLM,
        "prompt": "Once upon a time",
        "raw": True,
        "stream": None,
        "options": {"num_predict": 3, "temperature": 0},
    }
    async with http.post(llm_daemon.url + "/api/generate", json=body) as response:
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        lines = (await response.text()).splitlines()
    assert json.loads(lines[-1])["done"] is True
