"""The hub service: startup → serve until a signal → shutdown (like the daemon).

Units start in order and stop in reverse through an ``AsyncExitStack``: storage, the HTTP
runner, the offline monitor and retention. SIGTERM/SIGINT only set a flag; a second SIGINT
exits at once. SIGHUP re-reads the API keys and the TLS certificate (:meth:`HubServer.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import urllib.parse
from collections.abc import Callable

from aiohttp import web

from appliance import __version__
from appliance.errors import ConfigError
from appliance.hub.app import build_app
from appliance.hub.config import HubConfig, storage_url
from appliance.hub.metrics import HubMetrics
from appliance.hub.monitor import OfflineMonitor, Retention
from appliance.hub.rollout.service import RolloutEngine, open_rollouts
from appliance.hub.storage import from_url
from appliance.ops.signals import ServeSignals, SignalledServer
from appliance.ops.systemd import SystemdNotify
from appliance.security.access import AccessPolicy, hub_policy, reload_hub_keys
from appliance.security.tls import async_reload_certificate, server_context
from appliance.transports.http.security import runner_options

log = logging.getLogger(__name__)


class HubServer(SignalledServer):
    """One running hub.

    ``load_config`` reads the configuration again the way it was read at start; SIGHUP
    takes the API keys and client certificate names from it and re-reads the TLS
    certificate files, as the daemon does.
    """

    def __init__(
        self, config: HubConfig, *, load_config: Callable[[], HubConfig] | None = None
    ) -> None:
        self.config = config
        self._load_config = load_config
        self.metrics = HubMetrics()
        self.addresses: list[tuple[str, int]] = []
        self.access: AccessPolicy | None = None
        self.tls: ssl.SSLContext | None = None
        self._stack = contextlib.AsyncExitStack()
        self._signals = ServeSignals(self.reload, name="hub-reload")

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
        # Reads key files: off the loop.
        self.access = access = await asyncio.to_thread(hub_policy, config)
        rollouts = await asyncio.to_thread(open_rollouts, storage, config)
        runner = web.AppRunner(
            build_app(storage, config, self.metrics, access, rollouts),
            handler_cancellation=True,
            shutdown_timeout=config.http.shutdown_timeout,
            access_log=logging.getLogger("aiohttp.access"),
            **runner_options(config.limits),
        )
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        self.tls = tls = await asyncio.to_thread(_tls_context, config)
        site = web.TCPSite(
            runner, config.http.host, config.http.port, reuse_address=True, ssl_context=tls
        )
        await site.start()
        self.addresses = [(str(a[0]), int(a[1])) for a in runner.addresses]
        scheme = "https" if tls else "http"
        for host, port in self.addresses:
            shown = f"[{host}]" if ":" in host else host
            log.info(
                "appliance hub %s (%s storage) listening on %s://%s:%d",
                __version__,
                storage.kind,
                scheme,
                shown,
                port,
            )
        await self._stack.enter_async_context(OfflineMonitor(storage, config, self.metrics))
        await self._stack.enter_async_context(Retention(storage, config, self.metrics))
        await self._stack.enter_async_context(RolloutEngine(rollouts, config.rollout.interval))
        # Last in: READY=1 once storage and listeners are up; STOPPING=1 first on the way down.
        status = f"{storage.kind} storage; listening on {scheme}://{config.http.host}:{self.port}"
        await self._stack.enter_async_context(
            SystemdNotify(wait_ready=_nothing_to_wait_for, status=lambda: status)
        )

    async def shutdown(self) -> None:
        log.info("hub shutting down")
        await self._signals.close()
        await self._stack.aclose()
        log.info("hub stopped")

    async def reload(self) -> None:
        """What SIGHUP does: API keys and client certificate names from the re-read
        configuration, then the TLS certificate files. What does not load is logged and
        leaves what is in use untouched."""
        if self.access is not None:
            try:
                config = self.config
                if self._load_config is not None:
                    config = await asyncio.to_thread(self._load_config)
                await asyncio.to_thread(reload_hub_keys, self.access, config, self.config)
            except ConfigError as exc:
                log.error("API keys NOT reloaded, the previous keys stay in use: %s", exc)
        http = self.config.http
        await async_reload_certificate(
            self.tls, http.tls_cert_file, http.tls_key_file, http.tls_min_version
        )


async def _nothing_to_wait_for() -> None:
    return None


def _tls_context(config: HubConfig) -> ssl.SSLContext | None:
    http = config.http
    if http.tls_cert_file is None:
        return None
    return server_context(
        http.tls_cert_file,
        http.tls_key_file,
        http.tls_min_version,
        client_ca=http.tls_client_ca,
        client_auth=http.tls_client_auth,
    )


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def run(config: HubConfig, *, load_config: Callable[[], HubConfig] | None = None) -> int:
    """Serve until stopped; the exit status for the CLI. ``load_config``: see
    :class:`HubServer`."""
    try:
        asyncio.run(HubServer(config, load_config=load_config).serve())
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0
