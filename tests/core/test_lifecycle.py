"""Model lifecycle against a real daemon and real ONNX models: versions, canary rollback
under load, hot swap under load, failed new versions, idle unload, LRU eviction."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from appliance.core.types import ModelState
from tests.conftest import base_url, make_config, serving, wait_for
from tests.core.repo_fixtures import add_version
from tests.transports.sensor_data import sensor_windows

WINDOWS = sensor_windows(8)


def infer_body(i: int) -> dict[str, Any]:
    window = WINDOWS[i % len(WINDOWS)][None]
    return {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(window.shape),
                "data": window.ravel().tolist(),
            }
        ]
    }


async def infer(
    http: aiohttp.ClientSession, url: str, name: str, i: int, version: str | None = None
) -> tuple[int, dict[str, Any]]:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    async with http.post(url + path, json=infer_body(i)) as resp:
        return resp.status, await resp.json()


def score_of(body: dict[str, Any]) -> float:
    return float(next(o for o in body["outputs"] if o["name"] == "score")["data"][0])


async def test_versions_are_addressed_by_route_and_policy(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    for version in ("1", "2", "10"):
        add_version(tmp_path, "anom", version)
    config = make_config(models={"dir": tmp_path, "version_policy": "all"})
    async with serving(config) as server:
        url = base_url(server)
        async with http.get(url + "/v2/models/anom") as resp:
            meta = await resp.json()
        assert meta["versions"] == ["1", "2", "10"]
        for version in ("1", "10"):
            status, body = await infer(http, url, "anom", 0, version)
            assert status == 200 and body["model_version"] == version
        status, body = await infer(http, url, "anom", 0)
        assert body["model_version"] == "10"  # the newest is stable
        status, _ = await infer(http, url, "anom", 0, "3")
        assert status == 404
    config = make_config(
        models={"dir": tmp_path, "version_policy": "specific", "versions": ["anom:2"]}
    )
    async with (
        serving(config) as server,
        http.post(base_url(server) + "/v2/repository/index") as resp,
    ):
        assert [(r["version"], r["state"]) for r in await resp.json()] == [("2", "READY")]


async def test_broken_canary_is_rolled_back_under_load_without_client_errors(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "anom", "1")
    add_version(tmp_path, "anom", "2", broken=True)
    config = make_config(
        models={"dir": tmp_path, "version_policy": "all", "queue_size": 100},
        canary={"enabled": True, "share": 0.5, "min_requests": 5, "window": 3600},
    )
    async with serving(config) as server:
        url = base_url(server)
        assert server.core is not None and server.core.canary is not None
        canary, models = server.core.canary, server.core.models
        await wait_for(lambda: canary.canary_version("anom") == "2")
        counter = itertools.count()
        answers = await asyncio.gather(
            *(infer(http, url, "anom", next(counter)) for _ in range(80))
        )
        # Every client got a sound answer: the canary's NaN answers were retried on stable.
        assert all(status == 200 for status, _ in answers), answers
        assert all(np.isfinite(score_of(body)) for _, body in answers)
        assert canary.canary_version("anom") is None
        decision = canary.recent[-1]
        assert (decision.decision, decision.canary, decision.stable) == ("rolled_back", "2", "1")
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
        assert 'appliance_canary_decisions_total{decision="rolled_back",model="anom"} 1.0' in text
        async with http.get(url + "/health") as resp:
            health = await resp.json()
        assert health["units"]["lifecycle"]["canary"]["decisions"][0]["decision"] == "rolled_back"
        assert server.alerts is not None
        assert any(
            e.rule == "canary_rollback" and e.state == "firing" for e in server.alerts.recent
        )
        await wait_for(lambda: "2" not in {h.version for h in models.versions("anom")})


async def test_hot_swap_under_continuous_load_drops_nothing(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "anom", "1")
    config = make_config(models={"dir": tmp_path, "queue_size": 64})
    async with serving(config) as server:
        url = base_url(server)
        stop = asyncio.Event()
        results: list[tuple[int, str]] = []

        async def client(k: int) -> None:
            for i in itertools.count(k * 1000):
                if stop.is_set():
                    return
                status, body = await infer(http, url, "anom", i)
                results.append((status, body.get("model_version", body.get("error", ""))))

        clients = [asyncio.create_task(client(k)) for k in range(4)]
        await wait_for(lambda: len(results) > 20, timeout=30)
        add_version(tmp_path, "anom", "2")
        async with http.post(url + "/v2/repository/models/anom/load") as resp:
            assert resp.status == 200
            assert (await resp.json())["versions"] == {"2": "ready"}
        seen = len(results)
        await wait_for(lambda: len(results) > seen + 20, timeout=30)
        # A new version that cannot load leaves the serving one in place (SIGHUP path).
        add_version(tmp_path, "anom", "3", corrupt=True)
        await server.reload()
        seen = len(results)
        await wait_for(lambda: len(results) > seen + 20, timeout=30)
        stop.set()
        await asyncio.gather(*clients)
        assert all(status == 200 for status, _ in results), {s for s, _ in results}
        assert {"1", "2"} <= {v for _, v in results}
        assert results[-1][1] == "2"
        assert server.core is not None
        states = {h.version: h.state for h in server.core.models.versions("anom")}
        assert states["3"] is ModelState.FAILED and states["2"] is ModelState.READY


async def test_idle_models_unload_and_load_again_on_use(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "anom", "1")
    config = make_config(models={"dir": tmp_path, "keep_alive": 0.2})
    async with serving(config) as server:
        url = base_url(server)
        assert server.core is not None
        handle = server.core.models.get("anom")
        await wait_for(lambda: handle.state is ModelState.UNLOADED)
        status, _ = await infer(http, url, "anom", 0)  # loads on first use
        assert status == 200
        await wait_for(lambda: handle.state is ModelState.UNLOADED)
        async with http.get(url + "/metrics") as resp:
            assert 'appliance_model_unloads_total{model="anom",reason="idle"}' in await resp.text()


async def test_least_recently_used_model_is_evicted_under_max_loaded(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    for name in ("a", "b", "c"):
        add_version(tmp_path, name, "1")
    config = make_config(models={"dir": tmp_path, "max_loaded": 2})
    async with serving(config) as server:
        url = base_url(server)
        assert server.core is not None
        models = server.core.models

        def loaded() -> set[str]:
            return {h.name for h in models.all_handles() if h.state is ModelState.READY}

        assert loaded() == {"a", "b"}  # preloaded as far as the limit allows
        assert (await infer(http, url, "a", 0))[0] == 200  # b is now the least recently used
        assert (await infer(http, url, "c", 0))[0] == 200
        assert loaded() == {"a", "c"}
        assert (await infer(http, url, "b", 0))[0] == 200
        assert loaded() == {"b", "c"}


async def test_admin_unload_and_load(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    add_version(tmp_path, "anom", "1")
    async with serving(make_config(models={"dir": tmp_path})) as server:
        url = base_url(server)
        async with http.post(url + "/v2/repository/models/anom/unload") as resp:
            assert (await resp.json())["versions"] == {"1": "unloaded"}
        status, body = await infer(http, url, "anom", 0)
        assert status == 503, body
        async with http.post(url + "/v2/repository/models/anom/load") as resp:
            assert (await resp.json())["versions"] == {"1": "ready"}
        assert (await infer(http, url, "anom", 0))[0] == 200
        async with http.post(url + "/v2/repository/models/nope/load") as resp:
            assert resp.status == 404


async def test_ollama_keep_alive_unloads_and_the_next_request_loads_again(
    stories_gguf: Path, http: aiohttp.ClientSession
) -> None:
    async with serving(make_config(models={"files": [stories_gguf]})) as server:
        url = base_url(server)
        assert server.core is not None
        handle = server.core.models.get("stories260K")
        ask = {
            "model": "stories260K",
            "prompt": "Once upon a time",
            "stream": False,
            "options": {"num_predict": 4, "temperature": 0},
            "keep_alive": 0,
        }
        async with http.post(url + "/api/generate", json=ask) as resp:
            assert resp.status == 200, await resp.text()
        await wait_for(lambda: handle.state is ModelState.UNLOADED)
        ask["keep_alive"] = "5m"
        async with http.post(url + "/api/generate", json=ask) as resp:
            assert resp.status == 200 and (await resp.json())["done"]
        assert handle.state is ModelState.READY and handle.keep_alive == 300
        # An empty prompt with keep_alive 0 is Ollama's "unload now".
        async with http.post(
            url + "/api/generate", json={"model": "stories260K", "keep_alive": 0}
        ) as resp:
            assert (await resp.json())["done_reason"] == "unload"
        await wait_for(lambda: handle.state is ModelState.UNLOADED)
