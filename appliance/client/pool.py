"""The live set of appliances a browser has found, and how requests are spread over them.

Thread-safe: the asyncio browser changes it on its loop, a blocking caller may read it and
wait on it from any thread. Picking is least-outstanding first (requests held through
:meth:`AppliancePool.lease`), round-robin among equals, so short one-off calls through
:meth:`AppliancePool.base_url` rotate too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from appliance.client.errors import DiscoveryTimeout, NoApplianceAvailable
from appliance.protocol.dnssd import Appliance

Predicate = Callable[[list[Appliance]], bool]

DOWN_FOR = 30.0  # seconds an appliance that refused a connection is passed over


class AppliancePool:
    """Appliances by service name, with per-appliance outstanding request counts."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[str, Appliance] = {}
        self._outstanding: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._turn = 0
        self._listeners: list[Callable[[], None]] = []

    # -- the set --------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (in the changing thread) after every change."""
        self._listeners.append(listener)

    def upsert(self, appliance: Appliance) -> None:
        with self._cond:
            self._items[appliance.service] = appliance
            self._down_until.pop(appliance.service, None)  # it re-announced: try it again
            self._cond.notify_all()
        self._changed()

    def remove(self, service: str) -> Appliance | None:
        with self._cond:
            gone = self._items.pop(service, None)
            self._down_until.pop(service, None)
            self._cond.notify_all()
        self._changed()
        return gone

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def appliances(self) -> list[Appliance]:
        """Every appliance found, ready or not, by name."""
        with self._cond:
            return sorted(self._items.values(), key=lambda a: (a.name, a.service))

    def get(self, device_id: str) -> Appliance | None:
        """The appliance with this device id, if present."""
        return next((a for a in self.appliances() if a.device_id == device_id), None)

    def candidates(self, model: str | None = None) -> list[Appliance]:
        """Ready appliances (serving ``model``, if given), ones marked down last."""
        now = time.monotonic()
        with self._cond:
            ready = [a for a in self.appliances() if a.ready and (model is None or a.serves(model))]
            up = [a for a in ready if self._down_until.get(a.service, 0) <= now]
            return up or ready

    def wait_until(self, predicate: Predicate, timeout: float) -> list[Appliance]:
        """Block until ``predicate(appliances())`` holds; :class:`DiscoveryTimeout` if not
        within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.appliances()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DiscoveryTimeout(f"the appliances seen did not match within {timeout}s")
                self._cond.wait(left)
            return self.appliances()

    # -- spreading requests -----------------------------------------------------------------

    def pick(self, model: str | None = None) -> Appliance:
        """A ready appliance serving ``model``: the least busy, round-robin among equals.

        Raises :class:`NoApplianceAvailable` when there is none.
        """
        with self._cond:
            found = self.candidates(model)
            if not found:
                what = f" serving model {model!r}" if model else ""
                raise NoApplianceAvailable(
                    f"no ready appliance{what} found ({len(self._items)} appliance(s) seen)",
                    model=model,
                )
            least = min(self._outstanding.get(a.service, 0) for a in found)
            tied = [a for a in found if self._outstanding.get(a.service, 0) == least]
            choice = tied[self._turn % len(tied)]
            self._turn += 1
            return choice

    @contextmanager
    def lease(self, model: str | None = None) -> Iterator[Appliance]:
        """Pick an appliance and count a request outstanding on it until the block ends.

        A connection failure (``OSError``, which aiohttp's connection errors are) marks the
        appliance down for a while, so the next pick prefers the others.
        """
        with self._cond:
            appliance = self.pick(model)
            self._outstanding[appliance.service] = self._outstanding.get(appliance.service, 0) + 1
        try:
            yield appliance
        except OSError:
            self.mark_down(appliance)
            raise
        finally:
            with self._cond:
                left = self._outstanding.get(appliance.service, 1) - 1
                if left:
                    self._outstanding[appliance.service] = left
                else:
                    self._outstanding.pop(appliance.service, None)

    def outstanding(self, appliance: Appliance) -> int:
        """Requests currently leased on ``appliance``."""
        with self._cond:
            return self._outstanding.get(appliance.service, 0)

    def mark_down(self, appliance: Appliance, seconds: float = DOWN_FOR) -> None:
        """Pass over ``appliance`` for ``seconds`` unless nothing else serves (it may have
        lost power without saying goodbye)."""
        with self._cond:
            self._down_until[appliance.service] = time.monotonic() + seconds

    def base_url(self, model: str | None = None) -> str:
        """OpenAI-compatible base URL of the next pick, e.g. ``http://10.0.0.7:8080/v1``."""
        return self.pick(model).openai_base_url


__all__ = ["AppliancePool"]
