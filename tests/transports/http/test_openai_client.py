"""The official ``openai`` Python client against a real daemon subprocess and a real GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import DaemonProcess, daemon


@pytest.fixture(scope="module")
def llm_daemon(stories_gguf: Path) -> Iterator[DaemonProcess]:
    with daemon("--model", str(stories_gguf)) as proc:
        yield proc


@pytest.fixture
def client(llm_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=llm_daemon.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_lists_the_served_file(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["stories260K"]


def test_completion_is_the_greedy_story(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="stories260K", prompt="Once upon a time", max_tokens=12, temperature=0
    )
    # The model's documented greedy continuation.
    assert result.choices[0].text.startswith(", there was a little girl named Lily.")
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert result.usage.prompt_tokens == 5  # BOS + 4 tokens
    assert result.usage.completion_tokens >= 10


def test_chat_completion(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="stories260K",
        messages=[
            {"role": "system", "content": "Tell a story."},
            {"role": "user", "content": "Once upon a time"},
        ],
        max_tokens=16,
        temperature=0,
    )
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert result.usage is not None
    assert result.usage.total_tokens > result.usage.prompt_tokens


def test_streaming_chat_matches_non_streaming(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "stories260K",
        "max_tokens": 20,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Once upon a time"}],
    }
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,  # type: ignore[call-overload]
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion_with_stop(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="stories260K",
        prompt="Once upon a time",
        max_tokens=40,
        temperature=0,
        stop=["Lily"],
        stream=True,
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == ", there was a little girl named "


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.completions.create(
            model="stories260K",
            prompt="Once upon a time",
            max_tokens=24,
            temperature=1.0,
            seed=seed,
        )
        return r.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(1, 6)}) > 1


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
        "additionalProperties": False,
    }
    result = client.chat.completions.create(
        model="stories260K",
        messages=[{"role": "user", "content": "Name a girl."}],
        response_format={"type": "json_schema", "json_schema": {"name": "girl", "schema": schema}},
        max_tokens=60,
        temperature=0,
    )
    data = json.loads(result.choices[0].message.content or "")
    assert set(data) == {"name"}
    assert isinstance(data["name"], str)


def test_embeddings(client: openai.OpenAI) -> None:
    # The client asks for base64 by default and decodes it; ask for floats once too.
    result = client.embeddings.create(model="stories260K", input=["a cat", "a dog", "a cat"])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3
    assert len(vectors[0]) > 0
    assert vectors[0] == pytest.approx(vectors[2])
    assert sum(v * v for v in vectors[0]) == pytest.approx(1.0, rel=1e-3)
    floats = client.embeddings.create(model="stories260K", input="a cat", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], rel=1e-5)
    assert result.usage.prompt_tokens > 0


def test_unknown_model_is_a_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="nope", prompt="x")


def test_bad_parameter_is_a_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="stories260K", prompt="x", temperature=-1)
    assert "temperature" in str(err.value)
