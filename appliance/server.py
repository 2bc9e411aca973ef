"""The daemon: startup → serve until a signal → shutdown.

Each long-lived resource is a lifecycle unit started in order and stopped in reverse by an
``AsyncExitStack``. Signals only set flags: the first SIGTERM/SIGINT starts a graceful stop
(no new requests, in-flight ones finish up to ``http.shutdown_timeout``), a second SIGINT
forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from appliance import __version__
from appliance.config import Config
from appliance.core.metrics import Metrics
from appliance.core.models import ModelManager
from appliance.core.repository import collect
from appliance.core.service import Core
from appliance.errors import ConfigError
from appliance.transports.http import build_app

if TYPE_CHECKING:
    from appliance.ops.alerts import AlertEngine
    from appliance.ops.health import HealthCollector

log = logging.getLogger(__name__)


class Server:
    """One running appliance."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.core: Core | None = None
        self.health: HealthCollector | None = None  # set once units start
        self.alerts: AlertEngine | None = None
        self.addresses: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._force = False
        self._stack = contextlib.AsyncExitStack()

    @property
    def port(self) -> int:
        """The bound HTTP port (useful with port 0)."""
        return self.addresses[0][1]

    async def serve(self) -> None:
        """Run until :meth:`request_stop` or a signal."""
        self._install_signal_handlers()
        try:
            await self.startup()
            await self._stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def startup(self) -> None:
        config = self.config
        specs = await asyncio.to_thread(collect, config.models.dir, config.models.files)
        models = ModelManager(specs, config.models, self.metrics)
        self._stack.push_async_callback(models.close)
        self.core = core = Core(models, self.metrics)

        app = build_app(core, config)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away stops its own work
            shutdown_timeout=config.http.shutdown_timeout,
            access_log=logging.getLogger("aiohttp.access"),
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        self._stack.callback(core.begin_shutdown)  # runs first on the way down
        site = web.TCPSite(runner, config.http.host, config.http.port, reuse_address=True)
        await site.start()
        self.addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        for host, port in self.addresses:
            log.info("appliance %s (device %s) listening on http://%s:%d", __version__,
                     config.device.id, _url_host(host), port)
        # Models load after the socket is bound so /health can answer "loading" meanwhile.
        await models.start()
        for unit in self._units():
            await self._stack.enter_async_context(unit)

    def _units(self) -> list[contextlib.AbstractAsyncContextManager[Any]]:
        """Lifecycle units started after HTTP is bound, in this order; stopped in reverse.

        Each is an async context manager that starts its background work on enter and stops
        it (with a timeout) on exit. Optional units import their modules lazily.
        """
        units: list[contextlib.AbstractAsyncContextManager[Any]] = []
        units += self._health_units()
        if self.config.mqtt.enabled:  # HTTP serves whether or not the broker is there
            from appliance.transports.mqtt import MqttTransport

            assert self.core is not None
            health = self.health
            units.append(MqttTransport(
                self.core, self.config, http_url=self.http_url,
                health=lambda: health.latest.to_dict() if health and health.latest else None,
            ))
        if self.config.grpc.enabled:  # grpcio is an optional extra: import only when asked
            from appliance.transports.grpc.server import GrpcServer

            assert self.core is not None
            units.append(GrpcServer(self.core, self.config))
        if self.config.mdns.enabled:  # last in, first out: the goodbye goes out first
            from appliance.ops.discovery import Announcer

            assert self.core is not None
            units.append(Announcer(self.config, self.core, self.addresses, started=units))
        return units

    def _health_units(self) -> list[contextlib.AbstractAsyncContextManager[Any]]:
        """Health snapshots, alert rules on them, and (with ``hub.url``) the hub uploader."""
        from appliance.ops.alerts import AlertEngine
        from appliance.ops.health import HealthCollector

        assert self.core is not None
        self.health = HealthCollector(self.core, self.config.health)
        self.alerts = AlertEngine(self.health, self.config.alerts, self.metrics)
        units: list[contextlib.AbstractAsyncContextManager[Any]] = [self.health, self.alerts]
        if self.config.hub.url:
            from appliance.ops.hubsync import HubSync

            units.append(HubSync(self.config, self.health, self.alerts))
        return units

    @property
    def http_url(self) -> str:
        """The URL LAN clients use to reach this daemon's HTTP side."""
        host, port = self.addresses[0]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        return f"http://{_url_host(host)}:{port}"

    async def shutdown(self) -> None:
        log.info("shutting down")
        await self._stack.aclose()
        log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set() and sig == signal.SIGINT and not self._force:
            self._force = True
            log.warning("second interrupt: exiting now")
            raise SystemExit(130)
        log.info("received %s; stopping gracefully", signal.Signals(sig).name)
        self._stop.set()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(config: Config) -> int:
    """Serve until stopped; the exit status for the CLI."""
    server = Server(config)
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
