"""What serving gRPC costs the daemon in memory and threads.

Starts the real daemon (``python -m appliance run``, the default ONNX model) as a
subprocess with gRPC off, then on; sends the same inference traffic (HTTP, and with gRPC
on also ``tritonclient.grpc``); and reads the daemon's resident memory and thread count
from ``/proc``. Each configuration runs ``--runs`` times; the table shows medians and the
difference. Results are also saved to ``benchmarks/results/grpc_rss.json``.

    python benchmarks/grpc_rss.py [--runs 3] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "sensor-anomaly"
_HTTP = re.compile(r"listening on http://([^\s:]+):(\d+)")
_GRPC = re.compile(r"gRPC \(Open Inference Protocol v2\) listening on [^\s]+:(\d+)")


def status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and thread count of ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def run(grpc: bool, requests: int) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_MQTT__ENABLED": "false",
            "APPLIANCE_MDNS__ENABLED": "false",
            "APPLIANCE_GRPC__ENABLED": "true" if grpc else "false",
            "APPLIANCE_GRPC__HOST": "127.0.0.1",
            "APPLIANCE_GRPC__PORT": "0",
        }
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models-dir",
            str(ROOT / "models"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        http_port = grpc_port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (http_port and (grpc_port or not grpc)):
            for line in list(lines):
                if (m := _HTTP.search(line)) and not http_port:
                    http_port = int(m.group(2))
                if (m := _GRPC.search(line)) and not grpc_port:
                    grpc_port = int(m.group(1))
            time.sleep(0.05)
        if not http_port:
            raise RuntimeError("the daemon did not start:\n" + "".join(lines))
        base = f"http://127.0.0.1:{http_port}"
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        window = np.full((1, 32, 3), [21.0, 45.0, 0.02], dtype=np.float32)
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "window",
                        "datatype": "FP32",
                        "shape": [1, 32, 3],
                        "data": window.reshape(-1).tolist(),
                    }
                ]
            }
        ).encode()
        for _ in range(requests):
            request = urllib.request.Request(
                f"{base}/v2/models/{MODEL}/infer",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        if grpc:
            import tritonclient.grpc as triton

            with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
                item = triton.InferInput("window", [1, 32, 3], "FP32")
                item.set_data_from_numpy(window)
                for _ in range(requests):
                    client.infer(MODEL, [item])
        time.sleep(0.5)
        return status(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    samples: dict[str, list[dict[str, int]]] = {"off": [], "on": []}
    for _ in range(args.runs):
        for name in ("off", "on"):
            samples[name].append(run(name == "on", args.requests))
    med: dict[str, dict[str, float]] = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    print("| gRPC | RSS | peak RSS | threads |")
    print("|---|---:|---:|---:|")
    for name in ("off", "on"):
        m = med[name]
        print(
            f"| {name} | {m['VmRSS'] / 1024:.1f} MiB | {m['VmHWM'] / 1024:.1f} MiB "
            f"| {m['Threads']:.0f} |"
        )
    diff = {key: med["on"][key] - med["off"][key] for key in med["on"]}
    print(
        f"| cost | +{diff['VmRSS'] / 1024:.1f} MiB | +{diff['VmHWM'] / 1024:.1f} MiB "
        f"| +{diff['Threads']:.0f} |"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "grpc_rss.json"
    record: dict[str, Any] = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "samples": samples,
        "median": med,
    }
    out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
