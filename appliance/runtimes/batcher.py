"""Dynamic batching for tensor models whose first (batch) dimension is dynamic.

Requests arriving within ``delay`` seconds of each other are stacked along the batch axis
into one model run of at most ``max_batch`` rows, and the outputs are split back per
request. The delay is only spent while the model is shared (its last run held more than one
request), so a lone client never waits for company that is not coming. Only requests that
can be stacked share a run: the same input dtypes, the same non-batch dimensions and the
same requested outputs. One run is in flight at a time; the next batch forms while it runs,
so under load batches fill up even without any delay.

The batcher owns one named task on the event loop; the runs themselves go to the model's
worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.core.types import Array
from appliance.runtimes.base import RuntimeStats

log = logging.getLogger(__name__)

Run = Callable[[dict[str, Array], list[str]], Awaitable[dict[str, Array]]]


@dataclass(eq=False)
class _Request:
    inputs: dict[str, Array]
    outputs: list[str]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[dict[str, Array]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    """Stacks concurrent :meth:`infer` calls of one model into shared runs."""

    def __init__(
        self, name: str, run: Run, *, max_batch: int, delay: float, stats: RuntimeStats
    ) -> None:
        self.name = name
        self._run = run
        self._max_batch = max_batch
        self._delay = delay
        self._stats = stats
        self._waiting: list[_Request] = []
        self._arrived = asyncio.Event()
        # While a batch gathers: resolved once it is full (or by the delay's timer).
        self._full: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_size = 1

    async def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        """Run ``inputs`` as part of a batch; returns this request's outputs only."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=f"appliance-batcher-{self.name}")
        rows = _rows(inputs)
        if rows < 0:  # inputs disagree on the batch size: the model will say what is wrong
            return await self._run(dict(inputs), list(outputs))
        request = _Request(dict(inputs), list(outputs), rows, _key(inputs, outputs))
        self._waiting.append(request)
        self._arrived.set()
        full = self._full
        if (
            full is not None
            and not full.done()
            and _fill(self._waiting, self._waiting[0]) >= self._max_batch
        ):
            full.set_result(None)
        try:
            # Not shielded: a batch skips the futures of callers that left (done()).
            return await request.future
        except asyncio.CancelledError:
            # The caller left: it is dropped if its batch has not started yet.
            if request in self._waiting:
                self._waiting.remove(request)
                if not self._waiting and self._full is not None:
                    _resolve(self._full)  # nobody left to gather for
            raise

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for request in self._waiting:
            if not request.future.done():
                request.future.set_exception(RuntimeError(f"model {self.name!r} was unloaded"))
        self._waiting.clear()

    async def _loop(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            # Wait for company only under concurrency (the last run was shared): a lone
            # client never pays the delay, a busy model fills its batches.
            if (
                self._delay > 0
                and self._last_size > 1
                and _fill(self._waiting, self._waiting[0]) < self._max_batch
            ):
                await self._gather_more()
                if not self._waiting:  # every caller left meanwhile
                    continue
            batch = self._take()
            try:
                await self._run_batch(batch)
            except asyncio.CancelledError:
                for request in batch:
                    if not request.future.done():
                        request.future.cancel()
                raise

    async def _gather_more(self) -> None:
        """Wait up to ``delay`` for the batch of the oldest request to fill up.

        :meth:`infer` resolves ``_full`` when an arrival fills the batch, a timer when the
        delay is over: one future and one timer per batch, nothing per arrival.
        """
        loop = asyncio.get_running_loop()
        self._full = full = loop.create_future()
        timer = loop.call_later(self._delay, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None

    def _take(self) -> list[_Request]:
        """The oldest request and the compatible ones behind it, up to ``max_batch`` rows."""
        first = self._waiting[0]
        batch: list[_Request] = []
        rows = 0
        for request in list(self._waiting):
            if request.key != first.key:
                continue
            if batch and rows + request.rows > self._max_batch:
                break
            batch.append(request)
            rows += request.rows
            self._waiting.remove(request)
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        self._stats.observe_batch(len(batch))
        self._last_size = len(batch)
        first = batch[0]
        if len(batch) == 1:
            feed = first.inputs
        else:
            feed = {
                name: np.concatenate([r.inputs[name] for r in batch], axis=0)
                for name in first.inputs
            }
        try:
            results = await self._run(feed, first.outputs)
        except Exception as exc:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        total = sum(r.rows for r in batch)
        if len(batch) > 1 and any(v.shape[:1] != (total,) for v in results.values()):
            # An output that is not per row cannot be split: run the requests one by one.
            log.warning(
                "model %s: outputs do not follow the batch dimension; batching off", self.name
            )
            self._max_batch = 1
            for request in batch:
                await self._run_batch([request])
            return
        start = 0
        for request in batch:
            end = start + request.rows
            part = (
                results
                if len(batch) == 1
                else {name: value[start:end] for name, value in results.items()}
            )
            start = end
            if not request.future.done():
                request.future.set_result(part)


def _rows(inputs: Mapping[str, Array]) -> int:
    """The batch size all inputs share, or -1 when they do not share one."""
    sizes = {value.shape[0] if value.ndim else -1 for value in inputs.values()}
    return int(sizes.pop()) if len(sizes) == 1 else -1


def _key(inputs: Mapping[str, Array], outputs: Sequence[str]) -> tuple[Any, ...]:
    """Requests with equal keys can be stacked along axis 0."""
    return (
        tuple(outputs),
        tuple((name, value.dtype.str, value.shape[1:]) for name, value in sorted(inputs.items())),
    )


def _fill(waiting: list[_Request], first: _Request) -> int:
    return sum(r.rows for r in waiting if r.key == first.key)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
