"""``python -m benchmarks.rollout``: signed model rollouts through a real hub.

1. **Three real daemons** (each its own state directory, token and model repository) on
   loopback take a generated ~30 MB ONNX version of sensor-anomaly from a real hub
   (SQLite) in waves ``1,100%`` with a short soak; the time from ``appliance hub rollout
   start`` to the rollout's ``done`` is split, per device, into notice (until it reports
   ``downloading``), download (until the model file's last write), verify + install (size
   and sha256 checked, fsynced, renamed into the repository: until ``installed``), load +
   canary (until ``healthy``) and the hub's soak. The peer: an operator copying a same-size
   version to each box by hand, one after another (``curl`` from the same hub, ``cp`` of
   the manifest, the repository's load call, until the version answers ready).
2. **1,000 simulated devices** (``benchmarks/sim_fleet.py``: simulated, because a thousand
   real daemons cannot run here) against a real hub on PostgreSQL and then on SQLite, with
   the 14 KiB sensor-anomaly model as the artifact: completion time across waves, the
   hub's CPU seconds per device (``/proc/<pid>/stat``; for PostgreSQL its server's too) and
   its RSS.

Options: ``--only real fleet``, ``--devices``, ``--interval`` (heartbeat seconds of the
simulated devices), ``--size-mb``, ``--soak``. Results: ``benchmarks/results/rollout-*``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import Daemon, fmt, median, pct, table
from benchmarks.hubparts import (
    SENSOR,
    Hub,
    Postgres,
    big_version,
    call,
    enroll_cli,
    enroll_many,
    hub_cli,
    hub_env,
    postgres,
    sha256_of,
    small_version,
)
from benchmarks.sim_fleet import SimFleet

RESULTS = Path(__file__).resolve().parent / "results"
NORMAL = [21.0, 45.0, 0.6] * 32
STATES = ("downloading", "installed", "healthy")


def device_env(name: str, state: Path, hub: str, token: str, key: str) -> dict[str, str]:
    return {
        "STATE_DIRECTORY": str(state),
        "APPLIANCE_DEVICE__ID": name,
        "APPLIANCE_HUB__URL": hub,
        "APPLIANCE_HUB__TOKEN": token,
        "APPLIANCE_HUB__PUBLIC_KEY": key,
        "APPLIANCE_HUB__HEARTBEAT_INTERVAL": "1",
        "APPLIANCE_HEALTH__INTERVAL": "1",
        "APPLIANCE_HUB__UPDATE_MARGIN_BYTES": "0",
        "APPLIANCE_CANARY__ENABLED": "true",
        "APPLIANCE_CANARY__SHARE": "0.5",
        "APPLIANCE_CANARY__WINDOW": "2",
        "APPLIANCE_CANARY__MIN_REQUESTS": "5",
        # Judged on errors only: latency ratios on two shared cores measure the neighbours.
        "APPLIANCE_CANARY__MAX_LATENCY_RATIO": "1000",
    }


@contextmanager
def traffic(urls: list[str]) -> Iterator[list[int]]:
    """About 20 inference requests a second to each daemon: its canary judges on them."""
    stop = threading.Event()
    statuses: list[int] = []
    body = {"inputs": [{"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": NORMAL}]}

    def run(url: str) -> None:
        while not stop.is_set():
            try:
                call(url + "/v2/models/sensor-anomaly/infer", body, timeout=10)
                statuses.append(200)
            except (RuntimeError, OSError):
                statuses.append(0)
            stop.wait(0.05)

    threads = [threading.Thread(target=run, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    try:
        yield statuses
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def watch(url: str, rollout: str, timeout: float, every: float) -> tuple[dict[str, Any], Any]:
    """Poll the rollout until it ends; (last status, {wave index: when it started})."""
    waves: dict[int, float] = {0: time.time()}
    deadline = time.monotonic() + timeout
    while True:
        doc = call(f"{url}/api/v1/rollouts/{rollout}")
        if doc["state"] == "running":
            waves.setdefault(int(doc["wave"]), time.time())
        if doc["state"] != "running" or time.monotonic() > deadline:
            return doc, waves
        time.sleep(every)


def first_reports(url: str, device: str, rollout: str) -> dict[str, float]:
    """When the device made each report (the record's own time), from the hub."""
    found: dict[str, float] = {}
    records = call(f"{url}/api/v1/devices/{device}/records?limit=5000")["records"]
    for r in records:
        body = r["body"]
        if r["kind"] == "rollout" and body.get("rollout") == rollout:
            found.setdefault(body["state"], float(r["time"]))
    return found


def run_real(work: Path, size_mb: float, soak: float) -> dict[str, Any]:
    state = work / "real"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    env = hub_env(
        f"sqlite:///{state / 'hub.db'}",
        state,
        APPLIANCE_HUB_ROLLOUT__INTERVAL="0.5",
        APPLIANCE_HUB_FLEET__OFFLINE_AFTER="30",
    )
    size = int(size_mb * 1_000_000)
    v2 = big_version(state / "v2", "2", size, seed=2)
    v3 = big_version(state / "v3", "3", size, seed=3)
    artifact = hub_cli(env, "publish", str(v2)).stdout.strip()
    hub_cli(env, "publish", str(v3))  # the peer fetches the same kind of file from the hub
    names = ["bench-a", "bench-b", "bench-c"]
    enrolled = {n: enroll_cli(env, n) for n in names}
    key = enrolled[names[0]][1]
    out: dict[str, Any] = {"artifact_bytes": sum(p.stat().st_size for p in v2.iterdir())}
    with ExitStack() as stack:
        hub = Hub(env)
        stack.callback(hub.stop)
        daemons: dict[str, Daemon] = {}
        for n in names:
            models = state / n / "models"
            shutil.copytree(SENSOR, models / "sensor-anomaly" / "1")
            (state / n / "state").mkdir()
            token = enrolled[n][0]
            d = Daemon(
                "--models-dir",
                str(models),
                env=device_env(n, state / n / "state", hub.url, token, key),
            )
            stack.callback(d.stop)
            daemons[n] = d
        # Every device has sent a heartbeat (so the hub knows it online) before the start.
        deadline = time.monotonic() + 60
        while not all(
            d["status"] == "online" for d in call(hub.url + "/api/v1/devices")["devices"]
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemons did not reach the hub")
            time.sleep(0.2)
        out["heartbeat"] = call(f"{hub.url}/api/v1/devices/{names[0]}")["latest"]
        with traffic([d.url for d in daemons.values()]) as statuses:
            time.sleep(1)
            load_before = os.getloadavg()
            t0 = time.time()
            started = hub_cli(
                env, "rollout", "start", artifact, "--all", "--waves", "1,100%", "--soak", str(soak)
            )
            rollout = started.stdout.strip()
            out["cli_s"] = time.time() - t0
            doc, wave_starts = watch(hub.url, rollout, 300, 0.1)
            t_done = time.time()
            wave_starts[0] = doc["created"]  # made (and its first wave asked for) in the CLI
            out["created_s"] = doc["created"] - t0
            out["load_average"] = [load_before, os.getloadavg()]
            out["state"] = doc["state"]
            out["reason"] = doc["reason"]
            out["total_s"] = t_done - t0
            out["wave_starts_s"] = {str(k): v - t0 for k, v in sorted(wave_starts.items())}
            devices = []
            for d in doc["devices"]:
                name = d["device_id"]
                reports = first_reports(hub.url, name, rollout)
                model = state / name / "models" / "sensor-anomaly" / "2" / "model.onnx"
                written = model.stat().st_mtime_ns / 1e9 if model.exists() else None
                devices.append(
                    {
                        "device": name,
                        "wave": d["wave"],
                        "state": d["state"],
                        "reason": d["reason"],
                        "wave_start_s": wave_starts.get(d["wave"], t0) - t0,
                        **{f"{s}_s": reports[s] - t0 for s in STATES if s in reports},
                        "written_s": written - t0 if written else None,
                        "hub_healthy_s": d["healthy_at"] - t0 if d["healthy_at"] else None,
                    }
                )
            out["devices"] = devices
            # The peer: the same kind of copy by hand, box after box.
            out["peer"] = peer_copy(state, v3, hub.url, daemons, enrolled)
            out["requests"] = len(statuses)
            out["request_failures"] = sum(1 for s in statuses if s != 200)
    return out


def peer_copy(
    state: Path, v3: Path, hub: str, daemons: dict[str, Daemon], enrolled: dict[str, Any]
) -> dict[str, Any]:
    sha = sha256_of(v3 / "model.onnx")
    steps = []
    t0 = time.perf_counter()
    for name, d in daemons.items():
        dest = state / name / "models" / "sensor-anomaly" / "3"
        began = time.perf_counter()
        subprocess.run(
            [
                "curl",
                "-sSf",
                "--create-dirs",
                "-o",
                str(dest / "model.onnx"),
                "-H",
                f"Authorization: Bearer {enrolled[name][0]}",
                f"{hub}/api/v1/artifacts/blobs/{sha}",
            ],
            check=True,
        )
        subprocess.run(["cp", str(v3 / "manifest.toml"), str(dest / "manifest.toml")], check=True)
        copied = time.perf_counter()
        subprocess.run(
            [
                "curl",
                "-sSf",
                "-o",
                "/dev/null",
                "-X",
                "POST",
                f"{d.url}/v2/repository/models/sensor-anomaly/load",
            ],
            check=True,
        )
        ready_url = f"{d.url}/v2/models/sensor-anomaly/versions/3/ready"
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(ready_url, timeout=5).get("ready"):
                    break
            except (RuntimeError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: version 3 not ready after the copy")
            time.sleep(0.02)
        done = time.perf_counter()
        steps.append({"device": name, "copy_s": copied - began, "reload_s": done - copied})
    return {"total_s": time.perf_counter() - t0, "devices": steps}


# ---------------------------------------------------------------- simulated devices


async def drive(
    hub: Hub,
    pg: Postgres | None,
    fleet: SimFleet,
    artifact: str,
    waves: list[str],
    soak: float,
    timeout: float,
) -> dict[str, Any]:
    n = len(fleet.devices)
    out: dict[str, Any] = {}
    async with fleet, aiohttp.ClientSession() as http:
        began = time.monotonic()
        while fleet.seen() < n:
            if time.monotonic() - began > fleet.interval * 3 + 60:
                raise RuntimeError(f"only {fleet.seen()} of {n} devices reached the hub")
            await asyncio.sleep(0.2)
        out["all_seen_s"] = time.monotonic() - began
        # Heartbeats alone, one interval: what the fleet costs the hub without a rollout.
        c0, p0, m0 = hub.cpu(), pg.cpu() if pg else 0.0, time.monotonic()
        await asyncio.sleep(fleet.interval)
        idle = time.monotonic() - m0
        out["idle_hub_cpu_per_s"] = (hub.cpu() - c0) / idle
        out["idle_db_cpu_per_s"] = ((pg.cpu() if pg else 0.0) - p0) / idle
        out["idle_rss"] = hub.memory()[0]
        fleet.latencies.clear()
        out["load_before"] = os.getloadavg()
        c1, p1 = hub.cpu(), pg.cpu() if pg else 0.0
        t0 = time.time()
        body = {"artifact": artifact, "target": {"all": True}, "waves": waves, "soak": soak}
        async with http.post(hub.url + "/api/v1/rollouts", json=body) as resp:
            doc = await resp.json()
            if resp.status != 201:
                raise RuntimeError(f"rollout not started: {resp.status} {doc}")
        out["create_s"] = time.time() - t0
        rollout = doc["id"]
        wave_starts: dict[int, float] = {0: t0}
        polls = 0
        while doc["state"] == "running" and time.time() - t0 < timeout:
            await asyncio.sleep(1.0)  # an operator's dashboard polling once a second
            async with http.get(f"{hub.url}/api/v1/rollouts/{rollout}") as resp:
                doc = await resp.json()
            polls += 1
            if doc["state"] == "running":
                wave_starts.setdefault(int(doc["wave"]), time.time())
        t_done = time.time()
        c2, p2 = hub.cpu(), pg.cpu() if pg else 0.0
        out["load_after"] = os.getloadavg()
        out["rss"], out["rss_peak"] = hub.memory()
        duration = t_done - t0
        out.update(
            state=doc["state"],
            reason=doc["reason"],
            counts=doc["counts"],
            total_s=duration,
            status_polls=polls,
            hub_cpu_s=c2 - c1,
            db_cpu_s=p2 - p1,
            hub_cpu_per_device_ms=(c2 - c1) / n * 1000,
            db_cpu_per_device_ms=(p2 - p1) / n * 1000,
            # Beyond what the heartbeats alone cost in the same time.
            rollout_cpu_per_device_ms=(c2 - c1 - out["idle_hub_cpu_per_s"] * duration) / n * 1000,
            ingest_p50_ms=pct(fleet.latencies, 50) * 1000,
            ingest_p99_ms=pct(fleet.latencies, 99) * 1000,
            errors=len(fleet.errors),
            first_errors=fleet.errors[:5],
            retries=fleet.retries,
            ranged=fleet.ranged,
            downloaded_bytes=fleet.downloaded,
        )
        by_device = {d.id: d for d in fleet.devices}
        per_wave = []
        for index, wave in enumerate(doc["waves"]):
            start = wave_starts.get(index, t0)
            members = [by_device[i] for i in wave["devices"]]
            notice = [m.reported["downloading"] - start for m in members if m.reported]
            fetch = [
                m.reported["installed"] - m.reported["downloading"]
                for m in members
                if "installed" in m.reported
            ]
            ends = [m.reported["healthy"] for m in members if "healthy" in m.reported]
            per_wave.append(
                {
                    "wave": wave["wave"],
                    "devices": len(members),
                    "healthy": wave["healthy"],
                    "start_s": start - t0,
                    "all_healthy_s": (max(ends) - t0) if ends else None,
                    "notice_p50_s": median(notice),
                    "notice_max_s": max(notice) if notice else float("nan"),
                    "download_p50_ms": median(fetch) * 1000,
                    "download_p99_ms": pct(fetch, 99) * 1000,
                }
            )
        out["waves"] = per_wave
    return out


def run_fleet(
    work: Path,
    backend: str,
    pg: Postgres | None,
    count: int,
    interval: float,
    waves: list[str],
    soak: float,
    heartbeat: dict[str, Any],
) -> dict[str, Any]:
    state = work / f"fleet-{backend}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    if pg is not None:
        storage = pg.create_database(f"bench_{int(time.time())}")
    else:
        storage = f"sqlite:///{state / 'hub.db'}"
    env = hub_env(
        storage,
        state,
        APPLIANCE_HUB_ROLLOUT__INTERVAL="0.5",
        APPLIANCE_HUB_FLEET__OFFLINE_AFTER=str(max(90.0, interval * 3)),
    )
    artifact = hub_cli(env, "publish", str(small_version(state / "v2", "2"))).stdout.strip()
    ids = [f"sim-{i:04d}" for i in range(count)]
    tokens = enroll_many(storage, ids)
    key = hub_cli(env, "public-key").stdout.strip()
    hub = Hub(env)
    try:
        fleet = SimFleet(hub.url, tokens, key, interval=interval, heartbeat=heartbeat)
        result = asyncio.run(drive(hub, pg, fleet, artifact, waves, soak, timeout=600))
    finally:
        hub.stop()
    result.update(backend=backend, devices=count, interval=interval, waves_asked=waves, soak=soak)
    return result


def fallback_heartbeat(work: Path) -> dict[str, Any]:
    """A real daemon's heartbeat, read back from a hub (when part 1 did not run)."""
    state = work / "heartbeat"
    shutil.rmtree(state, ignore_errors=True)
    (state / "dev" / "state").mkdir(parents=True)
    env = hub_env(f"sqlite:///{state / 'hub.db'}", state)
    token, key = enroll_cli(env, "bench-hb")
    hub = Hub(env)
    try:
        d = Daemon(env=device_env("bench-hb", state / "dev" / "state", hub.url, token, key))
        try:
            deadline = time.monotonic() + 60
            while True:
                latest = call(f"{hub.url}/api/v1/devices/bench-hb").get("latest")
                if latest:
                    return dict(latest)
                if time.monotonic() > deadline:
                    raise RuntimeError("no heartbeat from the daemon")
                time.sleep(0.2)
        finally:
            d.stop()
    finally:
        hub.stop()


# ------------------------------------------------------------------------- report


def render(r: dict[str, Any]) -> str:
    out = [
        f"# Rollout benchmark ({r['when']})",
        "",
        f"Machine: {r['machine']}; load average before {fmt(r['load_average'][0], 2)}, "
        f"after {fmt(r['load_average_after'][0], 2)}.",
        "",
        *sections(r),
    ]
    return "\n".join(out)


def sections(r: dict[str, Any]) -> list[str]:
    """The Markdown sections of one run's results (also for ``python -m benchmarks``)."""
    out: list[str] = []
    if "real" in r:
        out += _render_real(r["real"])
    for key in ("fleet_postgresql", "fleet_sqlite"):
        if key in r:
            out += _render_fleet(r[key])
    for key, why in r.get("failed", {}).items():
        out += [f"**{key} failed**: {why}", ""]
    return out


def _render_real(x: dict[str, Any]) -> list[str]:
    mb = x["artifact_bytes"] / 1e6
    rows = []
    for d in x["devices"]:
        start = d["wave_start_s"]
        rows.append(
            [
                d["device"],
                d["wave"] + 1,
                d["state"],
                start,
                d.get("downloading_s", float("nan")) - start,
                (d["written_s"] or float("nan")) - d.get("downloading_s", float("nan")),
                d.get("installed_s", float("nan")) - (d["written_s"] or float("nan")),
                d.get("healthy_s", float("nan")) - d.get("installed_s", float("nan")),
                d.get("healthy_s", float("nan")),
            ]
        )
    peer = x["peer"]
    fetches = [d.get("installed_s", 0) - d.get("downloading_s", 0) for d in x["devices"]]
    la = x["load_average"]
    lines = [
        f"## Rollout of a {mb:.1f} MB model to 3 real daemons (waves 1,100%)",
        "",
        f"State {x['state']} {x['reason']}; {fmt(x['total_s'], 2)} s from `rollout start` "
        f"(the CLI made it {fmt(x['created_s'], 2)} s in and returned after "
        f"{fmt(x['cli_s'], 2)} s) to `done`. Load average "
        f"{fmt(la[0][0], 2)} before, {fmt(la[1][0], 2)} after.",
        "",
        table(
            [
                "device",
                "wave",
                "state",
                "wave start s",
                "notice s",
                "download s",
                "verify + install s",
                "load + canary s",
                "healthy at s",
            ],
            [[fmt(c, 2) if isinstance(c, float) else c for c in row] for row in rows],
        ),
        "",
        table(
            ["by hand (peer)", "copy (curl + cp) s", "reload until ready s"],
            [[p["device"], fmt(p["copy_s"], 2), fmt(p["reload_s"], 2)] for p in peer["devices"]],
        ),
        "",
        f"By hand, three boxes one after another: {fmt(peer['total_s'], 2)} s. The rollout "
        f"took {fmt(x['total_s'] / peer['total_s'], 2)}× that end to end (waves, canary and "
        f"soak included); its fetch + verify + install, summed over the devices, "
        f"{fmt(sum(fetches), 2)} s ({fmt(sum(fetches) / peer['total_s'], 2)}× the hand copy "
        f"with its reloads). {x['request_failures']} of {x['requests']} inference requests "
        "failed during the rollout and the copies.",
        "",
    ]
    return lines


def _render_fleet(x: dict[str, Any]) -> list[str]:
    rows = [
        [
            w["wave"],
            w["devices"],
            w["healthy"],
            fmt(w["start_s"], 1),
            fmt(w["all_healthy_s"], 1) if w["all_healthy_s"] is not None else "—",
            fmt(w["notice_p50_s"], 2),
            fmt(w["notice_max_s"], 2),
            fmt(w["download_p50_ms"], 1),
            fmt(w["download_p99_ms"], 1),
        ]
        for w in x["waves"]
    ]
    return [
        f"## {x['devices']} simulated devices, hub on {x['backend']}",
        "",
        f"State {x['state']} {x['reason']} after {fmt(x['total_s'], 1)} s (waves "
        f"{','.join(x['waves_asked'])}, soak {x['soak']} s, heartbeat every {x['interval']} s). "
        f"Load average {fmt(x['load_before'][0], 2)} before, {fmt(x['load_after'][0], 2)} after.",
        "",
        table(
            [
                "wave",
                "devices",
                "healthy",
                "starts at s",
                "all healthy at s",
                "notice p50 s",
                "notice max s",
                "fetch p50 ms",
                "fetch p99 ms",
            ],
            rows,
        ),
        "",
        table(
            [
                "hub CPU ms/device",
                "of it beyond heartbeats",
                "database server CPU ms/device",
                "idle hub CPU %",
                "hub RSS MiB idle / end / peak",
                "ingest p50 / p99 ms",
            ],
            [
                [
                    fmt(x["hub_cpu_per_device_ms"], 2),
                    fmt(x["rollout_cpu_per_device_ms"], 2),
                    fmt(x["db_cpu_per_device_ms"], 2) if x["backend"] == "postgresql" else "—",
                    fmt(x["idle_hub_cpu_per_s"] * 100, 1),
                    f"{x['idle_rss'] / 2**20:.0f} / {x['rss'] / 2**20:.0f} / "
                    f"{x['rss_peak'] / 2**20:.0f}",
                    f"{fmt(x['ingest_p50_ms'], 1)} / {fmt(x['ingest_p99_ms'], 1)}",
                ]
            ],
        ),
        "",
        f"{x['errors']} client errors, {x['retries']} downloads resumed after a cut "
        f"({x['ranged']} Range answers), {x['status_polls']} status polls.",
        "",
    ]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=["real", "fleet"], default=["real", "fleet"])
    parser.add_argument("--size-mb", type=float, default=30.0)
    parser.add_argument("--soak", type=float, default=2.0, help="seconds per wave")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--interval", type=float, default=30.0, help="heartbeat seconds (the daemon's default)"
    )
    parser.add_argument("--waves", default="1%,10%,100%")
    parser.add_argument("--backends", nargs="+", default=["postgresql", "sqlite"])
    return parser


def main() -> None:
    results = run(parser().parse_args())
    RESULTS.mkdir(exist_ok=True)
    text = render(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (stamp, "latest"):
        (RESULTS / f"rollout-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / f"rollout-{name}.md").write_text(text)
    print(text)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = RESULTS / "work" / "rollout"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
    }
    heartbeat: dict[str, Any] | None = None
    if "real" in args.only:
        print("rollout to 3 real daemons ...", flush=True)
        try:
            results["real"] = run_real(work, args.size_mb, args.soak)
            heartbeat = results["real"].pop("heartbeat")
        except Exception as exc:  # the fleet part's figures are still worth having
            print(f"  failed: {exc}", flush=True)
            results.setdefault("failed", {})["real"] = str(exc)
        _save_partial(results)
    if "fleet" in args.only:
        heartbeat = heartbeat or fallback_heartbeat(work)
        waves = [w for w in args.waves.split(",") if w]
        for backend in args.backends:
            print(f"{args.devices} simulated devices, {backend} ...", flush=True)
            try:
                with ExitStack() as stack:
                    pg = stack.enter_context(postgres()) if backend == "postgresql" else None
                    results[f"fleet_{backend}"] = run_fleet(
                        work, backend, pg, args.devices, args.interval, waves, args.soak, heartbeat
                    )
            except Exception as exc:
                print(f"  failed: {exc}", flush=True)
                results.setdefault("failed", {})[f"fleet_{backend}"] = str(exc)
            _save_partial(results)
    results["load_average_after"] = os.getloadavg()
    return results


def _save_partial(results: dict[str, Any]) -> None:
    """What is measured so far, in case a later part is stopped."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollout-partial.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
