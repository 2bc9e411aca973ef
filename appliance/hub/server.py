"""The hub service: startup → serve until a signal → shutdown (like the daemon).

Units start in order and stop in reverse through an ``AsyncExitStack``: storage, the HTTP
runner, the offline monitor and retention. SIGTERM/SIGINT only set a flag; a second SIGINT
exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import urllib.parse

from aiohttp import web

from appliance import __version__
from appliance.errors import ConfigError
from appliance.hub.app import build_app
from appliance.hub.config import HubConfig, storage_url
from appliance.hub.metrics import HubMetrics
from appliance.hub.monitor import OfflineMonitor, Retention
from appliance.hub.storage import from_url
from appliance.ops.systemd import SystemdNotify
from appliance.security.access import hub_policy
from appliance.security.tls import server_context
from appliance.transports.http.security import runner_options

log = logging.getLogger(__name__)


class HubServer:
    """One running hub."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.metrics = HubMetrics()
        self.addresses: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._force = False
        self._stack = contextlib.AsyncExitStack()

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.startup()
            await self._stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def startup(self) -> None:
        config = self.config
        url = storage_url(config)
        storage = from_url(url, pool_size=config.storage.pool_size)
        try:
            await storage.open()
        except ConfigError:
            raise
        except Exception as exc:  # refused, asyncpg or sqlite errors: name the storage
            raise OSError(f"cannot open storage {redact(url)}: {exc}") from exc
        self._stack.push_async_callback(storage.close)
        access = await asyncio.to_thread(hub_policy, config)  # reads key files: off the loop
        runner = web.AppRunner(
            build_app(storage, config, self.metrics, access),
            handler_cancellation=True,
            shutdown_timeout=config.http.shutdown_timeout,
            access_log=logging.getLogger("aiohttp.access"),
            **runner_options(config.limits),
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        tls = _tls_context(config)
        site = web.TCPSite(runner, config.http.host, config.http.port, reuse_address=True,
                           ssl_context=tls)
        await site.start()
        self.addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        scheme = "https" if tls else "http"
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            log.info("appliance hub %s (%s storage) listening on %s://%s:%d", __version__,
                     storage.kind, scheme, shown, port)
        await self._stack.enter_async_context(OfflineMonitor(storage, config, self.metrics))
        await self._stack.enter_async_context(Retention(storage, config, self.metrics))
        # Last in: READY=1 once storage and listeners are up; STOPPING=1 first on the way down.
        status = f"{storage.kind} storage; listening on {scheme}://{config.http.host}:{self.port}"
        await self._stack.enter_async_context(
            SystemdNotify(wait_ready=_nothing_to_wait_for, status=lambda: status))

    async def shutdown(self) -> None:
        log.info("hub shutting down")
        await self._stack.aclose()
        log.info("hub stopped")

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set() and sig == signal.SIGINT and not self._force:
            self._force = True
            log.warning("second interrupt: exiting now")
            raise SystemExit(130)
        log.info("received %s; stopping gracefully", signal.Signals(sig).name)
        self._stop.set()


async def _nothing_to_wait_for() -> None:
    return None


def _tls_context(config: HubConfig) -> ssl.SSLContext | None:
    http = config.http
    if http.tls_cert_file is None:
        return None
    return server_context(http.tls_cert_file, http.tls_key_file, http.tls_min_version)


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def run(config: HubConfig) -> int:
    """Serve until stopped; the exit status for the CLI."""
    try:
        asyncio.run(HubServer(config).serve())
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0
