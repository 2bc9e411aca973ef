"""Idle memory of the daemon on its defaults, and where it goes.

``python -m benchmarks.idle_rss [--rounds 3] [--json FILE]``

Starts ``python -m appliance run`` with no configuration (only mDNS off and a state
directory of its own, as every manual daemon here), waits for ``/health`` 200 (every model
loaded) and two idle seconds, and reads ``VmRSS``, ``RssAnon`` and ``RssFile`` from
``/proc/<pid>/status``. The same daemon also runs with an empty model folder and with each
default model alone, so the difference to the empty folder is that model's share (its
library, its session or context, its worker threads). The import shares come from a
fresh interpreter importing what the daemon imports, in the daemon's order, one module at a
time. File-backed pages (``RssFile``: shared libraries' code, the memory-mapped GGUF) are
clean and the kernel can drop them under pressure; anonymous ones (``RssAnon``) stay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, fmt, stop, table, wait_http

DEFAULTS = ROOT / "models"
GOAL_MIB = 80.0
# In the daemon's order: ``appliance run`` loads llama.cpp first (see cli._load_llama_first),
# which imports numpy and jinja2 (listed apart to show their shares), then the server;
# onnxruntime comes with the first ONNX model.
IMPORTS = (
    "numpy",
    "jinja2",
    "llama_cpp",
    "aiohttp.web",
    "pydantic",
    "prometheus_client",
    "appliance.config",
    "appliance.core.service",
    "appliance.transports.http",
    "appliance.server",
    "appliance.transports.mqtt",
    "appliance.ops.health",
    "onnxruntime",
)
_KV = re.compile(r"model (\S+): (\d+) slot\(s\) of (\d+) tokens \(KV \S+, ([\d.]+) MiB a slot\)")
_PROBE = """
import importlib, json, sys
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out
rows = [["python", status()]]
for name in sys.argv[1:]:
    importlib.import_module(name)
    rows.append([name, status()])
print(json.dumps(rows))
"""


def memory(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of ``pid`` in MiB, and its thread count."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daemon_idle(models_dir: Path | None, idle_s: float = 2.0) -> dict[str, Any]:
    """One daemon on the defaults (``models_dir`` replaces the model folder): idle memory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    state = tempfile.mkdtemp(prefix="appliance-rss-")
    env.update({"APPLIANCE_MDNS__ENABLED": "false", "STATE_DIRECTORY": state})
    if models_dir is not None:
        env["APPLIANCE_MODELS__DIR"] = str(models_dir)
    port = _free_port()
    log = Path(state) / "daemon.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
            time.sleep(idle_s)
            result: dict[str, Any] = memory(proc.pid)
        finally:
            stop(proc)
    for name, slots, tokens, per_slot in _KV.findall(log.read_text(errors="replace")):
        result.setdefault("kv", {})[name] = {
            "slots": int(slots),
            "tokens": int(tokens),
            "mib_per_slot": float(per_slot),
        }
    return result


def import_shares(modules: tuple[str, ...] = IMPORTS) -> list[dict[str, Any]]:
    """RSS after each import in a fresh interpreter, and what each added (MiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    out, previous = [], None
    for name, now in rows:
        base = previous or {key: 0.0 for key in now}
        out.append({"module": name, **now, **{f"+{key}": now[key] - base[key] for key in now}})
        previous = now
    return out


def _median_of(points: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("VmRSS", "RssAnon", "RssFile", "Threads")
    med: dict[str, Any] = {k: statistics.median(p[k] for p in points) for k in keys}
    if points and "kv" in points[0]:
        med["kv"] = points[0]["kv"]
    return med


def run(rounds: int = 3) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="appliance-rss-models-"))
    alone: dict[str, Path | None] = {"defaults": None, "empty model folder": work / "empty"}
    (work / "empty").mkdir()
    for model in ("sensor-anomaly", "home-intent"):
        folder = work / model
        folder.mkdir()
        (folder / model).symlink_to(DEFAULTS / model, target_is_directory=True)
        alone[f"{model} only"] = folder
    setups: dict[str, list[dict[str, Any]]] = {label: [] for label in alone}
    for _ in range(rounds):  # interleaved: a neighbour's burst touches every setup alike
        for label, where in alone.items():
            setups[label].append(daemon_idle(where))
    return {
        "load_average": os.getloadavg(),
        "rounds": rounds,
        "setups": {label: _median_of(points) for label, points in setups.items()},
        "imports": import_shares(),
    }


def render(result: dict[str, Any]) -> str:
    setups = result["setups"]
    empty = setups["empty model folder"]
    rows = []
    for label, point in setups.items():
        extra = ""
        if label not in ("defaults", "empty model folder"):
            more, anon = point["VmRSS"] - empty["VmRSS"], point["RssAnon"] - empty["RssAnon"]
            extra = f"+{more:.1f} (anon +{anon:.1f})"
        rows.append(
            [
                label,
                point["VmRSS"],
                point["RssAnon"],
                point["RssFile"],
                int(point["Threads"]),
                extra,
            ]
        )
    out = [
        f"Idle RSS, medians of {result['rounds']} rounds (load average "
        f"{', '.join(fmt(x, 2) for x in result['load_average'])}); goal ≤ {GOAL_MIB:.0f} MiB "
        "on the defaults.",
        "",
        table(["setup", "VmRSS MiB", "RssAnon", "RssFile", "threads", "vs empty folder"], rows),
        "",
        table(
            ["import (in the daemon's order)", "VmRSS MiB after", "+MiB", "+anon", "+file"],
            [
                [r["module"], r["VmRSS"], r["+VmRSS"], r["+RssAnon"], r["+RssFile"]]
                for r in result["imports"]
            ],
        ),
    ]
    for name, kv in setups["defaults"].get("kv", {}).items():
        out += [
            "",
            f"KV cache of {name}: {kv['slots']} slot(s) × {kv['tokens']} tokens × "
            f"{kv['mib_per_slot']:.1f} MiB a slot = {kv['slots'] * kv['mib_per_slot']:.1f} MiB.",
        ]
    met = setups["defaults"]["VmRSS"] <= GOAL_MIB
    out += ["", f"Goal ≤ {GOAL_MIB:.0f} MiB on the defaults: {'met' if met else 'not met'}."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle_rss", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    result = run(args.rounds)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
