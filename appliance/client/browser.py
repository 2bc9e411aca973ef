"""Browsers that find appliances over mDNS/DNS-SD and keep the set current.

:class:`AsyncApplianceBrowser` runs on the caller's event loop; :class:`ApplianceBrowser`
is the blocking version for scripts and threads, running the same browser on a loop of its
own. Both resolve each ``_appliance._tcp`` service as it appears, re-read its TXT record
when the appliance updates it (readiness, models), drop it when it says goodbye or its
records expire, and hand out appliances through their :class:`AppliancePool`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TypeVar

from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from appliance.client.errors import DiscoveryTimeout, InterfaceNotFound
from appliance.client.pool import AppliancePool, Predicate
from appliance.protocol.dnssd import (
    SERVICE_TYPE,
    Appliance,
    appliance_from_info,
    resolve_interfaces,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

RESOLVE_ATTEMPTS = 3


class _PoolFront:
    """What both browsers offer on top of their pool."""

    pool: AppliancePool

    def appliances(self) -> list[Appliance]:
        """Every appliance seen, ready or not."""
        return self.pool.appliances()

    def get(self, device_id: str) -> Appliance | None:
        return self.pool.get(device_id)

    def pick(self, model: str | None = None) -> Appliance:
        """A ready appliance serving ``model`` (least busy, then round-robin)."""
        return self.pool.pick(model)

    def lease(self, model: str | None = None) -> AbstractContextManager[Appliance]:
        """``with browser.lease(model) as appliance:`` — counts the request as outstanding."""
        return self.pool.lease(model)

    def base_url(self, model: str | None = None) -> str:
        """OpenAI-compatible base URL of the next ready appliance serving ``model``."""
        return self.pool.base_url(model)


def _ready_count(model: str | None, count: int) -> Predicate:
    def predicate(appliances: list[Appliance]) -> bool:
        ready = [a for a in appliances if a.ready and (model is None or a.serves(model))]
        return len(ready) >= count

    return predicate


class AsyncApplianceBrowser(_PoolFront):
    """Find appliances on the LAN from asyncio code::

        async with AsyncApplianceBrowser() as fleet:
            await fleet.wait_for("qwen2.5-0.5b")
            client = AsyncOpenAI(base_url=fleet.base_url("qwen2.5-0.5b"), api_key="-")

    ``interfaces`` are names or IPv4 addresses (default: every non-loopback interface).
    When an appliance's TXT record had to trim its model list, the full list is fetched from
    its ``/v1/models`` (with ``api_key`` if it needs one).
    """

    def __init__(
        self,
        *,
        interfaces: Sequence[str] = (),
        resolve_timeout: float = 3.0,
        api_key: str | None = None,
        zeroconf: AsyncZeroconf | None = None,
    ) -> None:
        self.pool = AppliancePool()
        self._interfaces = list(interfaces)
        self._resolve_ms = max(1, int(resolve_timeout * 1000))
        self._api_key = api_key
        self._zc = zeroconf
        self._own_zc = zeroconf is None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._change = asyncio.Event()
        self.pool.add_listener(self._notify)

    async def __aenter__(self) -> AsyncApplianceBrowser:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the mDNS sockets and start browsing. Raises :class:`InterfaceNotFound`."""
        if self._zc is None:
            found = await asyncio.to_thread(resolve_interfaces, self._interfaces)
            if found.missing:
                raise InterfaceNotFound(
                    f"no IPv4 address on interface(s) {', '.join(found.missing)}"
                )
            if not found.addresses:
                raise InterfaceNotFound(
                    "no non-loopback interface with an IPv4 address to "
                    "browse on; name one (e.g. lo) explicitly"
                )
            self._zc = AsyncZeroconf(interfaces=list(found.addresses), ip_version=IPVersion.V4Only)
        # Multicast (QM) questions only: a unicast answer to a QU question goes to port 5353
        # of this host, which avahi or another appliance may share, and only one socket on
        # the port gets it. Multicast answers reach every listener (and refresh their caches).
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf,
            SERVICE_TYPE,
            handlers=[self._on_state_change],
            question_type=DNSQuestionType.QM,
        )

    async def aclose(self) -> None:
        """Stop browsing and close the sockets (if this browser opened them)."""
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        tasks = list(self._resolving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolving.clear()
        zc, self._zc = self._zc, None
        if zc is not None and self._own_zc:
            await zc.async_close()

    # -- waiting --------------------------------------------------------------------------

    async def wait_until(self, predicate: Predicate, timeout: float) -> list[Appliance]:
        """Wait until ``predicate(appliances)`` holds; :class:`DiscoveryTimeout` otherwise."""

        async def until() -> list[Appliance]:
            while True:
                changed = self._change
                appliances = self.pool.appliances()
                if predicate(appliances):
                    return appliances
                await changed.wait()

        try:
            return await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise DiscoveryTimeout(f"the appliances seen did not match within {timeout}s") from None

    async def wait_for(
        self, model: str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[Appliance]:
        """Wait until ``count`` ready appliances (serving ``model``) are known; return them."""
        try:
            await self.wait_until(_ready_count(model, count), timeout)
        except DiscoveryTimeout:
            what = f" serving {model!r}" if model else ""
            raise DiscoveryTimeout(
                f"{count} ready appliance(s){what} did not appear within {timeout}s "
                f"(seen: {', '.join(a.name for a in self.appliances()) or 'none'})"
            ) from None
        return self.pool.candidates(model)

    async def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for services still being resolved."""
        pending = list(self._resolving.values())
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def _notify(self) -> None:
        changed, self._change = self._change, asyncio.Event()
        changed.set()

    # -- resolving ------------------------------------------------------------------------

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            if self.pool.remove(name) is not None:
                log.info("appliance %s left", name)
            return
        self._resolving[name] = asyncio.create_task(
            self._resolve(name), name=f"appliance-resolve-{name}"
        )

    async def _resolve(self, name: str) -> None:
        try:
            assert self._zc is not None
            for _ in range(RESOLVE_ATTEMPTS):
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if await info.async_request(
                    self._zc.zeroconf, self._resolve_ms, question_type=DNSQuestionType.QM
                ):
                    break
            else:
                log.warning("appliance %s did not answer with its address and TXT record", name)
                return
            appliance = appliance_from_info(info)
            if appliance is None:
                log.debug("ignoring %s: not an appliance record", name)
                return
            if not appliance.models_complete:
                appliance = await self._complete_models(appliance)
            self.pool.upsert(appliance)
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]

    async def _complete_models(self, appliance: Appliance) -> Appliance:
        """The TXT record trimmed the model list: read the whole list over HTTP."""
        import aiohttp

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._resolve_ms / 1000)
                ) as session,
                session.get(appliance.openai_base_url + "/models", headers=headers) as resp,
            ):
                resp.raise_for_status()
                body: Any = await resp.json()
            ready = tuple(
                str(card["id"]) for card in body["data"] if card.get("state", "ready") == "ready"
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
            log.info("appliance %s: cannot read its full model list: %s", appliance.name, exc)
            return appliance
        return dataclasses.replace(appliance, models=ready, model_count=len(ready))


class ApplianceBrowser(_PoolFront):
    """The blocking browser, for scripts and threaded programs::

        with ApplianceBrowser() as fleet:
            fleet.wait_for("sensor-anomaly", timeout=10)
            client = OpenAI(base_url=fleet.base_url("qwen2.5-0.5b"), api_key="-")

    It runs an :class:`AsyncApplianceBrowser` on an event loop in its own thread; close it
    (or leave the ``with`` block) to stop that thread.
    """

    def __init__(
        self,
        *,
        interfaces: Sequence[str] = (),
        resolve_timeout: float = 3.0,
        api_key: str | None = None,
    ) -> None:
        self._options: dict[str, Any] = {
            "interfaces": list(interfaces),
            "resolve_timeout": resolve_timeout,
            "api_key": api_key,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inner: AsyncApplianceBrowser | None = None

    def __enter__(self) -> ApplianceBrowser:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="appliance-browser", daemon=True
        )
        self._thread.start()
        try:
            self._inner = self._call(self._astart)
        except BaseException:
            self.close()
            raise
        self.pool = self._inner.pool

    async def _astart(self) -> AsyncApplianceBrowser:
        browser = AsyncApplianceBrowser(**self._options)
        await browser.start()
        return browser

    def close(self) -> None:
        loop, thread, inner = self._loop, self._thread, self._inner
        self._loop = self._thread = self._inner = None
        if loop is None or thread is None:
            return
        try:
            if inner is not None:
                asyncio.run_coroutine_threadsafe(inner.aclose(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _call(self, factory: Callable[[], Awaitable[T]]) -> T:
        assert self._loop is not None

        async def call() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def wait_until(self, predicate: Predicate, timeout: float) -> list[Appliance]:
        """Block until ``predicate(appliances)`` holds; :class:`DiscoveryTimeout` otherwise."""
        return self.pool.wait_until(predicate, timeout)

    def wait_for(
        self, model: str | None = None, *, count: int = 1, timeout: float = 10.0
    ) -> list[Appliance]:
        """Block until ``count`` ready appliances (serving ``model``) are known."""
        self.pool.wait_until(_ready_count(model, count), timeout)
        return self.pool.candidates(model)


async def discover(*, timeout: float = 3.0, interfaces: Sequence[str] = ()) -> list[Appliance]:
    """Browse for ``timeout`` seconds and return the appliances found (a snapshot)."""
    async with AsyncApplianceBrowser(interfaces=interfaces) as browser:
        await asyncio.sleep(timeout)
        await browser.settle(timeout=min(timeout, 3.0))
        return browser.appliances()


__all__ = ["ApplianceBrowser", "AsyncApplianceBrowser", "discover"]
