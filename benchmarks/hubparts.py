"""Parts of the rollout benchmark: a real hub subprocess, a private PostgreSQL server,
device enrolment, the hub's REST API, and model versions built on the spot.

PostgreSQL runs from Debian's binaries (``/usr/lib/postgresql/*/bin``) as the ``postgres``
user when run as root (``initdb`` refuses root), in a temporary directory, on a free
loopback port, with fsync off: it measures the hub's queries, not this box's disk.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, cpu_seconds, free_port, stop, wait_http

SENSOR = ROOT / "models" / "sensor-anomaly"


def hub_env(storage_url: str, state: Path, **extra: str) -> dict[str, str]:
    """The hub's environment: its storage, artifact directory and signing key under
    ``state``; nothing of the caller's ``APPLIANCE_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "APPLIANCE_HUB_STORAGE__URL": storage_url,
            "APPLIANCE_HUB_ROLLOUT__DIR": str(state / "artifacts"),
            "APPLIANCE_HUB_ROLLOUT__SIGNING_KEY_FILE": str(state / "hub-signing-key"),
            "APPLIANCE_HUB_LOGGING__LEVEL": "warning",
            "STATE_DIRECTORY": str(state),
        }
    )
    env.update(extra)
    return env


def hub_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "hub", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"appliance hub {' '.join(args)}: {result.stderr.strip()}")
    return result


class Hub:
    """``python -m appliance hub run`` on a free loopback port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "hub",
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.url + "/health", timeout=60, proc=self.proc)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        found = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
        return found.get("VmRSS", 0), found.get("VmHWM", 0)

    def stop(self) -> None:
        stop(self.proc)


def call(url: str, body: Any = None, token: str | None = None, timeout: float = 30) -> Any:
    """JSON over HTTP; raises RuntimeError naming the hub's error."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.code} {exc.read()[:300]!r}") from None


def enroll_cli(env: dict[str, str], device: str) -> tuple[str, str]:
    """(token, hub public key) as `appliance hub enroll` prints them."""
    result = hub_cli(env, "enroll", device)
    key = result.stderr.split("hub.public_key = '")[1].split("'")[0]
    return result.stdout.strip(), key


def enroll_many(storage_url: str, devices: list[str]) -> dict[str, str]:
    """Enrol through the storage API in-process, as `appliance hub enroll` does (the CLI
    started a thousand times would take minutes); returns each device's token."""
    from appliance.hub.storage import from_url
    from appliance.hub.tokens import hash_token, new_token

    tokens = {d: new_token() for d in devices}

    async def run() -> None:
        store = from_url(storage_url)
        await store.open()
        try:
            now = time.time()
            for device, token in tokens.items():
                await store.enroll(device, "", hash_token(token), now)
        finally:
            await store.close()

    asyncio.run(run())
    return tokens


# -------------------------------------------------------------------------- models


def big_version(dest: Path, version: str, size: int, seed: int) -> Path:
    """A version of sensor-anomaly of about ``size`` bytes that loads and answers as the
    real one: its score passes through ``Add(score, Gather(weights, 0))``, where
    ``weights`` is a random float32 initializer of the size asked for, zero at index 0."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(SENSOR / "model.onnx"))
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if "score" in n.output)
    graph.node[index].output[0] = "score_raw"
    weights = np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32)
    weights[0] = 0.0
    graph.initializer.append(numpy_helper.from_array(weights, "bench_weights"))
    graph.initializer.append(helper.make_tensor("bench_index", TensorProto.INT64, [], [0]))
    graph.node.insert(
        index + 1, helper.make_node("Gather", ["bench_weights", "bench_index"], ["bench_zero"])
    )
    graph.node.insert(index + 2, helper.make_node("Add", ["score_raw", "bench_zero"], ["score"]))
    onnx.checker.check_model(model)
    dest.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest / "model.onnx"))
    manifest(dest, version)
    return dest


def small_version(dest: Path, version: str) -> Path:
    """The default sensor-anomaly model (14 KiB) as another version."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(SENSOR / "model.onnx", dest / "model.onnx")
    manifest(dest, version)
    return dest


def manifest(dest: Path, version: str) -> None:
    (dest / "manifest.toml").write_text(
        f'name = "sensor-anomaly"\nruntime = "onnx"\nfile = "model.onnx"\n'
        f'version = "{version}"\n\n[options]\nthreads = 1\n'
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- PostgreSQL


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


class Postgres:
    """A running private server: ``url`` (its admin URL) and the CPU its processes used."""

    def __init__(self, url: str, data: Path) -> None:
        self.url = url
        self.data = data

    def cpu(self) -> float:
        """CPU seconds of the postmaster and every backend, live or ended."""
        master = int((self.data / "postmaster.pid").read_text().split()[0])
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rpartition(")")[2].split()
            except OSError:
                continue
            pid = int(stat.split("/")[2])
            if pid == master:  # its own time and that of backends it reaped
                total += sum(int(f) for f in fields[11:15]) / tick
            elif int(fields[1]) == master:
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def create_database(self, name: str) -> str:
        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(f"{self.url}/postgres")
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(run())
        return f"{self.url}/{name}"


@contextmanager
def postgres() -> Iterator[Postgres]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries are not installed (postgresql)")
    bindir = Path(found[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="appliance-bench-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for path in (base, sock):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    pg_ctl = str(bindir / "pg_ctl")
    started = False
    try:
        subprocess.run(
            [
                *_as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U"),
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = (
            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=50"
        )
        subprocess.run(
            [
                *_as_postgres(
                    pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o", options
                ),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        started = True
        yield Postgres(f"postgresql://postgres@127.0.0.1:{port}", data)
    finally:
        if started:
            subprocess.run(
                _as_postgres(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)
