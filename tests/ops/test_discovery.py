"""mDNS announcements of real daemons, found by ``appliance discover`` and plain zeroconf.

Everything runs in a fresh network namespace whose loopback carries multicast: several
daemon subprocesses (different device ids) announce on ``lo`` and browsers in the same
namespace find them. The machine's own interfaces are never used.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import __version__
from appliance.protocol.dnssd import HTTP_SERVICE_TYPE, SERVICE_TYPE
from tests.conftest import DEFAULT_MODELS, STORIES, DaemonProcess
from tests.ops.netns import (
    Netns,
    assert_no_new_threads,
    daemons_in,
    discover,
    loopback,
    port_of,
    start_daemon_in,
    thread_names,
    zeroconf_browser,
)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = thread_names()
    yield
    assert_no_new_threads(before)


def _env(device_id: str, name: str, **extra: str) -> dict[str, str]:
    return {
        "APPLIANCE_DEVICE__ID": device_id,
        "APPLIANCE_DEVICE__NAME": name,
        "APPLIANCE_MDNS__INTERFACES": "lo",
        **extra,
    }


def discover_until(
    ns: Netns,
    predicate: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 30,
    interfaces: str = "lo",
) -> list[dict[str, Any]]:
    """Run ``appliance discover --json`` until its list satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = discover(ns, interfaces=interfaces)
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        if predicate(found):
            return found
    raise AssertionError(f"discover never matched; last saw {found}")


def by_id(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in found}


class Fleet:
    def __init__(self, ns: Netns, daemons: dict[str, DaemonProcess]) -> None:
        self.ns = ns
        self.daemons = daemons


FLEET = {
    "alpha-1": ("Alpha", {}),
    "beta-2": (
        "Beta",
        {"APPLIANCE_MQTT__ENABLED": "true", "APPLIANCE_MQTT__BASE_TOPIC": "site/beta"},
    ),
    "gamma-3": (
        "Gamma",
        {
            "APPLIANCE_GRPC__ENABLED": "true",
            "APPLIANCE_GRPC__PORT": "0",
            "APPLIANCE_GRPC__HOST": "127.0.0.1",
        }
        if importlib.util.find_spec("grpc")
        else {},
    ),
}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Three daemons with different device ids announcing on one namespace's loopback."""
    extra = ("--models-dir", str(DEFAULT_MODELS))
    with loopback("fleet") as ns:
        envs = [_env(i, name, **more) for i, (name, more) in FLEET.items()]
        with daemons_in(ns, envs[:2], *extra) as first:
            # The third also serves the TinyStories GGUF when it is present.
            more = ("--model", str(STORIES)) if STORIES.is_file() else ()
            with daemons_in(ns, envs[2:], *extra, *more) as third:
                daemons = dict(zip(FLEET, first + third, strict=True))
                discover_until(
                    ns, lambda found: all(by_id(found).get(i, {}).get("ready") for i in FLEET)
                )
                yield Fleet(ns, daemons)


def test_discover_json_lists_each_daemon_with_its_port_and_txt(fleet: Fleet) -> None:
    found = by_id(discover_until(fleet.ns, lambda f: set(FLEET) <= set(by_id(f))))
    for device_id, (name, _) in FLEET.items():
        entry = found[device_id]
        txt = entry["txt"]
        assert entry["name"] == name
        assert entry["port"] == port_of(fleet.daemons[device_id])
        assert entry["address"] == "127.0.0.1"
        assert entry["url"] == fleet.daemons[device_id].url
        assert entry["openai_base_url"] == fleet.daemons[device_id].url + "/v1"
        assert entry["host"] == f"{device_id}.local."
        assert entry["ready"] is True and txt["ready"] == "1"
        assert txt["id"] == device_id
        assert txt["version"] == entry["version"] == __version__
        assert txt["txtvers"] == "1"
        assert (txt["openai"], txt["oip"], txt["health"], txt["path"]) == (
            "/v1",
            "/v2",
            "/health",
            "/docs",
        )
        assert txt["tls"] == "0" and entry["tls"] is False
        assert txt["auth"] == "none"
        assert "sensor-anomaly" in entry["models"]
        assert txt["nmodels"] == str(len(entry["models"]))
        assert entry["paths"] == {
            "openai": "/v1",
            "oip": "/v2",
            "ollama": "/api",
            "ws": "/ws",
            "health": "/health",
            "path": "/docs",
        }
    assert found["beta-2"]["protocols"] == ["openai", "oip-v2", "ollama", "ws", "mqtt"]
    assert found["beta-2"]["mqtt"] == found["beta-2"]["txt"]["mqtt"] == "site/beta"
    assert found["alpha-1"]["protocols"] == ["openai", "oip-v2", "ollama", "ws"]
    assert "mqtt" not in found["alpha-1"]["txt"]
    if STORIES.is_file():
        assert found["gamma-3"]["models"] == ["home-intent", "sensor-anomaly", "stories260K"]
    if FLEET["gamma-3"][1]:  # gRPC on a port of its own, announced once bound
        log = "\n".join(fleet.daemons["gamma-3"].log)
        grpc_port = int(re.findall(r"gRPC .* listening on 127\.0\.0\.1:(\d+)", log)[0])
        assert found["gamma-3"]["grpc_port"] == grpc_port
        assert found["gamma-3"]["txt"]["grpc"] == str(grpc_port)
        assert "grpc" in found["gamma-3"]["protocols"]


def test_discover_prints_a_table(fleet: Fleet) -> None:
    deadline = time.monotonic() + 30
    while True:
        result = discover(fleet.ns, json_output=False)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        if len(lines) >= 1 + len(FLEET) or time.monotonic() > deadline:
            break
    assert lines[0].split() == ["NAME", "ID", "ADDRESS", "VERSION", "READY", "MODELS"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    for device_id, (name, _) in FLEET.items():
        port = port_of(fleet.daemons[device_id])
        assert rows[device_id][:5] == [name, device_id, f"127.0.0.1:{port}", __version__, "yes"]
        assert "sensor-anomaly" in rows[device_id][5]


def test_plain_zeroconf_browser_sees_the_same_records(fleet: Fleet) -> None:
    """Standard DNS-SD: python-zeroconf alone reads our service and the _http._tcp one."""
    listed = by_id(discover_until(fleet.ns, lambda f: set(FLEET) <= set(by_id(f))))
    for service_type in (SERVICE_TYPE, HTTP_SERVICE_TYPE):
        with zeroconf_browser(fleet.ns, service_type) as browser:
            for device_id, (name, _) in FLEET.items():
                event = browser.wait(
                    lambda e, i=device_id: (
                        e["event"] in ("added", "updated") and e.get("txt", {}).get("id") == i
                    )
                )
                assert event["name"] == f"{name}.{service_type}"
                assert event["port"] == port_of(fleet.daemons[device_id])
                assert event["server"] == f"{device_id}.local."
                assert event["addresses"] == ["127.0.0.1"]
                assert event["txt"] == listed[device_id]["txt"]

    # The announced address and port are the daemon's: its health answers there.
    def health() -> int:
        url = f"http://{listed['alpha-1']['address']}:{listed['alpha-1']['port']}/health"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)

    assert fleet.ns.call(health) == 200


def test_a_stopped_daemon_says_goodbye(fleet: Fleet) -> None:
    with zeroconf_browser(fleet.ns, SERVICE_TYPE) as browser:
        leaving = start_daemon_in(
            fleet.ns, "--models-dir", str(DEFAULT_MODELS), env=_env("leaving-4", "Leaving")
        )
        try:
            leaving.wait_listening(60)
            browser.wait(lambda e: e.get("txt", {}).get("id") == "leaving-4")
        finally:
            assert leaving.stop() == 0
        assert any(
            "mDNS: withdrew Leaving._appliance._tcp.local." in line for line in leaving.log
        ), "\n".join(leaving.log)
        # A browser that saw it drops it at once: the records' TTLs are far from expiring.
        browser.wait(
            lambda e: e == {"event": "removed", "name": f"Leaving.{SERVICE_TYPE}"}, timeout=10
        )
    found = by_id(discover_until(fleet.ns, lambda f: set(FLEET) <= set(by_id(f))))
    assert "leaving-4" not in found


def _slow_model_repository(root: Path) -> Path:
    """Two models: ``a-slow`` whose checksum check reads a 1 TiB sparse file (loading until
    the test truncates it, then failing), and a copy of the default ``sensor-anomaly``."""
    slow = root / "a-slow"
    slow.mkdir(parents=True)
    with (slow / "model.onnx").open("wb") as fh:
        fh.truncate(1 << 40)
    (slow / "manifest.toml").write_text(
        f'name = "a-slow"\nruntime = "onnx"\nfile = "model.onnx"\nsha256 = "{"0" * 64}"\n'
    )
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", root / "b-sensor")
    return slow / "model.onnx"


@pytest.fixture
def slow_models(tmp_path: Path) -> Iterator[Path]:
    big = _slow_model_repository(tmp_path / "models")
    try:
        yield big
    finally:
        big.write_bytes(b"")  # never leave a daemon hashing a terabyte


def test_model_state_changes_update_the_txt_record(fleet: Fleet, slow_models: Path) -> None:
    big = slow_models
    with (
        zeroconf_browser(fleet.ns, SERVICE_TYPE) as browser,
        daemons_in(
            fleet.ns, [_env("changing-5", "Changing")], "--models-dir", str(big.parent.parent)
        ) as (daemon,),
    ):
        loading = browser.wait(lambda e: e.get("txt", {}).get("id") == "changing-5")
        assert loading["txt"]["ready"] == "0"
        assert loading["txt"]["models"] == "" and loading["txt"]["nmodels"] == "0"

        big.write_bytes(b"")  # the checksum read ends: a-slow fails, b-sensor loads
        ready = browser.wait(
            lambda e: (
                e["event"] == "updated"
                and e.get("txt", {}).get("id") == "changing-5"
                and e["txt"]["ready"] == "1"
            )
        )
        assert ready["txt"]["models"] == "sensor-anomaly"
        assert ready["txt"]["nmodels"] == "1"
        assert ready["port"] == port_of(daemon)
        found = by_id(discover_until(fleet.ns, lambda f: "changing-5" in by_id(f)))
        assert found["changing-5"]["ready"] is True
        assert found["changing-5"]["models"] == ["sensor-anomaly"]


def test_a_taken_name_gets_a_new_unique_one(fleet: Fleet) -> None:
    args = ("--models-dir", str(DEFAULT_MODELS))
    with daemons_in(fleet.ns, [_env("twin-6", "Twin")], *args) as (first,):
        discover_until(fleet.ns, lambda f: "twin-6" in by_id(f))
        with daemons_in(fleet.ns, [_env("twin-7", "Twin")], *args) as (second,):
            # Both devices, one name each: for a moment a browser may still hold a record
            # the renamed one announced before it saw the conflict.
            found = by_id(
                discover_until(
                    fleet.ns,
                    lambda f: (
                        sorted((e["id"], e["name"]) for e in f if e["id"].startswith("twin-"))
                        in (
                            [("twin-6", "Twin"), ("twin-7", "Twin-2")],
                            [("twin-6", "Twin-2"), ("twin-7", "Twin")],
                        )
                    ),
                )
            )
            assert found["twin-6"]["port"] == port_of(first)
            assert found["twin-7"]["port"] == port_of(second)
    renamed = {"twin-6": first, "twin-7": second}[
        next(i for i in ("twin-6", "twin-7") if found[i]["name"] == "Twin-2")
    ]
    # Mostly the newcomer's probe finds the name taken. Where several mDNS stacks share this
    # host's port 5353 (as here), the probe's unicast answer may reach another one; then
    # the conflict is seen after announcing and settled by the RFC 6762 tie-break.
    assert any(
        "the name 'Twin' is taken on the network; announcing as 'Twin-2'" in line
        or "also claims 'Twin'; choosing a new name" in line
        for line in renamed.log
    ), "\n".join(renamed.log)


def test_discover_with_nothing_on_the_network_prints_an_empty_list() -> None:
    with loopback("empty") as ns:
        result = discover(ns, timeout=0.5)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []
        table = discover(ns, timeout=0.5, json_output=False)
        assert table.returncode == 0
        assert table.stdout == ""
        assert "no appliances found" in table.stderr


def test_discover_names_an_interface_that_is_not_there() -> None:
    with loopback("noif") as ns:
        result = discover(ns, interfaces="lo,eth9")
        assert result.returncode == 2
        assert "eth9" in result.stderr
