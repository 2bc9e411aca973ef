"""Markdown tables (absolute figures and ratios against the issue's targets) from results."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt, table


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "—"


def render(r: dict[str, Any]) -> str:
    out = [
        f"# Benchmark results ({r['when']})",
        "",
        f"Machine: {r['machine']}; {r['threads']} compute thread(s) for every peer; load "
        f"average before {fmt(r['load_average'][0], 2)}, after "
        f"{fmt(r['load_average_after'][0], 2)} (a shared box: compare only within one run).",
        "",
    ]
    for key, title in (("llm", "25.8M-parameter random F16 GGUF"), ("llm_small", "stories260K")):
        if key in r:
            out += _llm(r[key], title)
    if "onnx" in r:
        out += _onnx(r["onnx"])
    if "mqtt" in r:
        m = r["mqtt"]
        out += ["## 4. MQTT request → reply (sensor-anomaly, local Mosquitto, MQTT 5)", ""]
        if "skipped" in m:
            out += [f"Skipped: {m['skipped']}", ""]
        else:
            out += [
                table(
                    [
                        "round trip p50 ms",
                        "p99 ms",
                        "target p99",
                        f"messages/s ({m['in_flight']} in flight)",
                    ],
                    [[m["p50_ms"], m["p99_ms"], "< 5 ms", m["messages_per_s"]]],
                ),
                "",
            ]
    for key, error in r.get("failed", {}).items():
        out += [f"**{key} failed:** {error}", ""]
    if "start" in r:
        s = r["start"]
        rows = [
            [
                label,
                v["ready_s"],
                v["idle_rss_mb"],
                v.get("rss_anon_mb", float("nan")),
                v.get("rss_file_mb", float("nan")),
            ]
            for label, v in s.items()
            if isinstance(v, dict)
        ]
        out += [
            "## 5. Start and idle memory",
            "",
            table(["setup", "start → ready s", "idle RSS MiB", "anon", "file-backed"], rows),
            "",
            f"`appliance --help`: {fmt(s['help_s_median'], 3)} s median, "
            f"{fmt(s['help_s_min'], 3)} s best of 5 (target < 0.5 s).",
            "",
        ]
    if "rollout" in r:
        from benchmarks.rollout import sections

        out += sections(r["rollout"])
    return "\n".join(out)


def _llm(r: dict[str, Any], title: str) -> list[str]:
    app, peer = r["appliance"], r["llama_cpp_server"]
    limit = r["engine_limit_tps"]
    rows = [
        ["low-level decode loop in-process (the engine's limit)", limit, "1.00×"],
        [
            "llama-cpp-python `Llama.__call__`, in-process",
            r["llama_call_tps"],
            _ratio(r["llama_call_tps"], limit),
        ],
        [
            "llama-cpp-python `Llama.__call__`, `stream=True`, in-process",
            r["llama_call_stream_tps"],
            _ratio(r["llama_call_stream_tps"], limit),
        ],
        ["**appliance** over HTTP (SSE)", app["single_tps"], _ratio(app["single_tps"], limit)],
        [
            "`llama_cpp.server` over HTTP (SSE)",
            peer["single_tps"],
            _ratio(peer["single_tps"], limit),
        ],
    ]
    out = [
        f"## 1. LLM single stream — {title}",
        "",
        f"{r['single_tokens']}-token greedy stream, decode tokens/s (first to last token).",
        "",
        table(["system", "tokens/s", "vs limit"], rows),
        "",
        f"Appliance vs limit: **{_ratio(app['single_tps'], limit)}** (target ≥ 0.9×); "
        f"vs `llama_cpp.server`: **{_ratio(app['single_tps'], peer['single_tps'])}** "
        "(target ≥ 4×).",
        "",
        f"## 2. LLM concurrent streams — {title}",
        "",
        f"{r['tokens']}-token greedy streams; aggregate tokens/s over the wall time; "
        "time to first token (TTFT) from request sent.",
        "",
    ]
    rows2 = []
    for level in [k for k in app if k.isdigit()]:
        a, p = app[level], peer[level]
        rows2.append(
            [
                level,
                a["aggregate_tps"],
                p["aggregate_tps"],
                _ratio(a["aggregate_tps"], p["aggregate_tps"]),
                a["ttft_p50_ms"],
                a["ttft_p99_ms"],
                p["ttft_p50_ms"],
                p["ttft_p99_ms"],
            ]
        )
    out += [
        table(
            [
                "streams",
                "appliance tok/s",
                "llama_cpp.server tok/s",
                "ratio",
                "appliance TTFT p50 ms",
                "p99 ms",
                "server TTFT p50 ms",
                "p99 ms",
            ],
            rows2,
        ),
        "",
    ]
    if "8" in app:
        out += [
            f"At 8 streams: aggregate **{_ratio(app['8']['aggregate_tps'], app['single_tps'])}"
            f"** the appliance's single stream (target ≥ 2×), **"
            f"{_ratio(app['8']['aggregate_tps'], peer['8']['aggregate_tps'])}** "
            f"`llama_cpp.server` (target ≥ 8×), TTFT p50 {fmt(app['8']['ttft_p50_ms'])} ms "
            "(target < 50 ms).",
            "",
        ]
    return out


def _onnx(r: dict[str, Any]) -> list[str]:
    out = [
        "## 3. ONNX over HTTP (Open Inference Protocol JSON)",
        "",
        f"Each point {r['seconds']} s. In-process: onnxruntime `run` in a loop, batch 1. "
        "Ceiling: aiohttp parsing the same request and answering a canned response of "
        "the same size.",
        "",
    ]
    for model, e in r["models"].items():
        rows = []
        for n in e["canned"]:
            c, off, on = e["canned"][n], e["appliance"][n], e["appliance-batched"][n]
            rows.append(
                [
                    n,
                    e["in_process_rps"],
                    c["rps"],
                    off["rps"],
                    on["rps"],
                    _ratio(max(off["rps"], on["rps"]), c["rps"]),
                    _ratio(on["rps"], off["rps"]),
                    f"{fmt(off['p50_ms'], 2)} / {fmt(off['p99_ms'], 2)}",
                    f"{fmt(on['p50_ms'], 2)} / {fmt(on['p99_ms'], 2)}",
                    off["errors"] + on["errors"],
                ]
            )
        out += [
            f"### {model}",
            "",
            table(
                [
                    "clients",
                    "in-process req/s",
                    "ceiling req/s",
                    "appliance req/s",
                    "batched req/s",
                    "best vs ceiling",
                    "batched vs not",
                    "p50 / p99 ms",
                    "batched p50 / p99 ms",
                    "errors",
                ],
                rows,
            ),
            "",
        ]
    return out
