"""What leaves the appliance, and what it remembers having answered.

:class:`PublishQueue` is the MQTT outbox: an in-memory queue of every message to publish
(the durable, on-disk outbox for the hub is :class:`appliance.ops.outbox.HubOutbox`). One
publisher drains it while the broker is there, a few messages in flight at once and in
order, removing a message only once the broker acknowledged it (QoS 1), so replies
produced while the broker is away, or unacknowledged when the connection ended, wait
here and go out after the reconnect, in order. It is bounded: beyond ``limit`` the
oldest message is dropped and counted. State documents (info, stats, discovery ...)
carry a ``key`` and replace their queued predecessor instead of piling up. Whoever queued
a message can learn its fate: :meth:`PublishQueue.when_sent` runs a callback once the
broker has it (a request is acknowledged to the broker only then), and ``on_drop`` of
:meth:`PublishQueue.put` runs if it never will (a stream marks the gap in its final
message).

:class:`ReplyCache` remembers recent replies by request id, so a redelivered request (QoS 1
after a lost acknowledgement, or a client that retries) is answered again, not run twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

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


class PublishQueue:
    """Bounded FIFO of messages waiting for the broker."""

    def __init__(self, limit: int, metrics: MqttMetrics) -> None:
        self.limit = limit
        self._metrics = metrics
        self._items: deque[Outgoing] = deque()
        self._ready = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._dropping = False  # logged once per overflow episode
        # Handed to the publisher, not yet done (by id(); they lead the queue).
        self._sending: dict[int, Outgoing] = {}
        # Keyed by id(): the message objects are alive while queued, so ids are unique.
        self._sent_callbacks: dict[int, list[Callable[[], None]]] = {}
        self._drop_callbacks: dict[int, Callable[[], None]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def unsent(self) -> int:
        """Messages waiting that are not state documents (those are republished anyway)."""
        return sum(1 for m in self._items if m.key is None)

    def put(self, message: Outgoing, *, on_drop: Callable[[], None] | None = None) -> None:
        """Queue ``message``; ``on_drop`` runs if it is dropped instead of published."""
        if message.key is not None:
            for i, queued in enumerate(self._items):
                if queued.key == message.key and id(queued) not in self._sending:
                    self._items[i] = message
                    self._forget(queued)
                    return
        if len(self._items) >= self.limit:
            # The oldest goes, but never one being published: it may reach the broker.
            sending = self._sending
            index = next((i for i, m in enumerate(self._items) if id(m) not in sending), 0)
            dropped = self._items[index]
            del self._items[index]
            self._dropped(dropped)
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "MQTT outbox full (%d messages): dropping the oldest until the "
                    "broker takes them again",
                    self.limit,
                )
        if on_drop is not None:
            self._drop_callbacks[id(message)] = on_drop
        self._items.append(message)
        self._changed()

    def replace(self, old: Outgoing, new: Outgoing) -> bool:
        """Swap ``old`` for ``new`` if ``old`` still waits (is neither being published nor
        gone); ``False`` otherwise. Streams merge their latest chunk this way."""
        if id(old) in self._sending:
            return False
        for i in range(len(self._items) - 1, -1, -1):  # a stream's latest is near the end
            if self._items[i] is old:
                self._items[i] = new
                if id(old) in self._sent_callbacks:
                    self._sent_callbacks[id(new)] = self._sent_callbacks.pop(id(old))
                if id(old) in self._drop_callbacks:
                    self._drop_callbacks[id(new)] = self._drop_callbacks.pop(id(old))
                return True
        return False

    def when_sent(self, message: Outgoing, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the broker has acknowledged ``message``; at once if it is no
        longer queued (published already, or dropped and counted)."""
        if any(item is message for item in self._items):
            self._sent_callbacks.setdefault(id(message), []).append(callback)
        else:
            callback()

    def drop_state(self) -> None:
        """Forget queued state documents; they are published afresh on (re)connect (one
        that was being published too: sent again after the fresh one, it would replace it)."""
        for message in self._items:
            if message.key is not None:
                self._forget(message)
        self._items = deque(m for m in self._items if m.key is None)
        self._changed()

    async def next(self) -> Outgoing:
        """The oldest message not yet handed out, left in place until :meth:`done` (waits
        while there is none)."""
        sending = self._sending
        while True:
            for message in self._items:
                if id(message) not in sending:
                    # Once handed out a message may reach the broker even if its
                    # confirmation never comes back: from then on it is never replaced,
                    # only resent.
                    sending[id(message)] = message
                    return message
            self._ready.clear()
            await self._ready.wait()

    def rewind(self) -> None:
        """A new connection: every message still here is handed out again, in order (those
        handed out before may or may not have reached the broker)."""
        self._sending.clear()
        self._changed()

    def done(self, message: Outgoing, *, delivered: bool = True) -> None:
        """``message`` reached the broker, or (``delivered=False``) never can: the broker
        refused it. Either way it leaves the outbox."""
        self._sending.pop(id(message), None)
        items = self._items
        if items and items[0] is message:
            items.popleft()
        else:
            for i, queued in enumerate(items):
                if queued is message:
                    del items[i]
                    break
        if delivered:
            self._metrics.mqtt_published.labels(message.kind).inc()
            self._drop_callbacks.pop(id(message), None)
            for callback in self._sent_callbacks.pop(id(message), []):
                callback()
        else:
            self._dropped(message)
        self._changed()

    def _dropped(self, message: Outgoing) -> None:
        self._metrics.mqtt_dropped.labels(message.kind).inc()
        self._sent_callbacks.pop(id(message), None)  # e.g. a request stays unacknowledged
        on_drop = self._drop_callbacks.pop(id(message), None)
        if on_drop is not None:
            on_drop()

    def _forget(self, message: Outgoing) -> None:
        self._sent_callbacks.pop(id(message), None)
        self._drop_callbacks.pop(id(message), None)

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


class StreamGaps:
    """Chunks of one stream that the outbox dropped, and the final message that names them.

    A chunk can be dropped after the final message is queued (both wait while the broker is
    away); the final message is then rebuilt in place, as it waits behind the chunk.
    """

    def __init__(self, outbox: PublishQueue) -> None:
        self._outbox = outbox
        self.dropped: list[int] = []
        self._build: Callable[[dict[str, Any]], Outgoing] | None = None
        self._final: Outgoing | None = None

    def dropper(self, seq: int) -> Callable[[], None]:
        def dropped() -> None:
            self.dropped.append(seq)
            if self._build is not None and self._final is not None:
                rebuilt = self._build(self._extra())
                if self._outbox.replace(self._final, rebuilt):
                    self._final = rebuilt

        return dropped

    def final(self, build: Callable[[dict[str, Any]], Outgoing]) -> Outgoing:
        """Build (with ``complete`` and ``gaps``), queue and return the final message."""
        self._build = build
        self._final = build(self._extra())
        self._outbox.put(self._final)
        return self._final

    def _extra(self) -> dict[str, Any]:
        if not self.dropped:
            return {"complete": True}
        return {"complete": False, "gaps": ranges(sorted(self.dropped))}


def ranges(numbers: list[int]) -> list[list[int]]:
    """``[1, 2, 3, 7]`` → ``[[1, 3], [7, 7]]``."""
    ranges: list[list[int]] = []
    for n in numbers:
        if ranges and ranges[-1][1] == n - 1:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])
    return ranges


@dataclass
class _Entry:
    expires: float
    replies: list[Outgoing] | None = None  # None: the request is still running
    # Copies that arrived while it ran: each is acknowledged once the reply is out.
    waiters: list[Callable[[], None]] = field(default_factory=list)


class ReplyCache:
    """Recent requests by key: running, or answered with these messages."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def begin(
        self, key: Hashable, waiter: Callable[[], None] | None = None
    ) -> list[Outgoing] | bool:
        """Record a new request: ``True``. A duplicate still running: ``False`` (``waiter``
        runs when it finishes). A duplicate already answered: the messages it was answered
        with."""
        if self.ttl <= 0:
            return True
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.replies is None:
                if waiter is not None:
                    entry.waiters.append(waiter)
                return False
            return list(entry.replies)
        self._entries[key] = _Entry(expires=now + self.ttl)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return True

    def finish(self, key: Hashable, replies: list[Outgoing]) -> list[Callable[[], None]]:
        """Remember the answer; returns the waiters of copies that arrived meanwhile."""
        entry = self._entries.get(key)
        if entry is None:
            return []
        entry.replies = replies
        waiters, entry.waiters = entry.waiters, []
        return waiters

    def forget(self, key: Hashable) -> list[Callable[[], None]]:
        """The request may run again (it was refused as busy, say); returns the waiters."""
        entry = self._entries.pop(key, None)
        return entry.waiters if entry is not None else []

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now or entry.replies is None:
                break  # a running request stays: its copies must still be answered once
            del self._entries[key]
