"""Overload: a model's bounded queue refuses the surplus at once and finishes what it took.

One GGUF model with ``parallel = 1`` and ``queue_size = 2`` holds three requests; slow
generations (end-of-story token banned) keep it busy while more arrive. The surplus must be
told 503 with ``Retry-After`` and a JSON error long before the running generation ends, and
every admitted request must still complete.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_url, make_config, serving

MODEL = "stories260K"
EOS = 2
QUEUE_SIZE = 2
RETRY_AFTER = 3


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic() when the whole response had arrived


def slow_completion(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    """A generation that cannot end early: the end-of-story token is banned."""
    return {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(EOS): -100},
        "stream": stream,
    }


async def send(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Answer:
    async with http.post(url + "/v1/completions", json=body) as resp:
        raw = await resp.read()
        content_type = resp.content_type
        answer_headers = dict(resp.headers)
        status = resp.status
    at = time.monotonic()
    if content_type == "application/json":
        return Answer(status, answer_headers, json.loads(raw), at)
    return Answer(status, answer_headers, raw.decode(), at)


async def metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the labelled series does not exist yet)."""
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_surplus_is_refused_at_once_and_admitted_requests_finish(
    stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(
        models={
            "files": [stories_gguf],
            "parallel": 1,
            "queue_size": QUEUE_SIZE,
            "retry_after": RETRY_AFTER,
        }
    )
    async with serving(config) as server:
        url = base_url(server)

        async def running() -> bool:
            return await metric(http, url, "appliance_requests_running", model=MODEL) == 1

        # The first request runs a long generation; the ones behind it are short so the
        # test stays quick, and only the first one's duration matters for the comparison.
        first = asyncio.create_task(send(http, url, slow_completion(1500)))
        await eventually(running)
        queued = [
            asyncio.create_task(send(http, url, slow_completion(100))) for _ in range(QUEUE_SIZE)
        ]

        async def all_queued() -> bool:
            return await metric(http, url, "appliance_queue_depth", model=MODEL) == QUEUE_SIZE

        await eventually(all_queued)
        surplus_sent = time.monotonic()
        surplus = await asyncio.gather(
            send(http, url, slow_completion(100)),
            send(http, url, slow_completion(100, stream=True)),
            send(http, url, slow_completion(100)),
        )
        # Sampled while the first generation is still running (asserted below).
        depth_while_busy = await metric(http, url, "appliance_queue_depth", model=MODEL)
        rejected = await metric(http, url, "appliance_requests_rejected_total", model=MODEL)

        admitted = [await first, *await asyncio.gather(*queued)]

        for answer in surplus:
            assert answer.status == 503, answer.body
            assert answer.headers["Retry-After"] == str(RETRY_AFTER)
            assert answer.headers["Content-Type"].startswith("application/json")
            error = answer.body["error"]
            assert error["type"] == "server_error"
            assert f"model '{MODEL}' is busy" in error["message"]
        # Refused long before the first admitted request finished: the slowest refusal
        # took a small fraction of what the first generation still needed after it.
        first_done = admitted[0].at
        slowest_refusal = max(a.at for a in surplus)
        assert slowest_refusal < first_done
        assert slowest_refusal - surplus_sent < (first_done - slowest_refusal) / 4

        for answer, max_tokens in zip(admitted, [1500, 100, 100], strict=True):
            assert answer.status == 200, answer.body
            assert answer.body["choices"][0]["finish_reason"] == "length"
            assert answer.body["usage"]["completion_tokens"] == max_tokens
        assert depth_while_busy == QUEUE_SIZE
        assert rejected == len(surplus)

        assert await metric(http, url, "appliance_queue_depth", model=MODEL) == 0
        assert await metric(http, url, "appliance_requests_running", model=MODEL) == 0
        assert await metric(
            http,
            url,
            "appliance_requests_total",
            route="/v1/completions",
            model=MODEL,
            status="503",
        ) == len(surplus)
        # The queue is free again: a new request is admitted, not refused.
        again = await send(http, url, slow_completion(5))
        assert again.status == 200, again.body
        assert await metric(http, url, "appliance_requests_rejected_total", model=MODEL) == len(
            surplus
        )


async def test_queue_size_zero_refuses_everything_beyond_the_running_request(
    stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(models={"files": [stories_gguf], "queue_size": 0, "parallel": 1})
    async with serving(config) as server:
        url = base_url(server)
        first = asyncio.create_task(send(http, url, slow_completion(1000)))

        async def running() -> bool:
            return await metric(http, url, "appliance_requests_running", model=MODEL) == 1

        await eventually(running)
        refused = await send(http, url, slow_completion(5))
        done = await first
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"  # the default retry_after, rounded up
        assert refused.at < done.at
        assert done.status == 200
        assert await metric(http, url, "appliance_requests_rejected_total", model=MODEL) == 1


async def test_shed_load_raises_no_http_5xx_alert(
    stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    """The 503s of a full queue are documented backpressure, not server errors: they are
    counted apart (appliance_requests_shed_total) and the critical http_5xx alert, which
    fires above 1 % of real 5xx answers, stays quiet through an overload."""
    config = make_config(
        models={"files": [stories_gguf], "queue_size": 0, "parallel": 1},
        health={"interval": 3600},  # snapshots taken by hand here
        alerts={"min_requests": 5, "http_5xx_window": 600},
    )
    async with serving(config) as server:
        url = base_url(server)
        assert server.health is not None and server.alerts is not None
        server.alerts.evaluate(await server.health.snapshot())  # the window's baseline
        first = asyncio.create_task(send(http, url, slow_completion(1000)))

        async def running() -> bool:
            return await metric(http, url, "appliance_requests_running", model=MODEL) == 1

        await eventually(running)
        refused = await asyncio.gather(*(send(http, url, slow_completion(5)) for _ in range(10)))
        assert [a.status for a in refused] == [503] * 10
        assert (await first).status == 200
        snap = await server.health.snapshot()
        events = server.alerts.evaluate(snap)

        assert snap.http_5xx_total == 0 and snap.http_shed_total == 10
        assert snap.http_requests_total >= 11
        assert "http_5xx" not in [e.rule for e in events]
        assert not [e for e in server.alerts.active() if e.rule == "http_5xx"]
        assert (
            await metric(
                http,
                url,
                "appliance_requests_shed_total",
                transport="http",
                route="/v1/completions",
            )
            == 10
        )
        # Still answered and counted as the 503s they are.
        assert (
            await metric(
                http,
                url,
                "appliance_requests_total",
                route="/v1/completions",
                model=MODEL,
                status="503",
            )
            == 10
        )
