"""One daemon per state directory.

The state directory holds what must belong to one daemon alone: the hub outbox, the
generated API key, and (through the device id) the MQTT session. A second daemon started
on the same directory would share all three with the first: its MQTT connection would
take the first one's session over and back about once a second. So the daemon holds an
exclusive lock on ``<state directory>/daemon.pid`` (which names its pid) for as long as it
runs, and a second one refuses to start with a message naming the first.

The lock is an ``flock``: the kernel releases it when the process ends, however it ends,
so a daemon killed with ``kill -9`` never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

LOCK_FILE = "daemon.pid"


class AlreadyRunning(RuntimeError):
    """Another daemon holds the state directory."""


def default_state_dir(env: Mapping[str, str], *, is_root: bool, home: Path) -> Path:
    """Where the appliance keeps state: systemd's ``$STATE_DIRECTORY`` (first entry) when
    set, else ``/var/lib/appliance`` for root, else ``$XDG_STATE_HOME/appliance`` (by default
    ``~/.local/state/appliance``)."""
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    if is_root:
        return Path("/var/lib/appliance")
    xdg = env.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else home / ".local" / "state") / "appliance"


def state_directory(env: Mapping[str, str]) -> Path:
    """The state directory the daemon uses (see :func:`default_state_dir`)."""
    return default_state_dir(env, is_root=os.geteuid() == 0, home=Path.home())


def instance_suffix(env: Mapping[str, str]) -> str:
    """``""`` for a daemon on the default state directory; otherwise a short, stable hash of
    its directory, which tells apart daemons that share a device id (the machine's) on one
    host, e.g. in the MQTT client id, so they do not take each other's session."""
    state = state_directory(env)
    if state == state_directory({}):
        return ""
    return hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:8]


class StateLock:
    """``with StateLock(directory):`` hold the state directory for this process."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            # A state directory that cannot be written fails later where it is needed (hub
            # outbox, generated key) with its own message; the lock alone is no reason to
            # refuse to serve.
            log.warning(
                "cannot lock the state directory %s: %s", self.path.parent, exc.strerror or exc
            )
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(
                f"another appliance daemon{f' (pid {holder})' if holder else ''} is running "
                f"with the state directory {self.path.parent}; stop it first, or give this "
                "one its own state directory ($STATE_DIRECTORY), device.id and http.port"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # no pid of a daemon that is gone
        os.close(self._fd)  # releases the lock
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
