"""What the daemon's and the hub's signals do, in one place.

SIGTERM and SIGINT only set a stop flag (a second SIGINT exits at once); SIGHUP runs a
reload on a task of its own. A SIGHUP that comes while a reload runs is not dropped (it may
revoke a key the running reload has not seen yet): any number of them make one more reload
once the running one ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class ServeSignals:
    """The stop flag and the SIGHUP reloads of one serving process."""

    def __init__(self, reload: Callable[[], Awaitable[object]], *, name: str) -> None:
        self.stop = asyncio.Event()
        self._reload = reload
        self._name = name
        self._force = False
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False

    def install(self) -> None:
        """Take SIGTERM, SIGINT and SIGHUP on the running loop (where the platform allows)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    async def close(self) -> None:
        """Cancel a reload still running (on the way down)."""
        if self._reload_task is not None:
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)

    def _on_hangup(self) -> None:
        if self.stop.is_set():
            return
        if self._reload_task is not None and not self._reload_task.done():
            log.info("received SIGHUP while reloading; reloading again once this one ends")
            self._reload_again = True
            return
        log.info("received SIGHUP; reloading")
        self._reload_task = asyncio.create_task(self._reload_until_current(), name=self._name)

    async def _reload_until_current(self) -> None:
        while True:
            self._reload_again = False
            await self._reload()
            if not self._reload_again or self.stop.is_set():
                return

    def _on_signal(self, sig: int) -> None:
        if self.stop.is_set() and sig == signal.SIGINT and not self._force:
            self._force = True
            log.warning("second interrupt: exiting now")
            raise SystemExit(130)
        log.info("received %s; stopping gracefully", signal.Signals(sig).name)
        self.stop.set()


class SignalledServer:
    """What the daemon and the hub share: serve until a stop signal, then shut down.

    Subclasses set ``addresses`` once bound, ``_signals`` in their constructor, and implement
    :meth:`startup` and :meth:`shutdown`.
    """

    addresses: list[tuple[str, int]]
    _signals: ServeSignals

    @property
    def port(self) -> int:
        """The bound HTTP port (useful with port 0)."""
        return self.addresses[0][1]

    async def serve(self) -> None:
        """Run until :meth:`request_stop` or a signal."""
        self._signals.install()
        try:
            await self.startup()
            await self._signals.stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._signals.stop.set()

    async def startup(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError
