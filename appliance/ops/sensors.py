"""Blocking readers for system sensors: psutil, sysfs and ``nvidia-smi``.

Everything here runs on a worker thread (:class:`~appliance.ops.health.HealthCollector`
calls it through ``asyncio.to_thread``). A sensor the machine lacks yields nothing; a
sensor that fails to read is skipped with a debug log, so one odd driver cannot stop the
health loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# Where Jetson kernels expose the integrated GPU's load (0-1000), by generation.
_JETSON_GPU_LOAD = (
    "devices/gpu.0/load",  # Nano, TX1/TX2, Xavier
    "devices/platform/gpu.0/load",
    "devices/17000000.ga10b/load",  # Orin, JetPack 5
    "devices/platform/17000000.ga10b/load",
    "devices/platform/bus@0/17000000.gpu/load",  # Orin, JetPack 6
)
# Raspberry Pi firmware throttling flags (same bits as `vcgencmd get_throttled`).
_PI_THROTTLED = "devices/platform/soc/soc:firmware/get_throttled"
_NVIDIA_QUERY = "--query-gpu=name,utilization.gpu,memory.used,memory.total"


@dataclass(frozen=True)
class DiskReading:
    path: str
    total: int
    used: int
    percent: float


@dataclass(frozen=True)
class GpuReading:
    name: str
    utilization: float
    memory_used: int | None = None
    memory_total: int | None = None


@dataclass(frozen=True)
class Reading:
    """One pass over every sensor."""

    cpu_percent: float
    cpu_count: int
    load: tuple[float, float, float]
    memory_total: int
    memory_available: int
    memory_percent: float
    swap_total: int
    swap_used: int
    swap_percent: float
    disks: tuple[DiskReading, ...]
    net_rx: int
    net_tx: int
    net_rx_per_s: float
    net_tx_per_s: float
    rss: int
    process_cpu_percent: float
    uptime: float
    temperatures: dict[str, float] = field(default_factory=dict)
    throttled: int | None = None
    gpus: tuple[GpuReading, ...] = ()


class SystemProbe:
    """Reads the machine. Not thread-safe: one caller at a time (the collector's lock)."""

    def __init__(
        self,
        *,
        disk_paths: list[str],
        sysfs: Path = Path("/sys"),
        nvidia_smi: str | None = "nvidia-smi",
    ) -> None:
        self._disk_paths = disk_paths
        self._sysfs = sysfs
        self._nvidia_smi = shutil.which(nvidia_smi) if nvidia_smi else None
        self._process = psutil.Process(os.getpid())
        self._net: tuple[float, int, int] | None = None

    def prime(self) -> None:
        """Start the CPU and network counters so the first real reading has a baseline."""
        psutil.cpu_percent(interval=None)
        self._process.cpu_percent(interval=None)
        rx, tx = _net_totals()
        self._net = (time.monotonic(), rx, tx)

    def read(self) -> Reading:
        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        rx, tx = _net_totals()
        now = time.monotonic()
        rx_rate = tx_rate = 0.0
        if self._net is not None and now > self._net[0]:
            elapsed = now - self._net[0]
            rx_rate = max(0, rx - self._net[1]) / elapsed
            tx_rate = max(0, tx - self._net[2]) / elapsed
        self._net = (now, rx, tx)
        try:
            load = os.getloadavg()
        except OSError:  # pragma: no cover - not on Linux
            load = (0.0, 0.0, 0.0)
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            process_cpu = self._process.cpu_percent(interval=None)
        return Reading(
            cpu_percent=psutil.cpu_percent(interval=None),
            cpu_count=psutil.cpu_count() or 1,
            load=(round(load[0], 3), round(load[1], 3), round(load[2], 3)),
            memory_total=vm.total,
            memory_available=vm.available,
            memory_percent=vm.percent,
            swap_total=swap.total,
            swap_used=swap.used,
            swap_percent=swap.percent,
            disks=tuple(self._disks()),
            net_rx=rx,
            net_tx=tx,
            net_rx_per_s=round(rx_rate, 3),
            net_tx_per_s=round(tx_rate, 3),
            rss=rss,
            process_cpu_percent=process_cpu,
            uptime=round(time.time() - psutil.boot_time(), 3),
            temperatures=self.temperatures(),
            throttled=self.throttled(),
            gpus=tuple(self.jetson_gpus() + self.nvidia_gpus()),
        )

    def _disks(self) -> list[DiskReading]:
        out = []
        for path in self._disk_paths:
            try:
                usage = psutil.disk_usage(path)
            except OSError as exc:
                log.debug("disk usage of %s unavailable: %s", path, exc)
                continue
            out.append(DiskReading(path, usage.total, usage.used, usage.percent))
        return out

    def temperatures(self) -> dict[str, float]:
        """Thermal zones by type (``cpu-thermal``, ``GPU-therm`` ...), in °C.

        Falls back to hwmon through psutil where the kernel has no thermal zones (many PCs).
        """
        out: dict[str, float] = {}
        for zone in sorted(self._sysfs.glob("class/thermal/thermal_zone*")):
            try:
                millideg = int((zone / "temp").read_text().strip())
                kind = (zone / "type").read_text().strip() or zone.name
            except (OSError, ValueError):
                continue  # some zones refuse reads (disabled, or firmware-owned)
            name = kind if kind not in out else f"{kind}-{zone.name.removeprefix('thermal_zone')}"
            out[name] = round(millideg / 1000, 1)
        if out or self._sysfs != Path("/sys"):
            return out
        try:
            hw = psutil.sensors_temperatures()
        except (AttributeError, OSError):  # pragma: no cover - platform without hwmon
            return out
        for chip, entries in hw.items():
            for i, entry in enumerate(entries):
                label = entry.label or str(i)
                out[f"{chip}/{label}"] = round(entry.current, 1)
        return out

    def throttled(self) -> int | None:
        """The Raspberry Pi's throttling bit field, where the firmware exposes it."""
        path = self._sysfs / _PI_THROTTLED
        try:
            return int(path.read_text().strip(), 16)
        except (OSError, ValueError):
            return None

    def jetson_gpus(self) -> list[GpuReading]:
        for rel in _JETSON_GPU_LOAD:
            try:
                load = int((self._sysfs / rel).read_text().strip())
            except (OSError, ValueError):
                continue
            return [GpuReading(name="jetson-gpu", utilization=round(load / 10, 1))]
        return []

    def nvidia_gpus(self) -> list[GpuReading]:
        if self._nvidia_smi is None:
            return []
        try:
            result = subprocess.run(
                [self._nvidia_smi, _NVIDIA_QUERY, "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("nvidia-smi failed: %s", exc)
            return []
        return parse_nvidia_smi(result.stdout)


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """Rows of ``name, utilization %, memory used MiB, memory total MiB``."""
    out = []
    for i, line in enumerate(text.splitlines()):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        name, util, used, total = parts
        try:
            utilization = float(util)
        except ValueError:
            continue  # "[N/A]": the card does not report it
        out.append(
            GpuReading(
                name=f"{i}: {name}",
                utilization=utilization,
                memory_used=_mib(used),
                memory_total=_mib(total),
            )
        )
    return out


def _mib(value: str) -> int | None:
    try:
        return int(float(value) * 1024 * 1024)
    except ValueError:
        return None


def _net_totals() -> tuple[int, int]:
    """Bytes received and sent on every interface but loopback."""
    rx = tx = 0
    try:
        counters = psutil.net_io_counters(pernic=True)
    except OSError:  # pragma: no cover - no /proc/net/dev
        return 0, 0
    for nic, c in counters.items():
        if nic == "lo":
            continue
        rx += c.bytes_recv
        tx += c.bytes_sent
    return rx, tx
