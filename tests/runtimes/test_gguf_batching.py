"""Continuous batching of a real GGUF model behind a real daemon.

stories260K with ``parallel = 4``: several streams decode together in each llama.cpp step
(seen in ``appliance_batch_size``), each must produce exactly the greedy text it produces
alone, a request joins a batch that is already running, a full model queues and then refuses,
a client that leaves frees its slot for a waiting request while the others keep going, and a
repeated prompt prefix is found in the KV cache instead of decoded again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from appliance.server import Server
from tests.conftest import base_url, make_config, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "stories260K"
EOS = 2
SLOTS = 4
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park", "One day, a big"]


def body(prompt: str, max_tokens: int, *, endless: bool = False, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    if endless:  # cannot end before max_tokens: the end-of-story token is banned
        data["logit_bias"] = {str(EOS): -100}
    return data


async def complete(http: aiohttp.ClientSession, url: str, data: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url + "/v1/completions", json=data) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def metric_samples(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, float]:
    """Samples of ``name`` for the model, keyed by their ``le`` label (or '')."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == MODEL:
                out[sample.labels.get("le", "")] = sample.value
    return out


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    return (await metric_samples(http, url, name)).get("", 0.0)


async def eventually_metric(http: aiohttp.ClientSession, url: str, name: str, value: float) -> None:
    for _ in range(1500):
        if await metric(http, url, name) == value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never became {value}")


class Stream:
    """A streamed completion read piece by piece."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.pieces: list[str] = []
        self.finish: str | None = None

    async def next_piece(self) -> str | None:
        """The next text piece, or None once the stream has ended."""
        while True:
            line = await self.resp.content.readline()
            if not line:
                return None
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            self.finish = choice.get("finish_reason") or self.finish
            if choice["text"]:
                self.pieces.append(choice["text"])
                return str(choice["text"])

    async def rest(self) -> str:
        while await self.next_piece() is not None:
            pass
        return "".join(self.pieces)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(stories_gguf: Path) -> AsyncIterator[Server]:
    config = make_config(models={"files": [stories_gguf], "parallel": SLOTS, "queue_size": 1})
    async with serving(config) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alone(server: Server, http: aiohttp.ClientSession) -> dict[str, str]:
    """Each prompt's greedy text, generated with nothing else running."""
    url = base_url(server)
    texts = {}
    for prompt in PROMPTS:
        result = await complete(http, url, body(prompt, 60, endless=True))
        texts[prompt] = result["choices"][0]["text"]
    return texts


async def test_concurrent_streams_decode_together_with_unchanged_results(
    server: Server, http: aiohttp.ClientSession, alone: dict[str, str]
) -> None:
    url = base_url(server)
    before = await metric_samples(http, url, "appliance_batch_size_bucket")
    results = await asyncio.gather(
        *(complete(http, url, body(p, 60, endless=True)) for p in PROMPTS)
    )
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result["choices"][0]["text"] == alone[prompt]
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["usage"]["completion_tokens"] == 60
    after = await metric_samples(http, url, "appliance_batch_size_bucket")
    # Decode steps holding three or four sequences happened (the "4" bucket counts steps of
    # up to 4; steps of up to 2 are subtracted): the streams really shared llama_decode calls.
    shared = (after["4"] - after["2"]) - (before.get("4", 0) - before.get("2", 0))
    assert shared >= 30


async def test_a_request_joins_a_running_batch(
    server: Server, http: aiohttp.ClientSession, alone: dict[str, str]
) -> None:
    url = base_url(server)
    async with http.post(
        url + "/v1/completions", json=body(PROMPTS[0], 1500, endless=True, stream=True)
    ) as resp:
        long = Stream(resp)
        for _ in range(10):
            assert await long.next_piece() is not None
        # Joins while the long one runs, and is done long before it.
        joined = await complete(http, url, body(PROMPTS[1], 60, endless=True))
        assert joined["choices"][0]["text"] == alone[PROMPTS[1]]
        assert long.finish is None
        assert await metric(http, url, "appliance_requests_running") == 1
        text = await long.rest()
    assert long.finish == "length"
    assert text.startswith(alone[PROMPTS[0]])


async def test_full_slots_queue_then_refuse_and_a_leaving_client_frees_its_slot(
    server: Server, http: aiohttp.ClientSession, alone: dict[str, str]
) -> None:
    url = base_url(server)
    sessions = [aiohttp.ClientSession() for _ in range(SLOTS)]
    streams: list[Stream] = []
    try:
        for session, prompt in zip(sessions, PROMPTS, strict=True):
            resp = await session.post(
                url + "/v1/completions", json=body(prompt, 1500, endless=True, stream=True)
            )
            assert resp.status == 200
            streams.append(Stream(resp))
            assert await streams[-1].next_piece() is not None
        assert await metric(http, url, "appliance_requests_running") == SLOTS
        # Every slot is busy: one more request waits (queue_size 1), the next is refused.
        waiting = asyncio.create_task(complete(http, url, body(PROMPTS[2], 60, endless=True)))
        await eventually_metric(http, url, "appliance_queue_depth", 1)
        async with http.post(url + "/v1/completions", json=body(PROMPTS[3], 5)) as refused:
            assert refused.status == 503
            assert "Retry-After" in refused.headers
        assert not waiting.done()
        # One client leaves mid-batch: its slot goes to the waiting request, whose text is
        # the one it makes alone, while the other three streams keep going.
        streams[0].resp.close()
        await sessions[0].close()
        result = await waiting
        assert result["choices"][0]["text"] == alone[PROMPTS[2]]
        for stream in streams[1:]:
            assert stream.finish is None
            before = len(stream.pieces)
            assert await stream.next_piece() is not None
            assert len(stream.pieces) == before + 1
        assert await metric(http, url, "appliance_requests_running") == SLOTS - 1
    finally:
        for stream in streams:
            stream.resp.close()
        for session in sessions:
            await session.close()
    await eventually_metric(http, url, "appliance_requests_running", 0)
    assert await metric(http, url, "appliance_queue_depth") == 0


async def test_a_repeated_prompt_prefix_is_reused_from_the_kv_cache(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = base_url(server)
    system = "Tell a story about a girl named Lily who likes to play in the park with her dog."
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Once upon a time"},
    ]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 30, "temperature": 0}

    async def ask() -> dict[str, Any]:
        async with http.post(url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result

    first = await ask()
    cached_before = await metric(http, url, "appliance_prompt_tokens_cached_total")
    second = await ask()
    cached = await metric(http, url, "appliance_prompt_tokens_cached_total") - cached_before
    # All but the last prompt token came from the cache, and the answer did not change.
    assert cached == second["usage"]["prompt_tokens"] - 1
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert second["usage"] == first["usage"]
