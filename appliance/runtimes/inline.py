"""When a model run is cheaper on the event loop than the hop to a worker thread.

Handing a run to a worker thread and its result back costs the loop about 0.1 ms of CPU
and the request two thread switches. A model that answers in less (the default
``sensor-anomaly`` takes about 0.06 ms) spends most of its request in that hop, so such
runs go inline. The loop must never block much longer than the hop would have cost it,
so a run is taken inline only when all of this holds:

- its inputs are no larger (in bytes) than those of a run already *measured* under
  ``limit`` seconds: a model's first runs, and any larger input, go to the worker thread,
  which measures them;
- no run of the model is in flight on its worker threads (nothing else waits for it, and
  an inline run never competes with a threaded one for the session), unless the policy
  is ``alone``: a session whose runs compute each on the thread that calls it (one
  thread, on the CPU) shares nothing between concurrent runs, and waiting for the
  threaded ones to drain would keep every run of a busy model on the thread hop, since
  under steady concurrency one is nearly always in flight;
- no run since the last fast one was over the limit: one slow run (inline or threaded: a
  busier box, a bigger input, a slower path in the model) sends every run back to the
  thread until a threaded run measures fast again.

So the loop blocks for at most about ``limit`` per request, and for more only once, by
the one inline run that finds the model slower than measured.
"""

from __future__ import annotations


class InlinePolicy:
    """Decides, per run, between the loop and the worker thread, from measured runs."""

    def __init__(self, limit: float, *, alone: bool = False) -> None:
        self.limit = limit  # seconds; 0: never inline
        self.alone = alone  # concurrent runs share nothing (see the module docstring)
        # The largest input (bytes) of a fast run since the last slow one; -1: none.
        self._fits = -1
        self._threaded = 0  # runs in flight on the worker threads

    def inline(self, size: int) -> bool:
        """Whether a run over ``size`` bytes of inputs goes inline now."""
        return (self.alone or self._threaded == 0) and 0 <= size <= self._fits

    def threaded(self) -> None:
        """A run starts on a worker thread."""
        self._threaded += 1

    def observe(self, size: int, seconds: float | None, *, threaded: bool) -> None:
        """A run over ``size`` bytes took ``seconds`` (None: it never ran, or was given up
        on before it finished, which measures nothing; a negative size: inputs whose size
        says nothing of the run's time, never inline)."""
        if threaded:
            self._threaded -= 1
        if seconds is None or size < 0:
            return
        if seconds < self.limit:
            self._fits = max(self._fits, size)
        else:
            self._fits = -1


__all__ = ["InlinePolicy"]
