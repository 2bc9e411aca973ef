"""The result cache: hits, misses, TTL and LRU, in memory and in a real Redis.

Through a real daemon serving the default sensor model: a repeated request is answered from
the cache (the model's run counter does not move) and counted in ``/metrics``; a different
input, or a model not opted in, is not. The Redis tests start their own ``redis-server`` on a
free port and show two daemons sharing one cache, and, with a data key, that Redis holds
only sealed values under keyed names, and that a value which does not open is a miss.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.config import CacheConfig
from appliance.core.cache import MemoryBackend, ResultCache, request_key
from appliance.core.types import InferResult
from appliance.security.crypto import FieldCipher, new_data_key
from tests.conftest import base_url, make_config, serving

MODEL = "sensor-anomaly"


def result(value: float, size: int = 4) -> InferResult:
    return InferResult(outputs={"score": np.full(size, value, dtype=np.float32)})


def window(seed: int) -> dict[str, Any]:
    data = np.random.default_rng(seed).normal(20, 5, size=(1, 32, 3)).astype(np.float32)
    return {
        "inputs": [
            {
                "name": "window",
                "shape": [1, 32, 3],
                "datatype": "FP32",
                "data": data.reshape(-1).tolist(),
            }
        ]
    }


async def infer(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(f"{url}/v2/models/{MODEL}/infer", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["outputs"]


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    wanted = {
        "appliance_cache_hits_total",
        "appliance_cache_misses_total",
        "appliance_inference_duration_seconds_count",
    }
    out = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model") == MODEL:
                out[sample.name] = sample.value
    return out


# -- the backend on its own ------------------------------------------------------------


def test_keys_depend_on_model_version_inputs_and_outputs() -> None:
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    key = request_key("m", "1", a, ["y"])
    assert key == request_key("m", "1", {"x": a["x"].copy()}, ["y"])
    assert key != request_key("m", "2", a, ["y"])
    assert key != request_key("n", "1", a, ["y"])
    assert key != request_key("m", "1", a, ["y", "z"])
    assert key != request_key("m", "1", {"x": a["x"].reshape(3, 2)}, ["y"])
    assert key != request_key("m", "1", {"x": a["x"].astype(np.float64)}, ["y"])
    text = {"s": np.array([b"ab", b"c"], dtype=object)}
    assert request_key("m", "1", text, []) != request_key(
        "m", "1", {"s": np.array([b"a", b"bc"], dtype=object)}, []
    )


async def test_memory_backend_evicts_the_least_recently_used() -> None:
    cache = MemoryBackend(max_entries=2, max_bytes=1 << 20)
    await cache.put("a", result(1), ttl=60)
    await cache.put("b", result(2), ttl=60)
    assert await cache.get("a") is not None  # "a" is now the most recently used
    await cache.put("c", result(3), ttl=60)
    assert await cache.get("b") is None
    hit = await cache.get("a")
    assert hit is not None and hit.outputs["score"][0] == 1
    assert await cache.get("c") is not None
    assert len(cache) == 2
    with pytest.raises(ValueError, match="read-only"):
        hit.outputs["score"][0] = 5  # a cached result cannot be changed in place


async def test_memory_backend_is_bounded_by_bytes_and_forgets_expired_entries() -> None:
    cache = MemoryBackend(max_entries=100, max_bytes=3 * 16)
    for i in range(5):
        await cache.put(str(i), result(i), ttl=60)  # 16 bytes each
    assert len(cache) == 3
    assert [await cache.get(k) is not None for k in "01234"] == [False] * 2 + [True] * 3
    await cache.put("short", result(9), ttl=0.05)
    assert await cache.get("short") is not None
    await asyncio.sleep(0.1)
    assert await cache.get("short") is None


async def test_results_larger_than_the_entry_limit_are_not_kept() -> None:
    cache = ResultCache(CacheConfig(max_entry_bytes=64))
    await cache.put("small", result(1, size=16), ttl=60)
    await cache.put("large", result(1, size=17), ttl=60)
    assert await cache.get("small") is not None
    assert await cache.get("large") is None
    await cache.close()


# -- through the daemon ----------------------------------------------------------------


async def test_a_repeated_request_is_answered_from_the_cache(
    default_models: Path, http: aiohttp.ClientSession
) -> None:
    config = make_config(cache={"models": [MODEL]})
    async with serving(config) as server:
        url = base_url(server)
        first = await infer(http, url, window(1))
        again = await infer(http, url, window(1))
        other = await infer(http, url, window(2))
        assert again == first
        assert other != first
        counts = await metrics(http, url)
        assert counts["appliance_cache_hits_total"] == 1
        assert counts["appliance_cache_misses_total"] == 2
        assert counts["appliance_inference_duration_seconds_count"] == 2  # runs: two misses


async def test_the_ttl_option_expires_results_and_models_not_opted_in_are_not_cached(
    tmp_path: Path, default_models: Path, http: aiohttp.ClientSession
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(default_models / MODEL, repo / MODEL)
    manifest = repo / MODEL / "manifest.toml"
    manifest.write_text(manifest.read_text() + "cache = true\ncache_ttl = 0.2\n")
    async with serving(make_config(models={"dir": repo})) as server:
        url = base_url(server)
        await infer(http, url, window(1))
        await infer(http, url, window(1))
        await asyncio.sleep(0.3)
        await infer(http, url, window(1))
        counts = await metrics(http, url)
        assert counts["appliance_cache_hits_total"] == 1
        assert counts["appliance_cache_misses_total"] == 2
    async with serving(make_config()) as server:  # no opt-in: never cached
        url = base_url(server)
        await infer(http, url, window(1))
        await infer(http, url, window(1))
        counts = await metrics(http, url)
        assert counts["appliance_cache_hits_total"] == 0
        assert counts["appliance_cache_misses_total"] == 0
        assert counts["appliance_inference_duration_seconds_count"] == 2


# -- Redis -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis", reason="the redis package is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError("redis-server exited") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def two_daemons(redis_url: str) -> AsyncIterator[tuple[str, str]]:
    cache = {"models": [MODEL], "backend": "redis", "redis_url": redis_url}
    async with serving(make_config(cache=cache)) as a, serving(make_config(cache=cache)) as b:
        yield base_url(a), base_url(b)


async def test_daemons_share_results_through_redis(
    two_daemons: tuple[str, str], http: aiohttp.ClientSession
) -> None:
    a, b = two_daemons
    first = await infer(http, a, window(1))
    assert await infer(http, b, window(1)) == first  # b never ran the model for it
    counts_a, counts_b = await metrics(http, a), await metrics(http, b)
    assert counts_a["appliance_cache_misses_total"] == 1
    assert counts_b["appliance_cache_hits_total"] == 1
    assert counts_b["appliance_inference_duration_seconds_count"] == 0


async def test_redis_entries_expire_and_byte_results_round_trip(redis_url: str) -> None:
    cache = ResultCache(CacheConfig(backend="redis", redis_url=redis_url))
    try:
        value = InferResult(
            outputs={
                "score": np.arange(6, dtype=np.float32).reshape(2, 3),
                "label": np.array([b"hot", b"cold"], dtype=object),
            }
        )
        await cache.put("k", value, ttl=0.2)
        hit = await cache.get("k")
        assert hit is not None
        np.testing.assert_array_equal(hit.outputs["score"], value.outputs["score"])
        assert hit.outputs["score"].dtype == np.float32
        assert list(hit.outputs["label"]) == [b"hot", b"cold"]
        await asyncio.sleep(0.4)
        assert await cache.get("k") is None
    finally:
        await cache.close()


async def test_an_unreachable_redis_is_a_miss_not_an_error(http: aiohttp.ClientSession) -> None:
    cache = {
        "models": [MODEL],
        "backend": "redis",
        "redis_url": f"redis://127.0.0.1:{_free_port()}/0",
    }
    async with serving(make_config(cache=cache)) as server:
        url = base_url(server)
        assert await infer(http, url, window(1)) == await infer(http, url, window(1))
        counts = await metrics(http, url)
        assert counts["appliance_cache_misses_total"] == 2
        assert counts["appliance_inference_duration_seconds_count"] == 2


# -- Redis with a data key: encryption at rest -------------------------------------------


async def test_redis_values_are_sealed_and_fail_closed(redis_url: str) -> None:
    import redis.asyncio as aioredis

    cipher = FieldCipher(bytes.fromhex(new_data_key()))
    config = CacheConfig(backend="redis", redis_url=redis_url)
    cache, plain = ResultCache(config, cipher=cipher), ResultCache(config)
    stranger = ResultCache(config, cipher=FieldCipher(bytes(32)))
    client = aioredis.Redis.from_url(redis_url)

    def name(key: str) -> str:
        return f"{config.redis_prefix}e:{cipher.pseudonym(key)}"

    try:
        await cache.put("m/1/aa", result(3.5), ttl=30)
        hit = await cache.get("m/1/aa")
        assert hit is not None and list(hit.outputs["score"]) == [3.5] * 4
        [stored_name] = await client.keys("*")
        assert stored_name.decode() == name("m/1/aa")  # no model name, no input hash
        stored = await client.get(stored_name)
        assert stored.startswith(b"enc1:")
        assert np.float32(3.5).tobytes() not in stored and b"score" not in stored
        # Another data key: a miss.
        assert await stranger.get("m/1/aa") is None
        # A sealed value moved under another request's name: a miss.
        await client.set(name("m/1/bb"), stored)
        assert await cache.get("m/1/bb") is None
        # Altered by one bit: a miss.
        await client.set(name("m/1/aa"), stored[:-1] + bytes([stored[-1] ^ 1]))
        assert await cache.get("m/1/aa") is None
        # A plain value written by whoever else can write to Redis: a miss, not an answer.
        await plain.put("m/1/aa", result(9.0), ttl=30)
        forged = await client.get(config.redis_prefix + "m/1/aa")
        assert forged is not None and not forged.startswith(b"enc1:")
        await client.set(name("m/1/aa"), forged)
        assert await cache.get("m/1/aa") is None
        assert getattr(cache.backend, "rejected", None) == 3
        # A box without the data key cannot read sealed values either; quietly a miss.
        await client.set(config.redis_prefix + "m/1/cc", stored)
        assert await plain.get("m/1/cc") is None
    finally:
        await client.aclose()
        for each in (cache, plain, stranger):
            await each.close()


async def test_daemons_share_sealed_results_and_answer_past_bad_ones(
    redis_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    import redis.asyncio as aioredis

    (tmp_path / "data-key").write_text(new_data_key() + "\n")
    sections: dict[str, Any] = {
        "cache": {"models": [MODEL], "backend": "redis", "redis_url": redis_url},
        "security": {"data_key_file": str(tmp_path / "data-key")},
    }
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with serving(make_config(**sections)) as a, serving(make_config(**sections)) as b:
            first = await infer(http, base_url(a), window(1))
            assert await infer(http, base_url(b), window(1)) == first  # opened by b
            assert (await metrics(http, base_url(b)))["appliance_cache_hits_total"] == 1
            [stored_name] = await client.keys("*")
            assert MODEL.encode() not in stored_name
            stored = await client.get(stored_name)
            await client.set(stored_name, stored[:-1] + bytes([stored[-1] ^ 1]))
            # The altered value is a miss: the model runs, the client gets its answer.
            assert await infer(http, base_url(b), window(1)) == first
            counts = await metrics(http, base_url(b))
            assert counts["appliance_cache_hits_total"] == 1
            assert counts["appliance_cache_misses_total"] == 1
            assert counts["appliance_inference_duration_seconds_count"] == 1
    finally:
        await client.aclose()
