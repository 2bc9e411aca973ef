"""What leaves the appliance, and what it remembers having answered.

:class:`Outbox` holds every message to publish. One publisher drains it while the broker is
there, removing a message only once the broker acknowledged it (QoS 1), so replies produced
while the broker is away wait here and go out after the reconnect, in order. It is bounded:
beyond ``limit`` the oldest message is dropped and counted. State documents (info, stats,
discovery ...) carry a ``key`` and replace their queued predecessor instead of piling up.

:class:`ReplyCache` remembers recent replies by request id, so a redelivered request (QoS 1
after a lost acknowledgement, or a client that retries) is answered again, not run twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from appliance.transports.mqtt.metrics import MqttMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    """One message to publish. ``kind`` labels metrics (reply, chunk, result, state)."""

    topic: str
    payload: bytes
    kind: str
    retain: bool = False
    content_type: str | None = None  # MQTT 5 only
    correlation: bytes | None = None  # MQTT 5 only
    key: str | None = None  # state documents: a newer one replaces a queued older one


class Outbox:
    """Bounded FIFO of messages waiting for the broker."""

    def __init__(self, limit: int, metrics: MqttMetrics) -> None:
        self.limit = limit
        self._metrics = metrics
        self._items: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._dropping = False  # logged once per overflow episode
        self._sending: Outgoing | None = None  # handed to the publisher, not yet done

    def __len__(self) -> int:
        return len(self._items)

    def unsent(self) -> int:
        """Messages waiting that are not state documents (those are republished anyway)."""
        return sum(1 for m in self._items if m.key is None)

    def put(self, message: Outgoing) -> None:
        if message.key is not None:
            for i, queued in enumerate(self._items):
                if queued.key == message.key:
                    self._items[i] = message
                    return
        if len(self._items) >= self.limit:
            dropped = self._items.popleft()
            self._metrics.mqtt_dropped.labels(dropped.kind).inc()
            if not self._dropping:
                self._dropping = True
                log.warning("MQTT outbox full (%d messages): dropping the oldest until the "
                            "broker takes them again", self.limit)
        self._items.append(message)
        self._changed()

    def replace(self, old: Outgoing, new: Outgoing) -> bool:
        """Swap ``old`` for ``new`` if ``old`` still waits (is neither being published nor
        gone); ``False`` otherwise. Streams merge their latest chunk this way."""
        if old is self._sending:
            return False
        for i in range(len(self._items) - 1, -1, -1):  # a stream's latest is near the end
            if self._items[i] is old:
                self._items[i] = new
                return True
        return False

    def drop_state(self) -> None:
        """Forget queued state documents; they are published afresh on (re)connect."""
        self._items = deque(m for m in self._items if m.key is None)
        self._changed()

    async def next(self) -> Outgoing:
        """The oldest message, left in place until :meth:`done` (waits while empty)."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        # Once handed out a message may reach the broker even if its confirmation never
        # comes back: from then on it is never replaced, only resent.
        self._sending = self._items[0]
        return self._sending

    def done(self, message: Outgoing) -> None:
        """``message`` reached the broker (or can never reach it)."""
        if self._sending is message:
            self._sending = None
        if self._items and self._items[0] is message:
            self._items.popleft()
        self._metrics.mqtt_published.labels(message.kind).inc()
        self._changed()

    async def drained(self) -> None:
        """Wait until nothing is waiting."""
        await self._empty.wait()

    def _changed(self) -> None:
        self._metrics.mqtt_outbox.set(len(self._items))
        if self._items:
            self._ready.set()
            self._empty.clear()
        else:
            self._empty.set()
            self._dropping = False


@dataclass
class _Entry:
    expires: float
    replies: list[Outgoing] | None = None  # None: the request is still running


class ReplyCache:
    """Recent requests by key: running, or answered with these messages."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def begin(self, key: Hashable) -> list[Outgoing] | bool:
        """Record a new request: ``True``. A duplicate still running: ``False``. A duplicate
        already answered: the messages it was answered with."""
        if self.ttl <= 0:
            return True
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            return False if entry.replies is None else list(entry.replies)
        self._entries[key] = _Entry(expires=now + self.ttl)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return True

    def finish(self, key: Hashable, replies: list[Outgoing]) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.replies = replies

    def forget(self, key: Hashable) -> None:
        """The request may run again (it was refused as busy, say)."""
        self._entries.pop(key, None)

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            del self._entries[key]
