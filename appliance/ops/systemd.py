"""sd_notify spoken by the daemon itself: readiness, watchdog pings, status, stop and reload.

systemd's notification protocol is a few ``KEY=VALUE`` lines in one datagram sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). A dozen lines of stdlib do it, so there is no wrapper library to depend on.

:class:`SystemdNotify` is a lifecycle unit (the daemon's and the hub's):

- ``READY=1`` once ``wait_ready()`` returns — the daemon passes "listeners bound (the unit
  starts after them) and every model loaded or failed", so ``systemctl start`` returns when
  the box really serves;
- ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` from a task on the event loop, so a blocked
  loop stops the pings and systemd restarts the service (``WatchdogSec=``); pings start at
  once, so a long model load (off-loop) does not count as a hang;
- ``STATUS=`` a one-line summary (``systemctl status`` shows it), refreshed on
  :meth:`refresh_status`;
- ``STOPPING=1`` first thing on the way down; ``RELOADING=1`` / ``READY=1`` around a reload
  (:meth:`reloading`).

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) the unit does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType

log = logging.getLogger(__name__)


class Notifier:
    """A connected datagram socket to ``$NOTIFY_SOCKET``; sends never block the loop."""

    def __init__(self, address: str) -> None:
        # "@name" is an abstract socket: the kernel wants a leading NUL byte instead.
        target = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        try:
            self._sock.connect(target)
        except OSError:
            self._sock.close()
            raise
        self.address = address

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Notifier | None:
        """The notifier ``$NOTIFY_SOCKET`` asks for, or ``None`` when there is none."""
        address = env.get("NOTIFY_SOCKET", "")
        if not address or not address.startswith(("/", "@")):
            return None  # unset, or a vsock/other address family we do not speak
        try:
            return cls(address)
        except OSError as exc:
            log.warning("cannot reach NOTIFY_SOCKET %s: %s", address, exc)
            return None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one message; ``False`` if it could not be sent."""
        message = "\n".join(
            a.replace("\n", " ") if a.startswith("STATUS=") else a for a in assignments
        )
        try:
            self._sock.send(message.encode())
        except OSError as exc:  # full queue (EAGAIN) or manager gone: never fatal
            log.debug("sd_notify %r not sent: %s", message, exc)
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled
    advises), or ``None`` when the watchdog is off or meant for another process."""
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class SystemdNotify:
    """Lifecycle unit telling systemd how the service is doing (see the module docstring)."""

    def __init__(
        self,
        *,
        wait_ready: Callable[[], Awaitable[None]],
        status: Callable[[], str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._env = os.environ if env is None else env
        self._wait_ready = wait_ready
        self._status = status
        self._notifier: Notifier | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = False
        self.pings = 0

    @property
    def active(self) -> bool:
        return self._notifier is not None

    async def __aenter__(self) -> SystemdNotify:
        self._notifier = Notifier.from_env(self._env)
        if self._notifier is None:
            return self
        self._notifier.send("STATUS=starting")
        interval = watchdog_interval(self._env, os.getpid())
        if interval is not None:
            self._tasks.append(
                asyncio.create_task(self._watchdog(interval), name="appliance-sd-watchdog")
            )
        self._tasks.append(asyncio.create_task(self._announce_ready(), name="appliance-sd-ready"))
        log.debug("sd_notify on %s (watchdog every %ss)", self._notifier.address, interval)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is None:
            return
        notifier.send("STOPPING=1", "STATUS=stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        notifier.close()

    async def _announce_ready(self) -> None:
        await self._wait_ready()
        self._ready = True
        if self._notifier is not None:
            self._notifier.send("READY=1", "STATUS=" + self._status())

    async def _watchdog(self, interval: float) -> None:
        # Sent from the loop on purpose: if a blocking call ever stalls the loop, the pings
        # stop and systemd kills and restarts the service after WatchdogSec.
        while self._notifier is not None:
            if self._notifier.send("WATCHDOG=1"):
                self.pings += 1
            await asyncio.sleep(interval)

    def refresh_status(self) -> None:
        """Send the current one-line summary (after a model changed state, say)."""
        if self._notifier is not None and self._ready:
            self._notifier.send("STATUS=" + self._status())

    def reloading(self, active: bool) -> None:
        """``RELOADING=1`` when a reload starts (with the CLOCK_MONOTONIC stamp systemd ≥ 253
        wants), ``READY=1`` with a fresh status when it is done."""
        if self._notifier is None:
            return
        if active:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")
        else:
            self._notifier.send("READY=1", "STATUS=" + self._status())


__all__ = ["Notifier", "SystemdNotify", "watchdog_interval"]
