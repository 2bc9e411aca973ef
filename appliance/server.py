"""The daemon: startup → serve until a signal → shutdown.

Each long-lived resource is a lifecycle unit started in order and stopped in reverse by an
``AsyncExitStack``. Signals only set flags: the first SIGTERM/SIGINT starts a graceful stop
(no new requests, in-flight ones finish up to ``http.shutdown_timeout``), a second SIGINT
forces the exit. SIGHUP runs the reload hooks (:meth:`Server.reload`): the API keys are
read again (the configuration file, ``keys_file``, the ``api-keys`` credential), then the
TLS certificate, then the configuration's alert rules and log level (with the hub's
drop-in, ``appliance.config.remote``), then the model repository; under systemd the
daemon reports RELOADING=1 / READY=1 around them (``appliance.ops.systemd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from appliance import __version__
from appliance.config import Config
from appliance.core.cache import ResultCache
from appliance.core.metrics import Metrics
from appliance.core.models import ModelManager
from appliance.core.repository import collect
from appliance.core.service import Core
from appliance.core.types import ModelState
from appliance.errors import ConfigError
from appliance.ops.instance import instance_suffix
from appliance.ops.signals import ServeSignals, SignalledServer
from appliance.security.access import AccessPolicy, daemon_policy, reload_daemon_keys
from appliance.security.crypto import load_cipher
from appliance.security.tls import async_reload_certificate, server_context
from appliance.transports.http import build_app
from appliance.transports.http.device_page import RECENT
from appliance.transports.http.security import runner_options

if TYPE_CHECKING:
    from appliance.ops.alerts import AlertEngine
    from appliance.ops.health import HealthCollector
    from appliance.ops.recent import Recent
    from appliance.ops.systemd import SystemdNotify

log = logging.getLogger(__name__)


class Server(SignalledServer):
    """One running appliance.

    ``load_config`` reads the configuration again the way it was read at start (file,
    environment, flags); SIGHUP takes the API keys from it. Without it, a reload re-reads
    the key files of ``config`` only. ``config_error``: why a configuration was rejected
    before this start (``config`` is what runs instead), shown in /health as
    ``units.config.error``.
    """

    def __init__(
        self,
        config: Config,
        *,
        load_config: Callable[[], Config] | None = None,
        config_error: str | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path  # appliance.toml, for the periodic backups
        self._load_config = load_config
        # A configuration rejected before the start (this one is the fallback): in /health.
        self.config_error = config_error
        self.metrics = Metrics()
        self.core: Core | None = None
        self.health: HealthCollector | None = None  # set once units start
        self.alerts: AlertEngine | None = None
        self.recent: Recent | None = None
        self.addresses: list[tuple[str, int]] = []
        self._stack = contextlib.AsyncExitStack()
        self.access: AccessPolicy | None = None  # API keys and network checks, at startup
        self.tls: ssl.SSLContext | None = None
        # SIGHUP: ``reload_hooks`` run in order (e.g. re-reading models); each observer is
        # told True before and False after (the systemd unit sends RELOADING=1 / READY=1).
        self.reload_hooks: list[Callable[[], Awaitable[None]]] = [self.reload_config]
        self.reload_observers: list[Callable[[bool], None]] = []
        self._signals = ServeSignals(self.reload, name="appliance-reload")
        self.systemd: SystemdNotify | None = None

    async def startup(self) -> None:
        config = self.config
        if config.hub.url and config.hub.public_key:  # before the repository is read
            from appliance.ops.hubsync import recover_updates

            await asyncio.to_thread(recover_updates, config, os.environ)
        specs = await asyncio.to_thread(collect, config.models.dir, config.models.files)
        models = ModelManager(specs, config.models, self.metrics)
        self._stack.push_async_callback(models.close)
        # The result cache (opt-in per model); closed once HTTP has stopped serving. Results
        # in Redis are sealed with the data key, when one is configured.
        cipher = None
        if config.cache.backend == "redis":
            cipher = await asyncio.to_thread(load_cipher, config.security.data_key_file, os.environ)
        cache = ResultCache(config.cache, cipher=cipher)
        self._stack.push_async_callback(cache.close)
        # The core, built whole: execution, canary routing, pipelines, repository re-reads.
        self.core = core = Core(
            models,
            self.metrics,
            cache=cache,
            canary=config.canary,
            pipelines=config.pipelines.chain,
            rescan=lambda: collect(config.models.dir, config.models.files),
        )
        self._stack.push_async_callback(core.close)
        core.add_status("lifecycle", core.lifecycle_status)
        self.reload_hooks.append(core.reload_models)
        if self.config_error:
            core.add_status("config", lambda: {"error": self.config_error})

        # Keys, allow-list, Host names (files read, perhaps a key generated): off the loop.
        self.access = await asyncio.to_thread(daemon_policy, config)
        self.reload_hooks.insert(0, self.reload_keys)  # first: revoking a key must not wait
        app = build_app(core, config, self.access)
        self.recent = app[RECENT]  # the device page's history: fed once health runs
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away stops its own work
            shutdown_timeout=config.http.shutdown_timeout,
            access_log=logging.getLogger("aiohttp.access"),
            **runner_options(config.limits),
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        self._stack.callback(core.begin_shutdown)  # runs first on the way down
        http = config.http
        self.tls = (
            None
            if http.tls_cert_file is None
            else await asyncio.to_thread(
                server_context,
                http.tls_cert_file,
                http.tls_key_file,
                http.tls_min_version,
                client_ca=http.tls_client_ca,
                client_auth=http.tls_client_auth,
            )
        )
        if self.tls is not None:  # SIGHUP re-reads the certificate (a renewal, no restart)
            self.reload_hooks.insert(1, self.reload_tls)
        site = web.TCPSite(runner, http.host, http.port, reuse_address=True, ssl_context=self.tls)
        await site.start()
        self.addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        for host, port in self.addresses:
            log.info(
                "appliance %s (device %s) listening on %s://%s:%d",
                __version__,
                config.device.id,
                self.scheme,
                _url_host(host),
                port,
            )
        # Models load after the socket is bound so /health can answer "loading" meanwhile.
        await models.start()
        # The state directory's suffix (MQTT client id) resolves a path: off the loop.
        instance = await asyncio.to_thread(instance_suffix, os.environ)
        for unit in self._units(core, instance):
            await self._stack.enter_async_context(unit)

    def _units(
        self, core: Core, instance: str
    ) -> list[contextlib.AbstractAsyncContextManager[Any]]:
        """Lifecycle units started after HTTP is bound, in this order; stopped in reverse.

        Each is an async context manager that starts its background work on enter and stops
        it (with a timeout) on exit. Optional units import their modules lazily.
        """
        from appliance.ops.memory import HeapTrim

        units: list[contextlib.AbstractAsyncContextManager[Any]] = []
        units += self._health_units(core)
        units.append(HeapTrim(core.wait_loaded))  # the start-up's freed heap, once loaded
        if self.config.mqtt.enabled:  # HTTP serves whether or not the broker is there
            from appliance.transports.mqtt import MqttTransport

            health = self.health
            units.append(
                MqttTransport(
                    core,
                    self.config,
                    http_url=self.http_url,
                    health=lambda: health.latest.to_dict() if health and health.latest else None,
                    instance=instance,
                )
            )
        if self.config.grpc.enabled:  # grpcio is an optional extra: import only when asked
            from appliance.transports.grpc.server import GrpcServer

            units.append(GrpcServer(core, self.config, self.access))
        if self.config.mdns.enabled:  # last in, first out: the goodbye goes out first
            from appliance.ops.discovery import Announcer

            units.append(
                Announcer(
                    self.config,
                    core,
                    self.addresses,
                    started=units,
                    api_key_required=bool(self.access and self.access.required),
                )
            )
        units.append(self._systemd_unit(core))  # last: READY=1 once all else runs; STOPPING=1 first
        return units

    def _systemd_unit(self, core: Core) -> contextlib.AbstractAsyncContextManager[Any]:
        """sd_notify: READY=1 after the listeners are bound and every model loaded or failed."""
        from appliance.ops.systemd import SystemdNotify

        self.systemd = unit = SystemdNotify(
            wait_ready=core.wait_loaded, status=lambda: self.status_line(core)
        )
        core.add_model_listener(unit.refresh_status)
        self.reload_observers.append(unit.reloading)
        return unit

    def status_line(self, core: Core) -> str:
        """One line for ``systemctl status``: models ready, failed, and where it listens."""
        handles = core.list_models(pipelines=False)
        ready = sum(1 for h in handles if h.state is ModelState.READY)
        failed = sum(1 for h in handles if h.state is ModelState.FAILED)
        line = f"serving {ready}/{len(handles)} models on {self.http_url}"
        if failed:
            line += f"; {failed} failed"
        if self.config.mqtt.enabled:
            line += f"; mqtt {self.config.mqtt.host}:{self.config.mqtt.port}"
        return line

    async def reload_keys(self) -> None:
        """Read the API keys and client certificate names again and swap them in (SIGHUP).

        A configuration or key file that does not parse leaves the keys in use untouched
        and logs what is wrong; other settings take effect at the next start.
        """
        access = self.access
        if access is None:
            return
        try:
            config = self.config
            if self._load_config is not None:
                config = await asyncio.to_thread(self._load_config)
            await asyncio.to_thread(reload_daemon_keys, access, config, self.config)
        except ConfigError as exc:
            log.error("API keys NOT reloaded, the previous keys stay in use: %s", exc)

    async def reload_tls(self) -> None:
        """Read http.tls_cert_file and its key again; new connections get the new
        certificate (SIGHUP). Files that do not load leave the certificate in use."""
        http = self.config.http
        await async_reload_certificate(
            self.tls, http.tls_cert_file, http.tls_key_file, http.tls_min_version
        )

    async def reload_config(self) -> None:
        """Read the configuration again (the hub's drop-in too) and apply what changes while
        running: alert rules and the log level; the rest takes effect at the next start. A
        configuration that does not load changes nothing (ConfigError: the step fails)."""
        if self._load_config is None:
            return
        new = await asyncio.to_thread(self._load_config)
        from appliance.config.remote import LIVE
        from appliance.ops import logs

        if new.logging.level != self.config.logging.level:
            logs.set_level(new.logging.level)
            log.info("log level now %s", new.logging.level)
        if self.alerts is not None and new.alerts != self.config.alerts:
            self.alerts.reconfigure(new.alerts)
            log.info("alert rules reloaded")
        self.config = self.config.model_copy(update={s: getattr(new, s) for s in LIVE})

    async def reload(self) -> list[str]:
        """Run the reload hooks (what SIGHUP does); observers hear the start and the end.
        Returns the problems of the steps that failed (none: an empty list)."""
        problems: list[str] = []
        for observer in self.reload_observers:
            observer(True)
        try:
            for hook in self.reload_hooks:
                try:
                    await hook()
                except ConfigError as exc:
                    log.error("reload: %s", exc)
                    problems.append(str(exc))
                except Exception as exc:
                    log.exception("reload step failed")
                    problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            for observer in self.reload_observers:
                observer(False)
        return problems

    def _health_units(self, core: Core) -> list[contextlib.AbstractAsyncContextManager[Any]]:
        """Health snapshots, alert rules on them, and (with ``hub.url``) the hub uploader."""
        from appliance.ops.alerts import AlertEngine
        from appliance.ops.health import HealthCollector

        self.health = HealthCollector(core, self.config.health)
        self.alerts = AlertEngine(self.health, self.config.alerts, self.metrics)
        units: list[contextlib.AbstractAsyncContextManager[Any]] = [self.health, self.alerts]
        core.add_canary_listener(self.alerts.canary_decision)  # rollbacks raise an alert
        if self.recent is not None:
            self.recent.attach(self.health, self.alerts)
        if self.config.hub.url:
            from appliance.ops.hubsync import HubSync

            units.append(
                HubSync(
                    self.config,
                    self.health,
                    self.alerts,
                    reload=self.reload if self._load_config is not None else None,
                    current=lambda: self.config,
                )
            )
            if self.config.hub.backup_interval > 0:
                from appliance.ops.backup_upload import PeriodicBackup

                units.append(PeriodicBackup(self.config, core, self.config_path, os.environ))
        return units

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def http_url(self) -> str:
        """The URL LAN clients use to reach this daemon's HTTP side."""
        host, port = self.addresses[0]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{self.scheme}://{_url_host(host)}:{port}"

    async def shutdown(self) -> None:
        log.info("shutting down")
        await self._signals.close()
        await self._stack.aclose()
        log.info("stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(
    config: Config,
    *,
    load_config: Callable[[], Config] | None = None,
    config_error: str | None = None,
    config_path: Path | None = None,
) -> int:
    """Serve until stopped; the exit status for the CLI. ``load_config``, ``config_error``,
    ``config_path``: see :class:`Server`."""
    server = Server(
        config, load_config=load_config, config_error=config_error, config_path=config_path
    )
    try:
        asyncio.run(server.serve())
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    except ConfigError as exc:  # found while starting units (e.g. an unreadable token file)
        log.error("%s", exc)
        return 2
    return 0


__all__: Sequence[str] = ["Server", "run"]
