"""The GGUF prompt cache survives a restart of a real daemon subprocess (stories260K).

Two requests sharing a long prefix save that prefix's KV state in the state directory; after
a restart, a third request with the same prefix takes it from the file instead of decoding
it (``appliance_prompt_tokens_cached_total``) and answers exactly what it answers cold. A
damaged file and a stray one are ignored and removed, and the daemon answers as without.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import daemon

MODEL = "tiny"
SYSTEM = "Lily and Tom went to the park with their dog. " * 12  # about 130 tokens


def post(url: str, prompt: str) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    request = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def cached_tokens(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = sample.name == "appliance_prompt_tokens_cached_total"
            if wanted and sample.labels.get("model") == MODEL:
                return float(sample.value)
    return 0.0


def repo(tmp_path: Path, stories: Path) -> Path:
    directory = tmp_path / "models" / MODEL
    directory.mkdir(parents=True)
    shutil.copyfile(stories, directory / "model.gguf")
    (directory / "manifest.toml").write_text(
        f'name = "{MODEL}"\nruntime = "gguf"\nfile = "model.gguf"\n\n[options]\n'
        "embeddings = false\nthreads = 1\nparallel = 2\nn_ctx = 512\n"
        "prompt_cache_min_tokens = 64\nprompt_cache_mb = 64\n",
        encoding="utf-8",
    )
    return directory.parent


def wait_files(cache: Path, count: int) -> list[Path]:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files = sorted(cache.glob("*.kv"))
        if len(files) >= count:
            return files
        time.sleep(0.05)
    raise AssertionError(f"no prompt-cache file in {cache}")


def test_the_prompt_cache_survives_a_restart_and_a_damaged_file_is_ignored(
    tmp_path: Path, stories_gguf: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    env = {
        "APPLIANCE_MODELS__DIR": str(repo(tmp_path, stories_gguf)),
        "STATE_DIRECTORY": str(state),
    }
    cache = state / "prompt-cache"
    ask = [SYSTEM + ending for ending in ("Once upon", "The dog", "One day")]

    with daemon(env=env) as first:
        post(first.url, ask[0])
        post(first.url, ask[1])  # shares SYSTEM with the first: saved
        (saved,) = wait_files(cache, 1)
    # Damaged: one payload byte flipped; and a file that is not one of ours at all.
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    saved.write_bytes(bytes(data))
    stray = cache / ("0" * 32 + ".kv")
    stray.write_bytes(b"not a prompt cache file")

    with daemon(env=env) as second:
        cold = post(second.url, ask[2])
        assert cached_tokens(second.url) == 0  # the damaged state was not used
        assert not saved.exists() and not stray.exists()
        post(second.url, ask[0])  # shares SYSTEM again: saved anew
        wait_files(cache, 1)

    with daemon(env=env) as third:
        restored = post(third.url, ask[2])
        reused = cached_tokens(third.url)
    prompt_tokens = cold["usage"]["prompt_tokens"]
    assert 64 <= reused < prompt_tokens  # the shared prefix came from the file
    assert restored["choices"][0]["text"] == cold["choices"][0]["text"]
    assert restored["usage"] == cold["usage"]
