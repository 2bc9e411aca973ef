"""Lifecycle units that are one background task: started on enter, cancelled on exit.

The daemon's and the hub's units that watch or repeat something (the heap trim after
start-up, periodic backups, the hub's offline monitor, retention and rollout engine) share
these, so each says only what it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import TypeVar

log = logging.getLogger(__name__)

_Unit = TypeVar("_Unit", bound="BackgroundUnit")


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has ended (nothing when None)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class BackgroundUnit:
    """Runs :meth:`run` as one task named :attr:`name` from enter to exit."""

    name = "appliance-unit"
    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _Unit) -> _Unit:
        self._task = asyncio.create_task(self.run(), name=self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        await stop_task(task)


class Periodic(BackgroundUnit):
    """Calls :meth:`tick` every ``interval`` seconds (after ``first_delay``) until exit; a
    tick that fails is logged and the next one comes on time."""

    def __init__(self, interval: float, first_delay: float = 0.0) -> None:
        self._interval = interval
        self._first_delay = first_delay

    async def tick(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        await asyncio.sleep(self._first_delay)
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("%s failed; trying again in %.0f s", self.name, self._interval)
            await asyncio.sleep(self._interval)


__all__ = ["BackgroundUnit", "Periodic", "stop_task"]
