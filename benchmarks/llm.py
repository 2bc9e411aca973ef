"""Benchmarks 1 and 2: LLM decode speed, single stream and concurrent streams.

Peers, all on the same GGUF and the same thread count, one at a time (never two servers
competing for the cores): a low-level llama.cpp decode loop in-process (the engine's limit:
tokenize once, decode one token per step, greedy-sample, detokenize), llama-cpp-python's
``Llama.__call__`` in-process (with and without ``stream=True``), the appliance over HTTP
and ``llama_cpp.server`` over HTTP (``--interrupt_requests False``, else it aborts running
streams when a new one arrives). Streams are greedy; tokens/s counts streamed tokens from
the first to the last (decode speed), aggregate tokens/s all tokens over the wall time.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import Daemon, free_port, median, pct, stop, wait_http

PROMPT = "Once upon a time"


def engine_limit(model: Path, threads: int, tokens: int) -> float:
    """Decode tokens/s of a bare low-level loop: the most any server on llama.cpp can do."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        return _engine_limit(llama_cpp, model, threads, tokens)


def _engine_limit(llama_cpp: Any, model: Path, threads: int, tokens: int) -> float:
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    lmodel = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
    vocab = llama_cpp.llama_model_get_vocab(lmodel)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch = N_CTX, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(lmodel, cparams)
    prompt = (llama_cpp.llama_token * 64)()
    n = llama_cpp.llama_tokenize(vocab, PROMPT.encode(), len(PROMPT), prompt, 64, True, False)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    buf = ctypes.create_string_buffer(64)

    def put(i: int, token: int, pos: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
        batch.seq_id[i][0], batch.logits[i] = 0, logits

    for i in range(n):
        put(i, prompt[i], i, i == n - 1)
    batch.n_tokens = n
    llama_cpp.llama_decode(ctx, batch)
    pos, started = n, time.perf_counter()
    for _ in range(tokens):
        token = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        llama_cpp.llama_token_to_piece(vocab, token, buf, 64, 0, False)
        put(0, token, pos, True)
        batch.n_tokens = 1
        llama_cpp.llama_decode(ctx, batch)
        pos += 1
    rate = tokens / (time.perf_counter() - started)
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(lmodel)
    return rate


def llama_python(model: Path, threads: int, tokens: int) -> tuple[float, float]:
    """``Llama.__call__`` decode tokens/s without and with ``stream=True``."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(model), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    llm(PROMPT, max_tokens=8, temperature=0)  # warm up
    started = time.perf_counter()
    result: Any = llm(PROMPT, max_tokens=tokens, temperature=0)
    whole = result["usage"]["completion_tokens"] / (time.perf_counter() - started)
    times = [
        time.perf_counter() for _ in llm(PROMPT, max_tokens=tokens, temperature=0, stream=True)
    ]
    streamed = (len(times) - 1) / (times[-1] - times[0])
    llm.close()
    return whole, streamed


N_CTX = 512


def model_repo(model: Path, root: Path, threads: int, slots: int, gpu_layers: int = 0) -> Path:
    """A model repository serving ``model`` as "bench" with the benchmark's threads."""
    directory = root / "bench"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "model.gguf"
    if not target.exists() or target.stat().st_size != model.stat().st_size:
        shutil.copyfile(model, target)
    (directory / "manifest.toml").write_text(
        'name = "bench"\nruntime = "gguf"\nfile = "model.gguf"\n\n[options]\n'
        f"threads = {threads}\nparallel = {slots}\nn_ctx = {N_CTX}\nembeddings = false\n"
        f"n_gpu_layers = {gpu_layers}\n"
    )
    return root


async def stream(http: aiohttp.ClientSession, url: str, tokens: int) -> tuple[float, list[float]]:
    """One streamed completion: (time to first token, arrival time of each token)."""
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    arrivals: list[float] = []
    async with http.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return arrivals[0] - started, arrivals


async def single_and_concurrent(
    url: str, levels: list[int], single_tokens: int, tokens: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as http:
        await stream(http, url, 8)  # warm up
        _, arrivals = await stream(http, url, single_tokens)
        out["single_tps"] = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        for level in levels:
            started = time.perf_counter()
            results = await asyncio.gather(*(stream(http, url, tokens) for _ in range(level)))
            wall = time.perf_counter() - started
            ttfts = [r[0] for r in results]
            out[str(level)] = {
                "aggregate_tps": sum(len(r[1]) for r in results) / wall,
                "ttft_p50_ms": pct(ttfts, 50) * 1000,
                "ttft_p99_ms": pct(ttfts, 99) * 1000,
            }
    return out


def llama_cpp_server(
    model: Path, threads: int, levels: list[int], single_tokens: int, tokens: int
) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            str(N_CTX),
            "--model_alias",
            "bench",
            "--interrupt_requests",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/v1/models", proc=proc)
        return asyncio.run(single_and_concurrent(url, levels, single_tokens, tokens))
    finally:
        stop(proc)


def appliance(
    model: Path, threads: int, levels: list[int], single_tokens: int, tokens: int, work: Path
) -> dict[str, Any]:
    repo = model_repo(model, work / "llm-models", threads, max(levels))
    daemon = Daemon(env={"APPLIANCE_MODELS__DIR": str(repo), "APPLIANCE_MODELS__QUEUE_SIZE": "64"})
    try:
        return asyncio.run(single_and_concurrent(daemon.url, levels, single_tokens, tokens))
    finally:
        daemon.stop()


def run(
    model: Path,
    threads: int,
    work: Path,
    *,
    single_tokens: int = 200,
    tokens: int = 100,
    levels: tuple[int, ...] = (1, 4, 8, 16),
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model": model.name,
        "threads": threads,
        "single_tokens": single_tokens,
        "tokens": tokens,
    }
    result["engine_limit_tps"] = median(
        [engine_limit(model, threads, single_tokens) for _ in range(3)]
    )
    result["llama_call_tps"], result["llama_call_stream_tps"] = llama_python(
        model, threads, single_tokens
    )
    result["appliance"] = appliance(model, threads, list(levels), single_tokens, tokens, work)
    result["llama_cpp_server"] = llama_cpp_server(
        model, threads, list(levels), single_tokens, tokens
    )
    return result
