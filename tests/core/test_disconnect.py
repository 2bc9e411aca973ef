"""A client that goes away stops its generation; the model is free for the next one at once.

Generations here cannot end by themselves (end-of-story token banned, ``max_tokens`` 2000,
seconds of work). After the client closes its connection the model's running gauge must
drop to 0, no more tokens may be counted, and a new request must be answered in a small
fraction of the time the abandoned generation still had left: the model runs one request
at a time, so a generation that kept going would hold the new request up. "The time it
had left" is measured, once per module, on the same generation left to run to the end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
MAX_TOKENS = 2000
SEEN_BEFORE_LEAVING = 20  # tokens generated before the client disconnects
TOKENS = "appliance_tokens_generated_total"
RUNNING = "appliance_requests_running"
QUEUED = "appliance_queue_depth"
FIRST_TOKENS = "appliance_time_to_first_token_seconds_count"


def endless(route: str, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": {str(EOS): -100},
        "stream": stream,
    }
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    else:
        body["prompt"] = "Once upon a time"
    return body


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    """The stories260K sample of a metric on /metrics (0 when it does not exist yet)."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == MODEL:
                return float(sample.value)
    return 0.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def stream_text(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[str]:
    """The non-empty text pieces of a streamed completion, which must end in [DONE]."""
    async with http.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        events = [
            line[6:].strip()
            for line in (await resp.text()).splitlines()
            if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    texts = (json.loads(event)["choices"][0]["text"] for event in events[:-1])
    return [text for text in texts if text]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(stories_gguf: Path) -> AsyncIterator[Server]:
    async with serving(make_config(models={"files": [stories_gguf], "parallel": 1})) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def full_generation(server: Server, client: aiohttp.ClientSession) -> float:
    """Seconds the endless generation takes when nobody leaves (round trip included)."""
    started = time.monotonic()
    async with client.post(
        base_url(server) + "/v1/completions", json=endless("/v1/completions", stream=False)
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "length"
    return time.monotonic() - started


async def abandon(url: str, route: str, *, stream: bool, http: aiohttp.ClientSession) -> float:
    """Start an endless generation, leave once SEEN_BEFORE_LEAVING tokens were made.

    Returns the token counter as it was just before the connection was closed.
    """
    before = await metric(http, url, TOKENS)
    # Its own session, so closing it really closes the connection the generation runs on.
    async with aiohttp.ClientSession() as leaving:
        if stream:
            async with leaving.post(url + route, json=endless(route, stream=True)) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                events = 0
                async for line in resp.content:
                    events += line.startswith(b"data: {")
                    if events >= SEEN_BEFORE_LEAVING:
                        break
                at_close = await metric(http, url, TOKENS)
                resp.close()  # drop the connection mid-stream
        else:
            request = asyncio.create_task(
                leaving.post(url + route, json=endless(route, stream=False))
            )

            async def generating() -> bool:
                return await metric(http, url, TOKENS) - before >= SEEN_BEFORE_LEAVING

            await eventually(generating)
            at_close = await metric(http, url, TOKENS)
            request.cancel()  # the client gives up: aiohttp closes the connection
            with pytest.raises(asyncio.CancelledError):
                await request
    return at_close


@pytest.mark.parametrize(
    ("route", "stream"),
    [("/v1/chat/completions", True), ("/v1/completions", True), ("/v1/completions", False)],
    ids=["chat-stream", "completion-stream", "completion-waiting"],
)
async def test_disconnect_stops_the_generation(
    server: Server,
    client: aiohttp.ClientSession,
    full_generation: float,
    route: str,
    stream: bool,
) -> None:
    url = base_url(server)
    before = await metric(client, url, TOKENS)
    at_close = await abandon(url, route, stream=stream, http=client)
    left = time.monotonic()

    async def stopped() -> bool:
        return await metric(client, url, RUNNING) == 0

    await eventually(stopped)
    after_stop = await metric(client, url, TOKENS)
    abandoned = after_stop - before
    tokens_per_second = MAX_TOKENS / full_generation
    # Well below the 2000 it would have made: it stopped within about a second's worth.
    assert SEEN_BEFORE_LEAVING - 1 <= abandoned < MAX_TOKENS / 2
    assert after_stop - at_close < tokens_per_second, (after_stop, at_close, full_generation)

    # The model is free right away: this request does not wait for the abandoned one.
    asked = time.monotonic()
    text = await stream_text(
        client,
        url,
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
    )
    answered = time.monotonic()
    assert "".join(text).startswith(", there was")
    remaining = full_generation * (MAX_TOKENS - abandoned) / MAX_TOKENS
    timings = {
        "left->answered": answered - left,
        "asked->answered": answered - asked,
        "remaining": remaining,
        "abandoned": abandoned,
    }
    assert answered - left < remaining / 4, timings
    assert answered - asked < remaining / 4, timings

    # Nothing more was generated for the abandoned request in the meantime: the counter
    # moved by exactly the pieces the new request streamed.
    assert await metric(client, url, TOKENS) == after_stop + len(text)
    assert await metric(client, url, QUEUED) == 0


async def test_disconnect_while_queued_frees_the_place(
    server: Server, client: aiohttp.ClientSession
) -> None:
    """A request that leaves while it waits in the queue never runs and frees its place."""
    url = base_url(server)
    body = endless("/v1/completions", stream=True)
    tokens_before = await metric(client, url, TOKENS)
    first_tokens_before = await metric(client, url, FIRST_TOKENS)

    async def queue_depth_is(value: float) -> bool:
        return await metric(client, url, QUEUED) == value

    async with (
        aiohttp.ClientSession() as first_client,
        aiohttp.ClientSession() as second_client,
        first_client.post(url + "/v1/completions", json=body) as first,
    ):
        assert first.status == 200
        await first.content.readline()
        waiting = asyncio.create_task(second_client.post(url + "/v1/completions", json=body))
        await eventually(lambda: queue_depth_is(1))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: queue_depth_is(0))
        assert await metric(client, url, RUNNING) == 1
        first.close()

    async def stopped() -> bool:
        return await metric(client, url, RUNNING) == 0

    await eventually(stopped)
    assert await metric(client, url, TOKENS) - tokens_before < MAX_TOKENS / 4
    # Only the first request ever reached the model: one first token, not two.
    assert await metric(client, url, FIRST_TOKENS) - first_tokens_before == 1
    pieces = await stream_text(client, url, {"model": MODEL, "prompt": "Once", "max_tokens": 4})
    assert pieces
    assert await metric(client, url, FIRST_TOKENS) - first_tokens_before == 2
