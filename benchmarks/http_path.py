"""The request path against its transport's ceiling, interleaved on one shared box.

The daemon on its defaults (``sensor-anomaly`` and ``home-intent`` from ``models/``) and
the ceiling (:mod:`benchmarks.canned`: bare aiohttp parsing the same body with the same
JSON reader and answering the appliance's own bytes) run side by side; each round measures
the ceiling and then the appliance at every client count, so a neighbour's burst on a
shared box hits both. Medians over the rounds, and each median's ratio to the ceiling's.

Requests/s on a box whose cores other jobs share moves with their load; the CPU time the
server process spends per request (user + system, all threads, from /proc) moves much
less, so it is reported too: the ceiling's CPU per request over the appliance's is the
share of the transport's throughput the appliance would reach on cores of its own.

``python -m benchmarks.http_path [--rounds 5] [--seconds 2] [--clients 1 8 32]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    Daemon,
    cpu_seconds,
    fmt,
    free_port,
    median,
    stop,
    table,
    wait_http,
)
from benchmarks.onnx_http import body, load

MODEL = "sensor-anomaly"


def start_canned(answer: bytes, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    path = work / f"canned-{MODEL}.json"
    path.write_bytes(answer)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.canned", str(port), str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=proc)
    return proc, url


def run(
    work: Path,
    rounds: int = 5,
    seconds: float = 2.0,
    clients: tuple[int, ...] = (1, 8, 32),
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    request = body(MODEL)
    daemon = Daemon(env={"APPLIANCE_MODELS__QUEUE_SIZE": "128", **(env or {})})
    canned_proc = None
    try:
        req = urllib.request.Request(
            f"{daemon.url}/v2/models/{MODEL}/infer", data=json.dumps(request).encode()
        )
        with urllib.request.urlopen(req) as resp:
            answer = resp.read()
        canned_proc, canned_url = start_canned(answer, work)
        labels = ("ceiling", "appliance")
        samples = {label: {n: [] for n in clients} for label in labels}
        cpu = {label: {n: [] for n in clients} for label in labels}
        servers = {
            "ceiling": (canned_url, canned_proc.pid),
            "appliance": (daemon.url, daemon.proc.pid),
        }
        errors = 0
        for _ in range(rounds):
            for n in clients:
                for label in labels:
                    url, pid = servers[label]
                    point = asyncio.run(
                        load(url, MODEL, request, n, seconds, probe=lambda p=pid: cpu_seconds(p))
                    )
                    samples[label][n].append(point["rps"])
                    cpu[label][n].append(point["probe"] / (point["rps"] * seconds) * 1e6)
                    errors += int(point["errors"])
        result: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "errors": errors}
        result["points"] = {
            str(n): {
                "ceiling_rps": median(samples["ceiling"][n]),
                "appliance_rps": median(samples["appliance"][n]),
                "ratio": median(samples["appliance"][n]) / median(samples["ceiling"][n]),
                "ceiling_cpu_us": median(cpu["ceiling"][n]),
                "appliance_cpu_us": median(cpu["appliance"][n]),
                "cpu_ratio": median(cpu["ceiling"][n]) / median(cpu["appliance"][n]),
                "ceiling_all": samples["ceiling"][n],
                "appliance_all": samples["appliance"][n],
            }
            for n in clients
        }
        return result
    finally:
        if canned_proc is not None:
            stop(canned_proc)
        daemon.stop()


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            n,
            p["ceiling_rps"],
            p["appliance_rps"],
            f"{p['ratio']:.2f}×",
            p["ceiling_cpu_us"],
            p["appliance_cpu_us"],
            f"{p['cpu_ratio']:.2f}×",
        ]
        for n, p in result["points"].items()
    ]
    return (
        f"{MODEL} over HTTP, medians of {result['rounds']} interleaved rounds of "
        f"{fmt(result['seconds'])} s a point (errors: {result['errors']}):\n\n"
        + table(
            [
                "clients",
                "ceiling req/s",
                "appliance req/s",
                "vs ceiling",
                "ceiling CPU µs/req",
                "appliance CPU µs/req",
                "CPU vs ceiling",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_path", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    result = run(
        ROOT / "benchmarks" / "results" / "work", args.rounds, args.seconds, tuple(args.clients)
    )
    print(render(result))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
