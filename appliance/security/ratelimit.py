"""Token-bucket rate limits, per client address and per API key.

Each bucket holds up to ``burst`` tokens and refills at ``rate`` tokens a second; a request
takes one token or is refused with the seconds until the next one (``Retry-After``). Buckets
live in a bounded LRU map, so a flood of addresses cannot grow memory: a forgotten bucket is
a full one, which errs on the side of the client.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Buckets keyed by any string; ``rate`` 0 means no limit."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_buckets: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if granted, else the seconds to wait."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def retry_after(seconds: float) -> str:
    """``Retry-After`` in whole seconds, never 0 for a refusal."""
    return str(max(1, math.ceil(seconds)))


__all__ = ["RateLimiter", "retry_after"]
