"""What a health snapshot holds: the value types :class:`~appliance.ops.health.HealthCollector`
fills in and the alert rules, the hub uploader and MQTT read.

Cumulative counters (``requests_total``, ``latency_sum_s`` ...) sit beside rates over the
interval since the previous snapshot (``requests_per_s``, percentiles), so consumers can
compute any window of their own. Sensors a box does not have are absent (``None``, empty
mapping or tuple), never faked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DiskStats:
    """Usage of the filesystem holding ``path``."""

    path: str
    total_bytes: int
    used_bytes: int
    percent: float


@dataclass(frozen=True)
class GpuStats:
    """One GPU: an NVIDIA card (``nvidia-smi``) or a Jetson's integrated GPU (sysfs)."""

    name: str
    utilization_percent: float
    memory_used_bytes: int | None = None  # None: not reported (Jetson GPUs share system RAM)
    memory_total_bytes: int | None = None


@dataclass(frozen=True)
class Throttling:
    """Raspberry Pi firmware flags (``get_throttled``): now and since boot."""

    under_voltage: bool
    freq_capped: bool
    throttled: bool
    soft_temp_limit: bool
    under_voltage_occurred: bool
    freq_capped_occurred: bool
    throttled_occurred: bool
    soft_temp_limit_occurred: bool
    raw: int


@dataclass(frozen=True)
class SystemStats:
    """Whole-machine readings."""

    cpu_percent: float
    cpu_count: int
    load_1m: float
    load_5m: float
    load_15m: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_percent: float
    swap_total_bytes: int
    swap_used_bytes: int
    swap_percent: float
    disks: tuple[DiskStats, ...]
    net_rx_bytes: int
    net_tx_bytes: int
    net_rx_bytes_per_s: float
    net_tx_bytes_per_s: float
    process_rss_bytes: int
    process_cpu_percent: float
    uptime_s: float  # since boot
    temperatures_c: Mapping[str, float] = field(default_factory=dict)
    throttling: Throttling | None = None
    gpus: tuple[GpuStats, ...] = ()

    @property
    def max_temperature_c(self) -> float | None:
        return max(self.temperatures_c.values()) if self.temperatures_c else None

    @property
    def max_gpu_percent(self) -> float | None:
        return max(g.utilization_percent for g in self.gpus) if self.gpus else None


@dataclass(frozen=True)
class ModelStats:
    """One model's requests over every transport: cumulative totals and interval rates."""

    name: str
    state: str
    requests_total: int
    errors_total: int  # answered with a 5xx status (or an MQTT "error")
    latency_sum_s: float  # response time, queue wait included
    latency_count: int
    tokens_total: int
    load_failures: int
    queue_depth: int
    running: int
    requests_per_s: float
    error_rate: float  # errors / requests in the interval, 0..1
    tokens_per_s: float
    latency_avg_ms: float | None  # None: no request finished in the interval
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    version: str = ""  # the version serving requests that name none (the hub's rollouts read it)


@dataclass(frozen=True)
class HealthSnapshot:
    """Everything the box knows about itself at one moment."""

    time: float  # Unix time
    monotonic: float  # time.monotonic() of the measurement, for windows
    interval_s: float  # seconds since the previous snapshot (rates cover this)
    process_uptime_s: float
    system: SystemStats
    models: Mapping[str, ModelStats]
    http_requests_total: int  # HTTP responses, health/readiness probes excepted
    http_5xx_total: int  # server errors among them; shed load (full queues) excepted
    http_shed_total: int = 0  # 503s of full queues: backpressure, not failures

    @property
    def requests_total(self) -> int:
        return sum(m.requests_total for m in self.models.values())

    @property
    def requests_per_s(self) -> float:
        return sum(m.requests_per_s for m in self.models.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain dicts, lists, numbers and strings."""
        out = dataclasses.asdict(self)
        out.pop("monotonic")
        out["system"]["max_temperature_c"] = self.system.max_temperature_c
        out["system"]["max_gpu_percent"] = self.system.max_gpu_percent
        out["requests_per_s"] = self.requests_per_s
        return out


def throttling_flags(raw: int | None) -> Throttling | None:
    """The Raspberry Pi firmware's ``get_throttled`` bit field, decoded."""
    if raw is None:
        return None
    return Throttling(
        under_voltage=bool(raw & 0x1),
        freq_capped=bool(raw & 0x2),
        throttled=bool(raw & 0x4),
        soft_temp_limit=bool(raw & 0x8),
        under_voltage_occurred=bool(raw & 0x10000),
        freq_capped_occurred=bool(raw & 0x20000),
        throttled_occurred=bool(raw & 0x40000),
        soft_temp_limit_occurred=bool(raw & 0x80000),
        raw=raw,
    )


__all__ = [
    "DiskStats",
    "GpuStats",
    "HealthSnapshot",
    "ModelStats",
    "SystemStats",
    "Throttling",
    "throttling_flags",
]
