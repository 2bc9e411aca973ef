"""``python -m benchmarks``: run every benchmark, print and save the tables.

Options: ``--threads N`` (compute threads for every peer, default 2), ``--only`` a subset
(llm, llm-small, onnx, mqtt, start; and rollout, which only runs when named: several
minutes, ``python -m benchmarks.rollout`` has its options), ``--seconds`` per ONNX/MQTT
point. Results go to
``benchmarks/results/<time>.json`` and ``.md`` (and ``latest.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import llm, mqtt_rr, onnx_http, rollout, start
from benchmarks.common import ROOT
from benchmarks.models import build_gguf, build_mlp
from benchmarks.report import render

RESULTS = Path(__file__).resolve().parent / "results"
STORIES = ROOT.parent / "shared" / "models" / "stories260K.gguf"
ALL = ("llm", "llm-small", "onnx", "mqtt", "start")
EXTRA = ("rollout",)  # run only when named


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=ALL + EXTRA, default=list(ALL))
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    work = RESULTS / "work"
    work.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
        "threads": args.threads,
    }
    big = build_gguf(STORIES, work / "random-llama-25m.gguf")
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "llm",
            "benchmark 1+2: 25.8M random GGUF",
            lambda: llm.run(big, args.threads, work / "big"),
        ),
        (
            "llm-small",
            "benchmark 1+2: stories260K",
            lambda: llm.run(STORIES, args.threads, work / "small"),
        ),
        (
            "onnx",
            "benchmark 3: ONNX over HTTP",
            lambda: onnx_http.run(build_mlp(work / "mlp.onnx"), args.threads, work, args.seconds),
        ),
        (
            "mqtt",
            "benchmark 4: MQTT round trip",
            lambda: mqtt_rr.run(work, args.threads, seconds=args.seconds),
        ),
        (
            "rollout",
            "rollouts: 3 real daemons, 1,000 simulated devices",
            lambda: rollout.run(rollout.parser().parse_args([])),
        ),
        (
            "start",
            "benchmark 5: start and idle RSS",
            lambda: start.run(
                work / "big" / "llm-models" if (work / "big" / "llm-models").is_dir() else None
            ),
        ),
    ]
    for key, title, step in steps:
        if key not in args.only:
            continue
        print(title, "...", flush=True)
        try:
            results[key.replace("-", "_")] = step()
        except Exception as exc:  # one broken benchmark must not lose the others' figures
            print(f"  failed: {exc}", flush=True)
            results.setdefault("failed", {})[key] = str(exc)
    results["load_average_after"] = os.getloadavg()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = render(results)
    for name in (stamp, "latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
