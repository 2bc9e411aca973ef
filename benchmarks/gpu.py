"""GPU boxes only: GGUF decoding on the CPU against layers offloaded to an NVIDIA GPU.

Runs the daemon twice on the benchmark's 25.8M-parameter random GGUF (see
:mod:`benchmarks.models`), with ``n_gpu_layers = 0`` and ``-1``, and measures one stream
and 8 concurrent streams over HTTP, as benchmark 2 does. It also checks what only a real GPU
shows: that the daemon's process holds GPU memory once layers are offloaded (nvidia-smi's
compute-apps list) and that the daemon's own health sensors report the GPU nvidia-smi names
(``appliance_gpu_utilization_percent`` in /metrics). Exit status 1 when a check fails.

Needs nvidia-smi and a CUDA build of llama-cpp-python
(``CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python``)::

    python -m benchmarks.gpu [--threads N]

The model's vocabulary comes from ``../shared/models/stories260K.gguf`` when present, else
from the project's own ``home-intent`` model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import llm
from benchmarks.common import ROOT, Daemon, table
from benchmarks.models import build_gguf

RESULTS = Path(__file__).resolve().parent / "results"
STORIES = ROOT.parent / "shared" / "models" / "stories260K.gguf"
HOME_INTENT = ROOT / "models" / "home-intent" / "home-intent-q8_0.gguf"
LEVELS = [8]


def smi(*query: str) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]


def gpu_memory_of(pid: int) -> int:
    """MiB of GPU memory nvidia-smi lists for ``pid`` (0 when it lists none)."""
    rows = smi("--query-compute-apps=pid,used_memory")
    return sum(int(mib) for p, mib in rows if p.isdigit() and int(p) == pid)


def gpu_metrics(url: str) -> list[str]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return [
        line for line in text.splitlines() if line.startswith("appliance_gpu_utilization_percent{")
    ]


def measure(model: Path, work: Path, threads: int, gpu_layers: int) -> dict[str, Any]:
    repo = llm.model_repo(
        model, work / f"gpu-models-{gpu_layers}", threads, max(LEVELS), gpu_layers
    )
    daemon = Daemon(
        env={
            "APPLIANCE_MODELS__DIR": str(repo),
            "APPLIANCE_MODELS__QUEUE_SIZE": "64",
            "APPLIANCE_HEALTH__INTERVAL": "1",
        }
    )
    try:
        result = asyncio.run(llm.single_and_concurrent(daemon.url, LEVELS, 200, 100))
        result["gpu_memory_mib"] = gpu_memory_of(daemon.proc.pid)
        deadline = time.monotonic() + 15
        while not (lines := gpu_metrics(daemon.url)) and time.monotonic() < deadline:
            time.sleep(0.5)
        result["gpu_metrics"] = lines
        return result
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        print(
            "benchmarks.gpu: nvidia-smi is not here; this benchmark needs an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    work = RESULTS / "work"
    work.mkdir(parents=True, exist_ok=True)
    source = STORIES if STORIES.is_file() else HOME_INTENT
    model = build_gguf(source, work / f"random-25m-{source.stem}.gguf")
    names = [row[0] for row in smi("--query-gpu=name")]
    cpu = measure(model, work, args.threads, 0)
    gpu = measure(model, work, args.threads, -1)
    checks = {
        "offloaded daemon holds GPU memory": gpu["gpu_memory_mib"] > cpu["gpu_memory_mib"],
        "health sensors report the GPU": any(
            any(name in line for name in names) for line in gpu["gpu_metrics"]
        ),
    }
    rows = [
        [
            label,
            r["single_tps"],
            r["8"]["aggregate_tps"],
            r["8"]["ttft_p50_ms"],
            r["gpu_memory_mib"],
        ]
        for label, r in (("CPU (n_gpu_layers 0)", cpu), ("GPU (n_gpu_layers -1)", gpu))
    ]
    print(f"GPU: {', '.join(names)}; {args.threads} CPU threads; model {model.name}\n")
    print(
        table(
            [
                "placement",
                "1 stream tok/s",
                "8 streams tok/s",
                "TTFT p50 at 8 ms",
                "daemon GPU MiB",
            ],
            rows,
        )
    )
    print(
        f"\nGPU vs CPU: {gpu['single_tps'] / cpu['single_tps']:.2f}x one stream, "
        f"{gpu['8']['aggregate_tps'] / cpu['8']['aggregate_tps']:.2f}x at 8 streams"
    )
    for check, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {"gpus": names, "threads": args.threads, "cpu": cpu, "gpu": gpu, "checks": checks},
            indent=2,
        )
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
