"""Background units of the hub: offline detection and retention.

A device that has not uploaded for ``fleet.offline_after`` seconds is marked offline: a
``device_offline`` alert fires (and resolves on its next upload). After the hub itself
starts, devices get one full ``offline_after`` of grace, so a hub restart does not declare
the whole fleet offline.
"""

from __future__ import annotations

import logging
import time

from appliance.hub.config import HubConfig
from appliance.hub.metrics import HubMetrics
from appliance.hub.storage.base import Storage
from appliance.ops.units import Periodic

log = logging.getLogger(__name__)


class OfflineMonitor(Periodic):
    """Marks silent devices offline and keeps the fleet gauges current."""

    name = "hub-offline-monitor"

    def __init__(self, storage: Storage, config: HubConfig, metrics: HubMetrics) -> None:
        fleet = config.fleet
        super().__init__(fleet.check_interval)
        self._storage = storage
        self._metrics = metrics
        self._offline_after = fleet.offline_after
        self._started = time.time()

    async def tick(self) -> None:
        now = time.time()
        if now - self._started >= self._offline_after:
            gone = await self._storage.mark_offline(
                now - self._offline_after, now, self._offline_after
            )
            for device_id in gone:
                log.warning(
                    "device %s is offline (no upload for %.0fs)", device_id, self._offline_after
                )
            self._metrics.offline_marked.inc(len(gone))
        devices = await self._storage.devices()
        counts: dict[str, int] = {}
        for device in devices:
            status = device.status()
            counts[status] = counts.get(status, 0) + 1
        for status in ("online", "alerting", "offline", "never seen", "revoked"):
            self._metrics.devices.labels(status).set(counts.get(status, 0))
        firing = await self._storage.alerts(None, "firing", 100_000)
        self._metrics.alerts_firing.set(len(firing))


class Retention(Periodic):
    """Downsamples old heartbeats and deletes history past its retention."""

    name = "hub-retention"

    def __init__(self, storage: Storage, config: HubConfig, metrics: HubMetrics) -> None:
        interval = config.retention.interval
        super().__init__(interval, first_delay=min(60.0, interval))
        self._storage = storage
        self._config = config.retention
        self._metrics = metrics

    async def tick(self) -> None:
        now = time.time()
        n = await self._storage.retention(
            now - self._config.raw, now - self._config.keep, self._config.bucket
        )
        if n:
            log.info("retention: downsampled %d raw heartbeat(s)", n)
        self._metrics.retention_downsampled.inc(n)
