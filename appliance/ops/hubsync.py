"""Keeping the fleet hub informed: heartbeats, alerts and events through the outbox.

:class:`HubSync` is a lifecycle unit with two tasks. The *writer* appends what the daemon
produces — a heartbeat (the latest health snapshot) every ``hub.heartbeat_interval``, every
alert transition, model state changes, start-up and outbox-recovery events — to the durable
:class:`~appliance.ops.outbox.HubOutbox`, in the order produced. The *uploader* sends the
oldest records in batches of ``hub.batch_size`` to ``POST {hub.url}/api/v1/ingest`` with the
device's bearer token and deletes them only once the hub answered 200. A failed upload is
retried after a capped exponential backoff with jitter (``backoff_initial`` doubling up to
``backoff_max``), so a hub that is away for hours gets every record, in order, once it is
back; the hub drops the duplicates a lost acknowledgement causes.

Heartbeats ride on health snapshots, so their spacing is the larger of
``hub.heartbeat_interval`` and ``health.interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from appliance import __version__
from appliance.config import Config
from appliance.errors import ConfigError
from appliance.ops.alerts import AlertEngine, AlertEvent
from appliance.ops.config_update import Reload
from appliance.ops.health import HealthCollector
from appliance.ops.instance import state_directory
from appliance.ops.metrics import HubMetrics, OutboxMetrics
from appliance.ops.outbox import HEARTBEAT, HubOutbox, OutboxError, Record
from appliance.ops.snapshot import HealthSnapshot
from appliance.ops.updater import Updater, recover
from appliance.security.crypto import load_cipher

log = logging.getLogger(__name__)

INGEST_PATH = "/api/v1/ingest"
CREDENTIAL_NAME = "hub-token"
_BACKLOG = 1000  # records produced faster than the disk takes them; beyond: dropped
_FLUSH_ON_STOP = 2.0  # seconds a graceful stop spends trying to hand the hub what is queued


class HubRejected(Exception):
    """The hub answered with an error status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"hub answered {status}: {text[:200]}")
        self.status = status


def resolve_token(config: Config, env: Mapping[str, str]) -> str:
    """The device token: ``hub.token``, else ``hub.token_file``, else the systemd credential
    ``hub-token``. Raises :class:`ConfigError` when hub sync is on and none is found."""
    hub = config.hub
    token = hub.token.get_secret_value().strip()
    if token:
        return token
    candidates: list[tuple[str, Path]] = []
    if hub.token_file is not None:
        candidates.append(("hub.token_file", hub.token_file))
    elif env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(("credential", Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME))
    for where, path in candidates:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{where} = {str(path)!r}: cannot read the hub token: {exc.strerror or exc}"
            ) from None
        if token:
            return token
        raise ConfigError(f"{where} = {str(path)!r}: the file is empty")
    raise ConfigError(
        f"hub.url = {hub.url!r} is set but no device token is: set hub.token, hub.token_file "
        f"or the systemd credential {CREDENTIAL_NAME!r} (get one with `appliance hub enroll "
        f"{config.device.id}` on the hub)"
    )


def outbox_path(config: Config, env: Mapping[str, str]) -> Path:
    if config.hub.outbox_path is not None:
        return config.hub.outbox_path
    return state_directory(env) / "outbox.db"


def updates_path(config: Config, env: Mapping[str, str]) -> Path:
    """What the updater has done and has pending (beside the outbox)."""
    return outbox_path(config, env).with_name("updates.json")


def recover_updates(config: Config, env: Mapping[str, str]) -> str | None:
    """At start, before models load: see :func:`appliance.ops.updater.recover`."""
    return recover(config, updates_path(config, env))


class HubSync:
    """Lifecycle unit: durable queueing and upload of everything bound for the hub."""

    def __init__(
        self,
        config: Config,
        collector: HealthCollector,
        alerts: AlertEngine | None,
        *,
        env: Mapping[str, str] | None = None,
        reload: Reload | None = None,
        current: Callable[[], Config] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self._env = env
        self._reload = reload  # with it, configuration fragments from the hub are applied
        self._current = current
        self._config = config
        self._hub = config.hub
        self._collector = collector
        self._alerts = alerts
        self._core = collector.core
        self._token = resolve_token(config, env)
        self.outbox = HubOutbox(
            outbox_path(config, env),
            max_records=self._hub.outbox_max_records,
            max_bytes=self._hub.outbox_max_bytes,
            max_age=self._hub.outbox_max_age,
            metrics=self._core.unit_metrics(OutboxMetrics),
            cipher=load_cipher(config.security.data_key_file, env),
        )
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(_BACKLOG)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._last_heartbeat: float | None = None
        self._last_models: dict[str, str] = {}
        self._idle = asyncio.Event()  # set while the outbox is empty
        self.failures = 0
        self.last_error: str | None = None
        self.last_upload: float | None = None
        self.updater: Updater | None = None  # with hub.public_key: signed model rollouts

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> HubSync:
        await self.outbox.open()
        try:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls()),
                timeout=aiohttp.ClientTimeout(total=self._hub.timeout),
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "User-Agent": f"appliance/{__version__}",
                },
            )
            if self._hub.public_key:
                self.updater = Updater(
                    self._config,
                    self._core,
                    lambda body: self._put("rollout", body),
                    lambda: self._session,
                    updates_path(self._config, self._env),
                    reload=self._reload,
                    current=self._current,
                    state_dir=state_directory(self._env),
                )
            for moved in self.outbox.recovered:
                self._put("event", {"type": "outbox_corrupt", "moved_to": str(moved)})
            self._put(
                "event",
                {"type": "started", "version": __version__, "name": self._config.device.name},
            )
            self._unsubscribe = [
                self._collector.add_listener(self._on_snapshot),
                self._core.add_model_listener(self._on_models),
                self._core.add_status("hub", self._status),
            ]
            if self._alerts is not None:
                # Alerts that fired before this unit started are passed on as well; with no
                # await in between, none can fire unseen.
                self._unsubscribe.append(self._alerts.add_listener(self._on_alert))
                for event in self._alerts.active():
                    self._on_alert(event)
            self._tasks = [
                asyncio.create_task(self._write(), name="appliance-hub-writer"),
                asyncio.create_task(self._upload(), name="appliance-hub-uploader"),
            ]
        except BaseException:
            await self._close()
            raise
        log.info(
            "hub sync to %s (outbox %s, stream %s, %d record(s) queued)",
            self._hub.url,
            self.outbox.path,
            self.outbox.stream,
            self.outbox.records,
        )
        return self

    def _tls(self) -> ssl.SSLContext | bool:
        """Verify an https hub against ``hub.tls_ca_file`` (or the system CAs); present
        ``hub.tls_cert_file`` to a hub that asks for client certificates."""
        hub = self._hub
        if hub.tls_ca_file is None and hub.tls_cert_file is None:
            return True
        try:
            context = ssl.create_default_context(
                cafile=str(hub.tls_ca_file) if hub.tls_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"hub.tls_ca_file = {str(hub.tls_ca_file)!r}: {exc}") from None
        if hub.tls_cert_file is not None:
            try:
                context.load_cert_chain(
                    str(hub.tls_cert_file), str(hub.tls_key_file) if hub.tls_key_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"hub.tls_cert_file = {str(hub.tls_cert_file)!r}: cannot "
                    f"load the certificate and key: {exc}"
                ) from None
        return context

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        writer, uploader = self._tasks or (None, None)
        if writer is not None:
            # Whatever was produced is appended (durable) before the uploader stops.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.put(("", {})), _FLUSH_ON_STOP)
                await asyncio.wait_for(asyncio.shield(writer), _FLUSH_ON_STOP)
        if uploader is not None and self.failures == 0 and self.outbox.records:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained(), _FLUSH_ON_STOP)
        await self._close()

    async def _drained(self) -> None:
        await self._idle.wait()

    async def _close(self) -> None:
        if self.updater is not None:
            await self.updater.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.outbox.close()

    def _status(self) -> dict[str, Any]:
        return {
            "url": self._hub.url,
            "stream": self.outbox.stream,
            "queued": self.outbox.records,
            "queued_bytes": self.outbox.bytes,
            "dropped": dict(self.outbox.dropped),
            "last_seq": self.outbox.last_seq,
            "last_upload": self.last_upload,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    # -- producing --------------------------------------------------------------------

    def _put(self, kind: str, body: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((kind, body))
        except asyncio.QueueFull:
            self._core.unit_metrics(OutboxMetrics).outbox_dropped.labels("backlog").inc()
            log.error("outbox backlog full; dropped a %s record", kind)

    def _on_snapshot(self, snap: HealthSnapshot) -> None:
        last = self._last_heartbeat
        # A little slack so a heartbeat interval equal to the health interval is not skipped
        # by timer jitter.
        if last is not None and snap.monotonic - last < self._hub.heartbeat_interval * 0.95:
            return
        self._last_heartbeat = snap.monotonic
        body = snap.to_dict()
        body["alerts_firing"] = len(self._alerts.active()) if self._alerts else 0
        self._put(HEARTBEAT, body)

    def _on_alert(self, event: AlertEvent) -> None:
        self._put("alert", event.to_dict())

    def _on_models(self) -> None:
        states = {m.name: m.state.value for m in self._core.list_models(pipelines=False)}
        if states != self._last_models:
            self._last_models = states
            self._put("event", {"type": "models", "models": states})

    async def _write(self) -> None:
        while True:
            kind, body = await self._queue.get()
            if not kind:  # the stop marker: everything before it is appended
                return
            try:
                await self.outbox.append(kind, body)
            except (OutboxError, OSError, ValueError) as exc:
                log.error("outbox: cannot store a %s record: %s", kind, exc)

    # -- uploading --------------------------------------------------------------------

    async def _upload(self) -> None:
        while True:
            self.outbox.appended.clear()
            batch = await self.outbox.peek(self._hub.batch_size)
            if not batch:
                self._idle.set()
                await self.outbox.appended.wait()
                continue
            self._idle.clear()
            try:
                await self._send(batch)
            except (aiohttp.ClientError, asyncio.TimeoutError, HubRejected, ValueError) as exc:
                self.failures += 1
                self.last_error = str(exc) or type(exc).__name__
                result = f"http_{exc.status}" if isinstance(exc, HubRejected) else "error"
                self._core.unit_metrics(HubMetrics).hub_uploads.labels(result).inc()
                delay = self._backoff(unauthorised=getattr(exc, "status", 0) in (401, 403))
                log.warning(
                    "hub upload of %d record(s) failed (%s); retrying in %.1fs",
                    len(batch),
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            await self.outbox.ack(batch[-1].seq)
            if self.failures:
                log.info("hub reachable again after %d failed attempt(s)", self.failures)
            self.failures = 0
            self.last_error = None
            self.last_upload = time.time()
            hub = self._core.unit_metrics(HubMetrics)
            hub.hub_uploads.labels("ok").inc()
            hub.hub_last_upload.set(self.last_upload)

    def _backoff(self, *, unauthorised: bool = False) -> float:
        """Capped exponential backoff with jitter (half to the whole of the step)."""
        hub = self._hub
        step = (
            hub.backoff_max
            if unauthorised
            else min(hub.backoff_max, hub.backoff_initial * 2 ** min(self.failures - 1, 30))
        )
        return random.uniform(step / 2, step)

    async def _send(self, batch: list[Record]) -> None:
        assert self._session is not None
        payload = {
            "device": self._config.device.id,
            "name": self._config.device.name,
            "version": __version__,
            "stream": self.outbox.stream,
            "dropped": dict(self.outbox.dropped),
            "records": [r.to_wire() for r in batch],
        }
        url = self._hub.url.rstrip("/") + INGEST_PATH
        async with self._session.post(url, json=payload) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise HubRejected(resp.status, text)
            answer = await resp.json(content_type=None)
        acked = answer.get("acked") if isinstance(answer, dict) else None
        if not isinstance(acked, int) or acked < batch[-1].seq:
            raise ValueError(f"the hub acknowledged {acked!r}, not up to {batch[-1].seq}")
        if self.updater is not None:
            self.updater.offer(answer.get("wanted"))
