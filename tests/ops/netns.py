"""Network namespaces for the mDNS tests: real multicast, never on the machine's interfaces.

Every namespace gets a unique name and is deleted on exit, failures included. ``loopback()``
is one namespace whose ``lo`` carries multicast (several daemons and browsers on
127.0.0.1); ``lan()`` is closer to a real LAN: one namespace per host, each with an
``eth0`` veth plugged into a bridge that lives in a "switch" namespace of its own, so the
host's namespace gains no interface at all.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, TypeVar

import pytest

from tests.conftest import ROOT, DaemonProcess

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
BROWSE_SCRIPT = ROOT / "tests" / "ops" / "zc_browse.py"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Netns:
    """One network namespace, created by this test run."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=clean_env(),
            cwd=ROOT,
        )

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on a thread inside this namespace; sockets it opens (and threads it
        starts) live there. The test's own thread never changes namespace."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                _setns(f"/run/netns/{self.name}")
                box["value"] = fn()
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        setns = getattr(os, "setns", None)  # Python 3.12+
        if setns is not None:
            setns(fd, _CLONE_NEWNET)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for processes in a namespace: none of the caller's APPLIANCE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(extra)
    return env


_unavailable: str | None = None
_checked = False


def require_netns() -> None:
    """Skip (with the kernel's reason) where network namespaces cannot be created."""
    global _checked, _unavailable
    if not _checked:
        _checked = True
        if os.geteuid() != 0:
            _unavailable = "network namespaces need root"
        else:
            name = f"appl-probe-{uuid.uuid4().hex[:8]}"
            try:
                _ip("netns", "add", name)
                _ip("netns", "del", name)
            except (OSError, FileNotFoundError) as exc:
                _unavailable = f"cannot create a network namespace here: {exc}"
    if _unavailable:
        pytest.skip(_unavailable)


def _unique(prefix: str) -> str:
    return f"appl-{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextmanager
def namespace(prefix: str) -> Iterator[Netns]:
    """A fresh namespace with ``lo`` up and carrying multicast; deleted on exit."""
    require_netns()
    ns = Netns(_unique(prefix))
    _ip("netns", "add", ns.name)
    try:
        ns.ip("link", "set", "lo", "up")
        ns.ip("link", "set", "lo", "multicast", "on")
        ns.ip("route", "add", "224.0.0.0/4", "dev", "lo")
        yield ns
    finally:
        _delete(ns)


def _delete(ns: Netns) -> None:
    # Anything still running in it was started by this test: stop it first.
    pids = subprocess.run(
        ["ip", "netns", "pids", ns.name], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in pids:
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


loopback = namespace


class Lan:
    """Hosts on one bridged segment: ``hosts[i]`` has ``eth0`` with ``addresses[i]``."""

    def __init__(self, switch: Netns, hosts: list[Netns], addresses: list[str]) -> None:
        self.switch = switch
        self.hosts = hosts
        self.addresses = addresses

    def unplug(self, index: int) -> None:
        """Take host ``index``'s cable out of the switch (its own link stays up)."""
        self.switch.ip("link", "set", f"port{index}", "nomaster")

    def plug(self, index: int) -> None:
        self.switch.ip("link", "set", f"port{index}", "master", "br0")


@contextmanager
def lan(prefix: str, count: int, *, plugged: bool = True) -> Iterator[Lan]:
    """``count`` host namespaces joined by veth pairs to a bridge in a switch namespace."""
    with ExitStack() as stack:
        switch = stack.enter_context(namespace(f"{prefix}-sw"))
        switch.ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        switch.ip("link", "set", "br0", "up")
        hosts: list[Netns] = []
        addresses: list[str] = []
        for i in range(count):
            host = stack.enter_context(namespace(f"{prefix}-h{i}"))
            switch.ip(
                "link",
                "add",
                f"port{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.name,
            )
            if plugged:
                switch.ip("link", "set", f"port{i}", "master", "br0")
            switch.ip("link", "set", f"port{i}", "up")
            address = f"10.77.0.{i + 10}"
            host.ip("addr", "add", f"{address}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")
            hosts.append(host)
            addresses.append(address)
        yield Lan(switch, hosts, addresses)


# ----------------------------------------------------------------------------- daemons


def start_daemon_in(
    ns: Netns, *args: str, env: dict[str, str], host: str = "127.0.0.1"
) -> DaemonProcess:
    """``python -m appliance run`` inside ``ns`` (MQTT off unless ``env`` turns it on)."""
    full_env = clean_env(**{"APPLIANCE_MQTT__ENABLED": "false", **env})
    state = None
    if "STATE_DIRECTORY" not in env:  # one daemon per state directory: each its own
        state = full_env["STATE_DIRECTORY"] = tempfile.mkdtemp(prefix="appliance-state-")
    proc = subprocess.Popen(
        ns.command(sys.executable, "-m", "appliance", "run", "--host", host, "--port", "0", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=ROOT,
    )
    handle = DaemonProcess(proc)
    handle.state_dir = state  # removed when it stops
    return handle


@contextmanager
def daemons_in(
    ns: Netns, envs: Sequence[dict[str, str]], *args: str, host: str = "127.0.0.1"
) -> Iterator[list[DaemonProcess]]:
    """Several daemons in ``ns``, all listening; each stopped on exit."""
    started: list[DaemonProcess] = []
    try:
        for env in envs:
            started.append(start_daemon_in(ns, *args, env=env, host=host))
        for handle in started:
            handle.wait_listening(60)
        yield started
    finally:
        for handle in started:  # all at once: each spends a moment saying goodbye
            if handle.proc.poll() is None:
                handle.proc.send_signal(signal.SIGTERM)
        for handle in started:
            handle.stop()


def port_of(handle: DaemonProcess) -> int:
    return int(handle.url.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------- browsers


def discover(
    ns: Netns, *, interfaces: str = "lo", timeout: float = 1.5, json_output: bool = True
) -> subprocess.CompletedProcess[str]:
    """``appliance discover`` as a subprocess inside ``ns``."""
    argv = [
        sys.executable,
        "-m",
        "appliance",
        "discover",
        "--interfaces",
        interfaces,
        "--timeout",
        str(timeout),
    ]
    return ns.run(*argv, *(["--json"] if json_output else []))


class ZeroconfBrowser:
    """``tests/ops/zc_browse.py`` (plain python-zeroconf, nothing of ours) running inside a
    namespace; every event it prints is a JSON line collected here."""

    def __init__(self, ns: Netns, service_type: str, interfaces: str) -> None:
        self.proc = subprocess.Popen(
            ns.command(sys.executable, str(BROWSE_SCRIPT), service_type, interfaces),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="zc-browse-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import json

        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        """The first event (seen before or after now) matching ``predicate``."""
        for event in self.events:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching browse event in {timeout}s; saw {self.events}")
            try:
                event = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                raise AssertionError(f"browser exited: {self.stderr()}; saw {self.events}")
            self.events.append(event)
            if predicate(event):
                return event

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the script exits when its stdin closes
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def zeroconf_browser(
    ns: Netns, service_type: str, interfaces: str = "127.0.0.1"
) -> Iterator[ZeroconfBrowser]:
    browser = ZeroconfBrowser(ns, service_type, interfaces)
    try:
        yield browser
    finally:
        browser.close()


def thread_names() -> set[str]:
    return {f"{t.name}@{t.ident}" for t in threading.enumerate()}


def assert_no_new_threads(before: set[str], timeout: float = 5) -> None:
    """Threads started during a test must be gone (joined) by its end."""
    deadline = time.monotonic() + timeout
    while True:
        extra = {n for n in thread_names() - before if not n.startswith("asyncio_")}
        if not extra:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"threads left running: {sorted(extra)}")
        time.sleep(0.05)
