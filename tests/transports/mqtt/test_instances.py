"""Daemons on one host, as a user meets them: real daemon processes and a real Mosquitto.

A second daemon on the same state directory refuses to start and names the first; two
daemons that share an MQTT client id (here: the same device id, as two daemons on one
machine derive it from /etc/machine-id) no longer knock each other off the broker about
once a second, and each says once that the other is online as the same device; a clean
stop logs no error.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import daemon, start_daemon
from tests.transports.mqtt.conftest import Broker, PahoClient, until

Clients = Callable[..., PahoClient]
TWIN = "is online as this device"


def mqtt_env(broker: Broker, state: Path, **extra: str) -> dict[str, str]:
    return {
        "APPLIANCE_MQTT__ENABLED": "true",
        "APPLIANCE_MQTT__HOST": broker.host,
        "APPLIANCE_MQTT__PORT": str(broker.port),
        "APPLIANCE_MQTT__RECONNECT_MIN": "0.05",
        "APPLIANCE_MQTT__RECONNECT_MAX": "3",
        "STATE_DIRECTORY": str(state),
        **extra,
    }


def errors(log: list[str]) -> list[str]:
    return [line for line in log if re.search(r"\bERROR\b|Traceback|never retrieved", line)]


async def test_a_second_daemon_on_the_same_state_directory_refuses_and_names_the_first(
    broker: Broker, tmp_path: Path
) -> None:
    env = mqtt_env(broker, tmp_path / "state", APPLIANCE_DEVICE__ID="lock-box")
    with daemon(env=env, ready=False) as first:
        second = start_daemon(env=env)
        second.proc.wait(timeout=60)
        assert second.stop() == 1
        text = "\n".join(second.log)
        assert f"another appliance daemon (pid {first.proc.pid}) is running" in text, text
        assert str(tmp_path / "state") in text
        assert (tmp_path / "state" / "daemon.pid").read_text() == f"{first.proc.pid}\n"
    # Gone (even a kill -9 frees the lock: it is the kernel's): the next one starts.
    with daemon(env=env, ready=False) as again:
        again.stop(signal.SIGKILL)
    with daemon(env=env, ready=False):
        pass


async def test_two_daemons_with_one_device_id_keep_their_sessions_and_say_so_once(
    broker: Broker, paho_clients: Clients, tmp_path: Path
) -> None:
    """Two daemons on one host derive one device id; on state directories of their own
    they get client ids of their own, so neither takes the other's session, and each says
    once that another daemon is online as the same device."""
    same = {"APPLIANCE_DEVICE__ID": "twin-box"}
    with daemon(env=mqtt_env(broker, tmp_path / "a", **same), ready=False) as first:
        await until(lambda: any("MQTT connected" in line for line in first.log))
        with daemon(env=mqtt_env(broker, tmp_path / "b", **same), ready=False) as second:
            await until(lambda: all(any(TWIN in line for line in d.log) for d in (first, second)))
            await asyncio.sleep(8)  # long enough for a tug of war (it was about once a second)
            second_log = list(second.log)
        first_log = list(first.log)
    for log, other in ((first_log, second), (second_log, first)):
        told = [line for line in log if TWIN in line]
        assert len(told) == 1, told
        assert "WARNING" in told[0] and f"pid {other.proc.pid}" in told[0], told
        assert "twin-box" in told[0] and "device.id" in told[0], told
        connected = [line for line in log if "MQTT connected" in line]
        assert len(connected) == 1, connected  # nobody knocked off
    ids = {
        re.search(r"as (\S+) \(MQTT", line).group(1)  # type: ignore[union-attr]
        for line in first_log + second_log
        if "MQTT connected" in line
    }
    assert len(ids) == 2, ids


async def test_a_clean_stop_logs_no_error(
    broker: Broker, tmp_path: Path, paho_clients: Clients
) -> None:
    watcher = paho_clients(broker)
    watcher.subscribe("appliance/stop-box/availability")
    env = mqtt_env(broker, tmp_path / "state", APPLIANCE_DEVICE__ID="stop-box")
    with daemon(env=env) as proc:
        await until(
            lambda: any(
                m.payload == b"online" for m in watcher.on("appliance/stop-box/availability")
            )
        )
        assert proc.stop(signal.SIGTERM) == 0
    await until(lambda: watcher.on("appliance/stop-box/availability")[-1].payload == b"offline")
    assert not errors(proc.log), "\n".join(proc.log)
    assert any("MQTT" in line for line in proc.log)
