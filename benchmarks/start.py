"""Benchmark 5: idle RSS, start-to-ready time, and ``appliance --help``.

Start-to-ready is from process start to the first ``/health`` 200 (every model loaded);
idle RSS (with its anonymous and file-backed parts) is read from /proc after two idle
seconds (``benchmarks/idle_rss.py`` breaks the default daemon's down further). Measured
with the default models only and with the benchmark GGUF added.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Daemon, median
from benchmarks.idle_rss import memory


def run(llm_repo: Path | None) -> dict[str, Any]:
    helps = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "appliance", "--help"],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        helps.append(time.perf_counter() - started)
    result: dict[str, Any] = {"help_s_median": median(helps), "help_s_min": min(helps)}
    setups: dict[str, dict[str, str]] = {"default models": {}}
    if llm_repo is not None:
        setups["benchmark GGUF (16 slots)"] = {"APPLIANCE_MODELS__DIR": str(llm_repo)}
    for label, env in setups.items():
        readies, points = [], []
        for _ in range(3):
            daemon = Daemon(env=env)
            readies.append(daemon.ready_after)
            time.sleep(2)
            points.append(memory(daemon.proc.pid))
            daemon.stop()
        result[label] = {
            "ready_s": median(readies),
            "idle_rss_mb": median([p["VmRSS"] for p in points]),
            "rss_anon_mb": median([p["RssAnon"] for p in points]),
            "rss_file_mb": median([p["RssFile"] for p in points]),
        }
    return result
