"""Slots and KV-cache options of a real GGUF model (stories260K) behind a real daemon.

A model without ``parallel`` gets the slots of the automatic rule, an explicit ``parallel``
is taken as it is, concurrent greedy streams on the automatic slots give exactly what each
gives alone, and the KV-cache options are checked when the manifest is read (a bad value is
a problem naming the key) and accepted by llama.cpp when the model loads.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.core.repository import read_manifest
from appliance.runtimes.gguf import GgufRuntime
from appliance.runtimes.llama_options import (
    MAX_AUTO_SLOTS,
    MIN_AUTO_SLOTS,
    auto_slots,
    slots_that_fit,
)
from appliance.server import Server
from tests.conftest import base_url, make_config, serving

MODEL = "tiny"
HOME_INTENT = (
    Path(__file__).resolve().parents[2] / "models" / "home-intent" / "home-intent-q8_0.gguf"
)
PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Tom went to the park",
    "One day, a big",
    "Tom had a red ball",
    "The sun was hot",
    "A cat sat on",
    "Sue liked to sing",
]


def repo(tmp_path: Path, model: Path, options: str) -> Path:
    directory = tmp_path / "models" / MODEL
    directory.mkdir(parents=True)
    shutil.copyfile(model, directory / "model.gguf")
    (directory / "manifest.toml").write_text(
        f'name = "{MODEL}"\nruntime = "gguf"\nfile = "model.gguf"\n\n[options]\n'
        f"embeddings = false\n{options}",
        encoding="utf-8",
    )
    return directory.parent


def runtime_of(server: Server) -> GgufRuntime:
    assert server.core is not None
    runtime = server.core.models.get(MODEL).runtime
    assert isinstance(runtime, GgufRuntime)
    return runtime


def test_the_automatic_rule() -> None:
    assert auto_slots(1) == 4
    assert auto_slots(2) == 8
    assert auto_slots(64) == MAX_AUTO_SLOTS
    assert auto_slots(0) == MIN_AUTO_SLOTS
    # Memory: no more slots than a quarter of what is available holds, never fewer than 1.
    assert slots_that_fit(8, 100, 4000) == 8
    assert slots_that_fit(8, 100, 1000) == 2
    assert slots_that_fit(8, 10_000, 1000) == 1
    assert slots_that_fit(8, 100, None) == 8


async def complete(http: aiohttp.ClientSession, url: str, prompt: str) -> dict[str, Any]:
    data = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    async with http.post(url + "/v1/completions", json=data) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


@pytest.mark.asyncio
async def test_a_model_without_parallel_gets_the_automatic_slots_and_same_greedy_text(
    tmp_path: Path, stories_gguf: Path
) -> None:
    config = make_config(models={"dir": repo(tmp_path, stories_gguf, ""), "queue_size": 16})
    async with serving(config) as server, aiohttp.ClientSession() as http:
        assert server.core is not None
        runtime = runtime_of(server)
        # stories260K's KV cache is tiny: the memory check leaves the rule's count.
        assert runtime.slots == auto_slots() > 1
        assert server.core.models.get(MODEL).admission.parallel == auto_slots()
        url = base_url(server)
        alone = [await complete(http, url, p) for p in PROMPTS]
        together = await asyncio.gather(*(complete(http, url, p) for p in PROMPTS))
        for one, other in zip(alone, together, strict=True):
            assert other["choices"][0]["text"] == one["choices"][0]["text"]
            assert other["usage"] == one["usage"]
        assert len({r["choices"][0]["text"] for r in alone}) > 1  # the prompts matter


@pytest.mark.asyncio
async def test_an_explicit_parallel_wins(tmp_path: Path, stories_gguf: Path) -> None:
    config = make_config(models={"dir": repo(tmp_path, stories_gguf, "parallel = 3\n")})
    async with serving(config) as server:
        assert server.core is not None
        assert runtime_of(server).slots == 3
        assert server.core.models.get(MODEL).admission.parallel == 3


@pytest.mark.asyncio
async def test_models_parallel_wins_over_the_rule(tmp_path: Path, stories_gguf: Path) -> None:
    config = make_config(models={"dir": repo(tmp_path, stories_gguf, ""), "parallel": 2})
    async with serving(config) as server:
        assert runtime_of(server).slots == 2


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ('type_k = "q9_0"\n', "type_k"),
        ('type_v = "int8"\n', "type_v"),
        ('flash_attn = "yes"\n', "flash_attn"),
        ("prompt_cache_mb = -1\n", "prompt_cache_mb"),
    ],
)
def test_a_bad_kv_option_is_a_problem_naming_the_key(
    tmp_path: Path, stories_gguf: Path, options: str, key: str
) -> None:
    spec = read_manifest(repo(tmp_path, stories_gguf, options) / MODEL / "manifest.toml")
    assert spec.problem is not None
    assert key in spec.problem


@pytest.mark.asyncio
async def test_quantized_kv_cache_with_flash_attention_loads_and_generates(
    tmp_path: Path,
) -> None:
    """The home-intent model: its 32-wide heads fit q8_0's blocks (stories260K's 8 do not)."""
    options = (
        'type_k = "q8_0"\ntype_v = "q8_0"\nflash_attn = "on"\nparallel = 2\n'
        "cpu_repack = false\nn_ctx = 256\n"
    )
    config = make_config(models={"dir": repo(tmp_path, HOME_INTENT, options)})
    async with serving(config) as server, aiohttp.ClientSession() as http:
        runtime = runtime_of(server)
        assert runtime.slots == 2
        assert (
            runtime.kv_bytes_per_slot == 256 * 4 * 2 * 128 * 34 // 32
        )  # 4 layers, keys and values, 128 wide
        result = await complete(http, base_url(server), "turn on the kitchen light")
        assert result["usage"]["completion_tokens"] > 0


@pytest.mark.asyncio
async def test_a_quantized_kv_cache_on_narrow_heads_is_refused_by_name(
    tmp_path: Path, stories_gguf: Path
) -> None:
    config = make_config(models={"dir": repo(tmp_path, stories_gguf, 'type_k = "q8_0"\n')})
    async with serving(config) as server:
        assert server.core is not None
        error = server.core.models.get(MODEL).error
        assert error is not None and "type_k q8_0" in error and "multiple of 32" in error


@pytest.mark.asyncio
async def test_a_quantized_v_cache_without_flash_attention_fails_to_load_clearly(
    tmp_path: Path,
) -> None:
    options = 'type_v = "q8_0"\nflash_attn = "off"\ncpu_repack = false\n'
    config = make_config(models={"dir": repo(tmp_path, HOME_INTENT, options)})
    async with serving(config) as server:
        assert server.core is not None
        error = server.core.models.get(MODEL).error
        assert error is not None
        assert "type_v q8_0" in error and "flash attention" in error
