"""``scripts/run`` as a new user meets it: one command starts broker, hub and appliance,
says where the dashboard and both keys are, keeps the broker off the LAN, enrols the box
under its name, and a second start does not reinstall.

It runs the real script with the checkout's virtual environment, on free ports, with the
state directory in a temporary one and mDNS off (tests never announce on the real LAN).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.hub.conftest import free_port

# The first start may install (pip, a minute or more on a busy box); the second may not.
pytestmark = pytest.mark.timeout(600)


class Run:
    """``scripts/run`` in its own process group, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "run"), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            assert self.proc.poll() is None, "\n".join(self.lines)
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        """What Ctrl-C does: the script stops broker, hub and appliance."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _listeners(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def test_scripts_run_from_first_start_to_second(tmp_path: Path) -> None:
    broker, hub, http = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        {
            "STATE_DIRECTORY": str(tmp_path / "state"),
            "APPLIANCE_RUN_DIR": str(tmp_path / "run"),
            "APPLIANCE_MDNS__ENABLED": "false",
            "APPLIANCE_DEVICE__NAME": "Greenhouse 3",
        }
    )
    args = ["--broker-port", str(broker), "--hub-port", str(hub), "--port", str(http)]
    first = Run(args, env)
    try:
        first.wait_for(r"^run: enrolled as", 480)
        output = "\n".join(first.lines)
        # The broker: loopback only, and it says so.
        assert _listeners(broker) == {"127.0.0.1"}, _listeners(broker)
        assert f"run: Mosquitto on port {broker} (127.0.0.1 only" in output
        # Where to point a browser, and where each key is.
        dashboard = first.wait_for(rf"^run: hub dashboard +http://\S+:{hub}/ +\(key: (\S+);", 1)
        box = first.wait_for(rf"^run: appliance +http://\S+:{http}/ +\(key: (\S+);", 1)
        hub_key, box_key = Path(dashboard.group(1)), Path(box.group(1))
        assert hub_key == tmp_path / "state" / "hub-api-key" and hub_key.is_file()
        assert box_key == tmp_path / "state" / "api-key" and box_key.is_file()
        # Enrolled under device.name, not the host name, and the key opens the fleet API.
        request = urllib.request.Request(
            f"http://127.0.0.1:{hub}/api/v1/devices",
            headers={"Authorization": f"Bearer {hub_key.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            devices = json.loads(resp.read())["devices"]
        assert [d["name"] for d in devices] == ["Greenhouse 3"]
        assert "run: enrolled as Greenhouse 3 (" in output
        # The appliance's key opens the appliance.
        request = urllib.request.Request(
            f"http://127.0.0.1:{http}/v1/models",
            headers={"Authorization": f"Bearer {box_key.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
    finally:
        first.stop()
    assert not _listeners(broker) and not _listeners(hub) and not _listeners(http)

    second = Run(args, env)
    try:
        second.wait_for(r"^run: enrolled as", 120)
        output = "\n".join(second.lines)
        assert "skipping pip" in output and "setup: installing" not in output, output
    finally:
        second.stop()
    assert not _listeners(broker) and not _listeners(hub) and not _listeners(http)
