"""Canary releases of language models against a real daemon and real GGUF files: a
canary whose chat template refuses every conversation is rolled back while every client is
answered by stable, and a sound canary shadowed beside stable is measured and promoted."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import base_url, make_config, serving, wait_for
from tests.gguf_templates import with_chat_template

pytest.importorskip("gguf", reason="the gguf package writes the refusing version")

CHAT = {
    "model": "tales",
    "max_tokens": 6,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Tell me a story"}],
}


def add_gguf_version(repo: Path, version: str, source: Path, template: str | None = None) -> None:
    folder = repo / "tales" / version
    folder.mkdir(parents=True)
    if template is None:
        shutil.copyfile(source, folder / "model.gguf")
    else:
        with_chat_template(source, folder / "model.gguf", template)
    (folder / "manifest.toml").write_text(
        'name = "tales"\nruntime = "gguf"\nfile = "model.gguf"\n'
        "[options]\nthreads = 1\nn_ctx = 256\n"
    )


def shadow_caught_up(status: dict[str, Any]) -> bool:
    running = status["running"].get("tales")
    return running is None or (
        running["canary_stats"]["requests"] >= running["stable_stats"]["requests"]
    )


async def chat(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.post(url + "/v1/chat/completions", json=CHAT) as response:
        return response.status, await response.json()


async def test_refusing_canary_is_rolled_back_and_clients_never_see_it(
    stories_gguf: Path, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    add_gguf_version(tmp_path, "1", stories_gguf)
    add_gguf_version(
        tmp_path,
        "2",
        stories_gguf,
        "{{ raise_exception('this version refuses every conversation') }}",
    )
    config = make_config(
        models={"dir": tmp_path, "version_policy": "all", "queue_size": 100},
        canary={"enabled": True, "share": 0.5, "min_requests": 4, "window": 3600},
    )
    async with serving(config) as server:
        url = base_url(server)
        assert server.core is not None and server.core.canary is not None
        canary = server.core.canary
        await wait_for(lambda: canary.canary_version("tales") == "2")
        answers = await asyncio.gather(*(chat(http, url) for _ in range(40)))
        assert all(status == 200 for status, _ in answers), answers
        assert all(body["choices"][0]["message"]["content"] for _, body in answers)
        assert canary.canary_version("tales") is None
        decision = canary.recent[-1]
        assert (decision.decision, decision.canary, decision.stable) == ("rolled_back", "2", "1")
        assert "error rate" in decision.reason
        async with http.get(url + "/metrics") as response:
            text = await response.text()
        labels = ('model="tales"', 'version="2"', 'side="canary"', 'result="error"')
        line = next(
            x
            for x in text.splitlines()
            if x.startswith("appliance_canary_requests_total{")
            and all(label in x for label in labels)
        )
        assert float(line.split()[-1]) >= 4


async def test_shadowed_canary_is_measured_per_token_and_promoted(
    stories_gguf: Path, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    add_gguf_version(tmp_path, "1", stories_gguf)
    add_gguf_version(tmp_path, "2", stories_gguf)
    config = make_config(
        models={"dir": tmp_path, "version_policy": "all", "queue_size": 100},
        # The latency margin is wide: this test is about measuring and promoting, and a
        # shared two-core box times two copies of one model unevenly.
        canary={
            "enabled": True,
            "mode": "shadow",
            "min_requests": 3,
            "window": 1.5,
            "max_latency_ratio": 50,
        },
    )
    async with serving(config) as server:
        url = base_url(server)
        assert server.core is not None and server.core.canary is not None
        canary = server.core.canary
        await wait_for(lambda: canary.canary_version("tales") == "2")
        seen: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while canary.canary_version("tales") == "2" and time.monotonic() < deadline:
            status, _ = await chat(http, url)
            assert status == 200
            # Let the shadow copy (run after each answer) finish before the next request.
            await wait_for(lambda: shadow_caught_up(canary.status()))
            running = canary.status()["running"].get("tales")
            if running is not None:
                seen = running
        assert seen, "the canary was never observed running"
        # Both sides measured: stable answered, the shadow copies ran on the canary.
        assert seen["stable_stats"]["requests"] >= 1 and seen["canary_stats"]["requests"] >= 1
        assert seen["canary_stats"]["errors"] == 0
        assert seen["canary_stats"]["latency_avg_ms"] is not None
        decision = canary.recent[-1]
        assert (decision.decision, decision.canary) == ("promoted", "2"), (decision, seen)
        await wait_for(
            lambda: server.core is not None and server.core.models.get("tales").version == "2"
        )
