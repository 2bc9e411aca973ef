"""Bounded per-model queues: admit or refuse at once, then wait for a free slot.

A request is admitted only while fewer than ``parallel + queue_size`` requests hold the
model; otherwise :class:`~appliance.errors.Overloaded` is raised immediately, so an
overloaded box answers 503 in milliseconds instead of piling up work it cannot finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from appliance.errors import Overloaded


class Admission:
    """The queue of one model."""

    def __init__(
        self,
        name: str,
        *,
        parallel: int,
        queue_size: int,
        retry_after: float,
        on_change: Callable[[Admission], None] | None = None,
    ) -> None:
        self.name = name
        # Called after every change of the running/waiting counts (a model's idle event).
        self._on_change = on_change
        self.parallel = parallel
        self.queue_size = queue_size
        self.retry_after = retry_after
        self._slots = asyncio.Semaphore(parallel)
        self._admitted = 0
        self._running = 0

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet running (the queue depth)."""
        return self._admitted - self._running

    @property
    def admitted(self) -> int:
        """Requests admitted: running or waiting."""
        return self._admitted

    @property
    def running(self) -> int:
        return self._running

    def admit(self) -> Ticket:
        """Take a place in the queue or raise :class:`Overloaded`."""
        if self._admitted >= self.parallel + self.queue_size:
            raise Overloaded(self.name, self.retry_after)
        self._admitted += 1
        self._changed()
        return Ticket(self)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)


class Ticket:
    """A place in a model's queue. ``async with`` waits for a slot; leaving frees both.

    :meth:`release` is idempotent so a ticket that is never used can always be given back.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._running = False
        self._released = False

    async def __aenter__(self) -> Ticket:
        await self._admission._slots.acquire()
        self._running = True
        self._admission._running += 1
        self._admission._changed()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._running:
            self._admission._running -= 1
            self._admission._slots.release()
        self._admission._admitted -= 1
        self._admission._changed()
