"""Benchmark 7: the appliance's GGUF serving beside llama.cpp's own C++ ``llama-server``.

One run, one model (the 25.8M random Llama), the same threads and slots for every peer,
peers one after another:

* slots — the appliance with no ``parallel`` option (slots by the automatic rule), with
  ``parallel = 1`` (the old default), and ``llama-server`` (built by
  :mod:`benchmarks.llama_server` from the llama.cpp that llama-cpp-python vendors) with as
  many slots: one stream's tokens/s, eight streams' aggregate tokens/s and time to first
  token; the per-token cost above the bare in-process decode loop, in µs;
* KV cache — f16 against q8_0 keys and values with flash attention: KV bytes per slot (from
  the model's shape) and the daemon's resident memory after load, tokens/s;
* prompt cache — time to first token of a request with a 1,500-token system prompt: cold,
  warm (a second request with the same system prompt, found in the slot's KV cache), and
  after a restart of the daemon (found in the prompt cache on disk); ``llama-server`` cold
  and warm beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import Daemon, fmt, free_port, median, pct, rss_of, stop, table, wait_http
from benchmarks.llm import engine_limit

PROMPT = "Once upon a time"
N_CTX = 2048  # per slot, for every peer (the 1,500-token system prompt must fit)
SYSTEM_TOKENS = 1500
ROUNDS = 3


def _manifest(root: Path, model: Path, threads: int, extra: str) -> Path:
    directory = root / "bench"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "model.gguf"
    if not target.exists() or target.stat().st_size != model.stat().st_size:
        shutil.copyfile(model, target)
    (directory / "manifest.toml").write_text(
        'name = "bench"\nruntime = "gguf"\nfile = "model.gguf"\n\n[options]\n'
        f"threads = {threads}\nn_ctx = {N_CTX}\nembeddings = false\n{extra}"
    )
    return root


async def _stream(
    http: aiohttp.ClientSession, url: str, prompt: str, tokens: int
) -> tuple[float, list[float]]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    arrivals: list[float] = []
    async with http.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("text"):
                    arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError(f"{url}: no tokens streamed")
    return arrivals[0] - started, arrivals


async def _throughput(url: str, streams: int) -> dict[str, float]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600),
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
    ) as http:
        await _stream(http, url, PROMPT, 8)  # warm up
        singles = []
        for _ in range(3):
            _, arrivals = await _stream(http, url, PROMPT, 200)
            singles.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
        walls, ttfts, counts = [], [], []
        for _ in range(2):
            started = time.perf_counter()
            results = await asyncio.gather(
                *(_stream(http, url, PROMPT, 100) for _ in range(streams))
            )
            walls.append(time.perf_counter() - started)
            counts.append(sum(len(r[1]) for r in results))
            ttfts += [r[0] for r in results]
    return {
        "single_tps": median(singles),
        "aggregate_tps": max(c / w for c, w in zip(counts, walls, strict=True)),
        "ttft_p50_ms": pct(ttfts, 50) * 1000,
        "ttft_p99_ms": pct(ttfts, 99) * 1000,
    }


async def _ttfts(url: str, prompts: list[str]) -> list[float]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(force_close=True)
    ) as http:
        return [(await _stream(http, url, p, 4))[0] * 1000 for p in prompts]


class LlamaServer:
    """``llama-server`` on a free loopback port."""

    def __init__(self, binary: Path, model: Path, threads: int, slots: int, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(binary),
                "-m",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "-np",
                str(slots),
                "-c",
                str(N_CTX * slots),
                "--no-webui",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/health", proc=self.proc)

    def stop(self) -> None:
        stop(self.proc)


async def _server_timing(url: str) -> float:
    """llama-server's own time a generated token (``timings.predicted_per_token_ms``)."""
    body = {"prompt": PROMPT, "n_predict": 200, "temperature": 0}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
        http.post(url + "/completion", json=body) as resp,
    ):
        data = await resp.json()
    return float(data["timings"]["predicted_per_token_ms"])


def _python_overhead(model: Path, threads: int) -> dict[str, float]:
    """One 200-token stream through the appliance's runtime in-process (no HTTP): the time a
    token spends inside ``llama_decode`` and the time around it (sampling, detokenizing,
    handing the text to the event loop), in µs."""
    from appliance.core.types import GenerateRequest, SamplingParams
    from appliance.runtimes.gguf import GgufRuntime
    from appliance.runtimes.llama_options import GgufOptions

    options = GgufOptions(threads=threads, embeddings=False, prompt_cache_mb=0, n_ctx=N_CTX)
    runtime = GgufRuntime("bench", model, options, workers=1)
    runtime.load_blocking()
    engine = runtime._engine
    assert engine is not None
    spent = [0.0]

    class Timed:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def llama_decode(self, ctx: Any, batch: Any) -> int:
            started = time.perf_counter()
            status = int(self._inner.llama_decode(ctx, batch))
            spent[0] += time.perf_counter() - started
            return status

    engine._llama = Timed(engine._llama)

    async def one(tokens: int) -> tuple[int, float]:
        request = GenerateRequest(
            prompt=PROMPT, params=SamplingParams(max_tokens=tokens, temperature=0.0)
        )
        arrivals, count = [], 0
        async for chunk in runtime.generate(request):
            arrivals.append(time.perf_counter())
            count = chunk.completion_tokens or count
        return count, arrivals[-1] - arrivals[0]

    try:
        asyncio.run(one(8))
        spent[0] = 0.0
        count, wall = asyncio.run(one(200))
    finally:
        runtime.close_blocking()
    return {
        "tps": count / wall,
        "decode_us": spent[0] / count * 1e6,
        "around_us": (wall - spent[0]) / count * 1e6,
    }


def _daemon(repo: Path, state: Path) -> Daemon:
    return Daemon(
        env={
            "APPLIANCE_MODELS__DIR": str(repo),
            "APPLIANCE_MODELS__QUEUE_SIZE": "64",
            "STATE_DIRECTORY": str(state),
        }
    )


def system_prompt(model: Path) -> str:
    """A Home-Assistant-like system prompt of about ``SYSTEM_TOKENS`` tokens."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    lines = ["You are a voice assistant for a home. Answer briefly. Devices:"]
    rooms = ["kitchen", "hall", "bedroom", "office", "garage", "garden", "bath", "attic"]
    i = 0
    while len(vocab.tokenize("\n".join(lines).encode())) < SYSTEM_TOKENS:
        room = rooms[i % len(rooms)]
        lines.append(f"- light.{room}_{i} ({room} lamp {i}): off, brightness {i % 100}%")
        i += 1
    vocab.close()
    return "\n".join(lines) + "\n"


def run(model: Path, threads: int, work: Path) -> dict[str, Any]:
    from appliance.runtimes.llama_options import auto_slots
    from benchmarks.llama_server import build

    slots = auto_slots()
    out: dict[str, Any] = {"threads": threads, "slots": slots, "n_ctx": N_CTX}
    binary = build()
    state = Path(tempfile.mkdtemp(prefix="bench-state-", dir=work))
    peers: dict[str, list[dict[str, float]]] = {}
    configs = (
        ("auto", ""),
        ("one", "parallel = 1\n"),
        ("q8_0", 'type_k = "q8_0"\ntype_v = "q8_0"\nflash_attn = "on"\n'),
    )
    # Rounds: every peer once per round, so the shared box's load changes hit them alike.
    for _ in range(ROUNDS):
        for name, extra in configs:
            repo = _manifest(
                work / f"peers-{name}", model, threads, extra + "prompt_cache_mb = 0\n"
            )
            daemon = _daemon(repo, state)
            try:
                point = {"rss_mb": daemon.rss_bytes() / 2**20}
                peers.setdefault(name, []).append(point | asyncio.run(_throughput(daemon.url, 8)))
            finally:
                daemon.stop()
        server = LlamaServer(binary, model, threads, slots)
        try:
            point = {"rss_mb": rss_of(server.proc.pid) / 2**20}
            point |= asyncio.run(_throughput(server.url, 8))
            point["engine_ms_per_token"] = asyncio.run(_server_timing(server.url))
            peers.setdefault("llama_server", []).append(point)
        finally:
            server.stop()
        overhead = _python_overhead(model, threads)
        peers.setdefault("in_process", []).append(overhead)
        peers.setdefault("bare", []).append({"tps": engine_limit(model, threads, 200)})
    out["rounds"] = peers
    peers_median = {
        name: {key: median([p[key] for p in points]) for key in points[0]}
        for name, points in peers.items()
    }
    out["peers"] = peers_median
    out["engine_limit_tps"] = peers_median["bare"]["tps"]
    out["kv_bytes_per_slot"] = _kv_per_slot(model)
    out["prompt_cache"] = _prompt_cache(model, threads, work, binary, slots)
    return out


def _kv_per_slot(model: Path) -> dict[str, int]:
    import llama_cpp

    from appliance.runtimes.llama_options import kv_bytes_per_token

    llm = llama_cpp.Llama(str(model), n_ctx=64, verbose=False)
    meta, m = llm.metadata, llm.model
    n_head = llama_cpp.llama_model_n_head(m)
    head = llama_cpp.llama_model_n_embd(m) // n_head
    width = head * llama_cpp.llama_model_n_head_kv(m)
    layers = llama_cpp.llama_model_n_layer(m)
    llm.close()
    del meta
    return {t: N_CTX * kv_bytes_per_token(layers, width, width, t, t) for t in ("f16", "q8_0")}


def _prompt_cache(
    model: Path, threads: int, work: Path, binary: Path, slots: int
) -> dict[str, Any]:
    system = system_prompt(model)
    ask = [system + f"User: is lamp {n} on?\nAssistant:" for n in range(4)]
    state = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=work))
    repo = _manifest(work / "peers-cache", model, threads, "")
    out: dict[str, Any] = {}
    daemon = _daemon(repo, state)
    try:
        cold, warm = asyncio.run(_ttfts(daemon.url, ask[:2]))
        cache = state / "prompt-cache"
        deadline = time.monotonic() + 30
        while not list(cache.glob("*.kv")) and time.monotonic() < deadline:
            time.sleep(0.05)
        files = list(cache.glob("*.kv"))
        out["cache_file_mb"] = sum(f.stat().st_size for f in files) / 2**20
    finally:
        daemon.stop()
    daemon = _daemon(repo, state)
    try:
        (restart,) = asyncio.run(_ttfts(daemon.url, ask[2:3]))
    finally:
        daemon.stop()
    out["appliance"] = {"cold_ms": cold, "warm_ms": warm, "restart_ms": restart}
    server = LlamaServer(binary, model, threads, slots)
    try:
        cold, warm = asyncio.run(_ttfts(server.url, ask[:2]))
    finally:
        server.stop()
    out["llama_server"] = {"cold_ms": cold, "warm_ms": warm}
    return out


def render(r: dict[str, Any]) -> list[str]:
    p, limit = r["peers"], r["engine_limit_tps"]
    srv, ip = p["llama_server"], p["in_process"]
    lines = [
        f"## 7. GGUF beside llama-server (25.8M, {r['threads']} thread(s), "
        f"{r['slots']} slots, n_ctx {r['n_ctx']} a slot)",
        "",
    ]
    rows = []
    for key, label in (
        ("auto", "appliance, automatic slots"),
        ("one", "appliance, parallel = 1"),
        ("q8_0", "appliance, KV q8_0 + flash attention"),
        ("llama_server", "llama-server (C++)"),
    ):
        x = p[key]
        rows.append(
            [
                label,
                x["single_tps"],
                _r(x["single_tps"], srv["single_tps"]),
                x["aggregate_tps"],
                _r(x["aggregate_tps"], srv["aggregate_tps"]),
                _r(x["aggregate_tps"], x["single_tps"]),
                x["ttft_p50_ms"],
                x["ttft_p99_ms"],
                x["rss_mb"],
            ]
        )
    lines += [
        table(
            [
                "peer",
                "1 stream tok/s",
                "vs server",
                "8 streams tok/s",
                "vs server",
                "8 vs 1",
                "TTFT p50 ms (8)",
                "p99 ms",
                "RSS MiB",
            ],
            rows,
        ),
        "",
        f"Medians of {len(r['rounds']['auto'])} rounds (each peer once a round). "
        f"Bare in-process decode loop: {fmt(limit)} tok/s ({fmt(1e6 / limit, 0)} µs a token). "
        f"Per token, one stream: llama-server's own decode "
        f"{fmt(srv['engine_ms_per_token'] * 1000, 0)} µs, its client sees "
        f"{fmt(1e6 / srv['single_tps'], 0)} µs; the appliance's runtime "
        f"in-process (no HTTP) {fmt(ip['decode_us'], 0)} µs inside llama_decode plus "
        f"{fmt(ip['around_us'], 0)} µs around it (sampling, detokenizing, the hand-over to the "
        f"event loop), over HTTP its client sees {fmt(1e6 / p['auto']['single_tps'], 0)} µs. "
        f"KV cache per slot: f16 {fmt(r['kv_bytes_per_slot']['f16'] / 2**20)} MiB, q8_0 "
        f"{fmt(r['kv_bytes_per_slot']['q8_0'] / 2**20)} MiB.",
        "",
    ]
    c = r["prompt_cache"]
    a, s = c["appliance"], c["llama_server"]
    lines += [
        table(
            ["1,500-token system prompt, TTFT ms", "cold", "warm (in memory)", "after restart"],
            [
                ["appliance", a["cold_ms"], a["warm_ms"], a["restart_ms"]],
                ["llama-server", s["cold_ms"], s["warm_ms"], "— (cold)"],
            ],
        ),
        "",
        f"Prompt cache on disk after the run: {fmt(c['cache_file_mb'])} MiB.",
        "",
    ]
    return lines


def _r(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "—"


def main() -> None:
    import argparse

    from benchmarks.models import build_gguf

    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_peers")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results = Path(__file__).parent / "results"
    work = results / "work"
    work.mkdir(parents=True, exist_ok=True)
    stories = Path(__file__).resolve().parents[1].parent / "shared" / "models"
    model = build_gguf(stories / "stories260K.gguf", work / "random-llama-25m.gguf")
    before = os.getloadavg()
    r = run(model, args.threads, work)
    r["load_average"] = [before[0], os.getloadavg()[0]]
    r["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    text = "\n".join([f"# GGUF peers ({r['when']}, load {r['load_average']})", "", *render(r)])
    (results / "llm-peers-latest.json").write_text(json.dumps(r, indent=2) + "\n")
    (results / "llm-peers-latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
