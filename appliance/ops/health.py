"""The box measures itself: system sensors and per-model request statistics.

:class:`HealthCollector` is a lifecycle unit that takes a :class:`HealthSnapshot` every
``health.interval`` seconds. System readings (psutil, sysfs, ``nvidia-smi``) are blocking
calls, so they run on a worker thread; per-model numbers come from the daemon's own
Prometheus registry, so every transport that counts its requests there is included.

A snapshot carries both cumulative counters (``requests_total``, ``latency_sum_s`` ...) and
rates over the interval since the previous snapshot (``requests_per_s``, percentiles), so
consumers can compute any window of their own (the alert rules do). The snapshot's types are
:mod:`appliance.ops.snapshot`.

Consumers: ``collector.latest`` (the newest snapshot, or ``None`` before the first),
``await collector.snapshot()`` (measure now), ``collector.add_listener(fn)`` (called on the
loop with every snapshot), and :meth:`HealthSnapshot.to_dict` for a JSON-ready form.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.config import HealthConfig
from appliance.core.service import Core
from appliance.ops import sensors
from appliance.ops.metrics import SystemMetrics
from appliance.ops.reqstats import Counters, bucket_quantile, read_counters
from appliance.ops.snapshot import (
    DiskStats,
    GpuStats,
    HealthSnapshot,
    ModelStats,
    SystemStats,
    throttling_flags,
)
from appliance.ops.units import stop_task

log = logging.getLogger(__name__)

Listener = Callable[["HealthSnapshot"], None]


# --------------------------------------------------------------------------- the unit


class HealthCollector:
    """Lifecycle unit: a snapshot every ``interval`` seconds, off the event loop."""

    def __init__(
        self,
        core: Core,
        config: HealthConfig,
        *,
        sysfs: Path = Path("/sys"),
        nvidia_smi: str | None = "nvidia-smi",
    ) -> None:
        self._core = core
        self._config = config
        # Built on a worker thread on first use: finding nvidia-smi on PATH and opening
        # this process in /proc are file-system calls the event loop must not wait for.
        self._make_probe = functools.partial(
            sensors.SystemProbe,
            disk_paths=[str(p) for p in config.disk_paths],
            sysfs=sysfs,
            nvidia_smi=nvidia_smi,
        )
        self._probe: sensors.SystemProbe | None = None
        self.latest: HealthSnapshot | None = None
        self._previous: Counters | None = None
        self._listeners: list[Listener] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.started_monotonic = time.monotonic()
        self._remove_status: Callable[[], None] = lambda: None

    @property
    def core(self) -> Core:
        return self._core

    @property
    def interval(self) -> float:
        return self._config.interval

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(snapshot)`` on the loop after each snapshot; must not block.

        Returns a function that removes it.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def __aenter__(self) -> HealthCollector:
        # The first reading only primes CPU counters; rates start with the second.
        await asyncio.to_thread(self._prime_blocking)
        self._previous = read_counters(self._core)
        self._remove_status = self._core.add_status("health", self._status)
        self._task = asyncio.create_task(self._run(), name="appliance-health")
        return self

    def _probe_blocking(self) -> sensors.SystemProbe:
        if self._probe is None:
            self._probe = self._make_probe()
        return self._probe

    def _prime_blocking(self) -> None:
        self._probe_blocking().prime()

    def _read_blocking(self) -> sensors.Reading:
        return self._probe_blocking().read()

    def _status(self) -> dict[str, Any]:
        snap = self.latest
        if snap is None:
            return {"interval_s": self._config.interval, "last": None}
        system = snap.system
        return {
            "interval_s": self._config.interval,
            "last": snap.time,
            "cpu_percent": system.cpu_percent,
            "memory_percent": system.memory_percent,
            "max_temperature_c": system.max_temperature_c,
            "max_gpu_percent": system.max_gpu_percent,
            "under_voltage": system.throttling.under_voltage if system.throttling else None,
        }

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        self._remove_status()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._config.interval)
            try:
                await self.snapshot()
            except Exception:
                log.exception("health snapshot failed")

    async def snapshot(self) -> HealthSnapshot:
        """Measure now, make it :attr:`latest` and hand it to every listener."""
        async with self._lock:
            system = await asyncio.to_thread(self._read_blocking)
            snap = self._build(system)
            self.latest = snap
            self._export(snap)
        for listener in list(self._listeners):
            try:
                listener(snap)
            except Exception:
                log.exception("health listener failed")
        return snap

    def _export(self, snap: HealthSnapshot) -> None:
        system = snap.system
        self._core.unit_metrics(SystemMetrics).export(
            system.cpu_percent,
            system.memory_percent,
            system.process_rss_bytes,
            system.temperatures_c,
            {gpu.name: gpu.utilization_percent for gpu in system.gpus},
        )

    def _build(self, system: sensors.Reading) -> HealthSnapshot:
        now_mono = time.monotonic()
        previous_snap = self.latest
        interval = now_mono - (
            previous_snap.monotonic if previous_snap is not None else self.started_monotonic
        )
        interval = max(interval, 1e-6)
        current = read_counters(self._core)
        before = self._previous or Counters()
        self._previous = current

        models: dict[str, ModelStats] = {}
        for handle in self._core.list_models(pipelines=False):
            name = handle.name
            queue = self._core.queue(name)
            requests = current.requests.get(name, 0)
            errors = current.errors.get(name, 0)
            d_requests = requests - before.requests.get(name, 0)
            d_errors = errors - before.errors.get(name, 0)
            lat_sum = current.latency_sum.get(name, 0.0)
            lat_count = current.latency_count.get(name, 0)
            d_count = lat_count - before.latency_count.get(name, 0)
            d_sum = lat_sum - before.latency_sum.get(name, 0.0)
            now_buckets = current.buckets.get(name, {})
            old_buckets = before.buckets.get(name, {})
            delta = {le: v - old_buckets.get(le, 0.0) for le, v in now_buckets.items()}
            tokens = current.tokens.get(name, 0)

            def pct(q: float, delta: dict[float, float] = delta) -> float | None:
                value = bucket_quantile(q, delta)
                return None if value is None else round(value * 1000, 3)

            models[name] = ModelStats(
                name=name,
                version=handle.version,
                state=handle.state.value,
                requests_total=requests,
                errors_total=errors,
                latency_sum_s=lat_sum,
                latency_count=lat_count,
                tokens_total=tokens,
                load_failures=current.load_failures.get(name, 0),
                queue_depth=queue.waiting,
                running=queue.running,
                requests_per_s=d_requests / interval,
                error_rate=d_errors / d_requests if d_requests > 0 else 0.0,
                tokens_per_s=(tokens - before.tokens.get(name, 0)) / interval,
                latency_avg_ms=round(d_sum / d_count * 1000, 3) if d_count > 0 else None,
                latency_p50_ms=pct(0.5),
                latency_p95_ms=pct(0.95),
                latency_p99_ms=pct(0.99),
            )

        stats = SystemStats(
            cpu_percent=system.cpu_percent,
            cpu_count=system.cpu_count,
            load_1m=system.load[0],
            load_5m=system.load[1],
            load_15m=system.load[2],
            memory_total_bytes=system.memory_total,
            memory_available_bytes=system.memory_available,
            memory_percent=system.memory_percent,
            swap_total_bytes=system.swap_total,
            swap_used_bytes=system.swap_used,
            swap_percent=system.swap_percent,
            disks=tuple(
                DiskStats(path=d.path, total_bytes=d.total, used_bytes=d.used, percent=d.percent)
                for d in system.disks
            ),
            net_rx_bytes=system.net_rx,
            net_tx_bytes=system.net_tx,
            net_rx_bytes_per_s=system.net_rx_per_s,
            net_tx_bytes_per_s=system.net_tx_per_s,
            process_rss_bytes=system.rss,
            process_cpu_percent=system.process_cpu_percent,
            uptime_s=system.uptime,
            temperatures_c=dict(system.temperatures),
            throttling=throttling_flags(system.throttled),
            gpus=tuple(
                GpuStats(
                    name=g.name,
                    utilization_percent=g.utilization,
                    memory_used_bytes=g.memory_used,
                    memory_total_bytes=g.memory_total,
                )
                for g in system.gpus
            ),
        )
        return HealthSnapshot(
            time=time.time(),
            monotonic=now_mono,
            interval_s=round(interval, 6),
            process_uptime_s=round(time.time() - self._core.started, 3),
            system=stats,
            models=models,
            http_requests_total=current.http_total,
            http_5xx_total=current.http_5xx,
            http_shed_total=current.http_shed,
        )


__all__ = ["HealthCollector"]
