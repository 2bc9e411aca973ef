"""A hub lifecycle unit that does one thing every few seconds until the hub stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

log = logging.getLogger(__name__)


class Periodic:
    """A named task running ``tick`` every ``interval`` seconds until exit."""

    name = "hub-periodic"

    def __init__(self, interval: float, first_delay: float = 0.0) -> None:
        self._interval = interval
        self._first_delay = first_delay
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Periodic:
        self._task = asyncio.create_task(self._run(), name=self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("%s failed; trying again in %.0f s", self.name, self._interval)
            await asyncio.sleep(self._interval)
