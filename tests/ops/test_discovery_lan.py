"""mDNS across a LAN: daemons and browsers on different hosts of one bridged segment.

Each host is a network namespace with an ``eth0`` veth plugged into a bridge (in a switch
namespace of its own), so announcements cross a real link: the daemons bind 0.0.0.0 and
announce their own ``eth0`` address, the browsers run on a third host.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from appliance.protocol.dnssd import SERVICE_TYPE
from tests.conftest import DEFAULT_MODELS
from tests.ops.netns import (
    Lan,
    Netns,
    assert_no_new_threads,
    daemons_in,
    discover,
    lan,
    port_of,
    thread_names,
    zeroconf_browser,
)

ARGS = ("--models-dir", str(DEFAULT_MODELS))


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = thread_names()
    yield
    assert_no_new_threads(before)


def _env(device_id: str, name: str, **extra: str) -> dict[str, str]:
    # These daemons serve 0.0.0.0 inside a namespace; API keys (tests/security) would make
    # them generate one into the machine's own state directory.
    return {
        "APPLIANCE_DEVICE__ID": device_id,
        "APPLIANCE_DEVICE__NAME": name,
        "APPLIANCE_MDNS__INTERFACES": "eth0",
        "APPLIANCE_SECURITY__AUTH": "off",
        **extra,
    }


def discover_until(
    ns: Netns, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = discover(ns, interfaces="eth0")
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        if predicate(found):
            return found
    raise AssertionError(f"discover never matched; last saw {found}")


def ids(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["id"]: entry for entry in found}


def test_appliances_on_other_hosts_are_found_with_their_lan_address() -> None:
    with lan("lan", 3) as net:
        browser_host = net.hosts[2]
        with (
            daemons_in(net.hosts[0], [_env("left-1", "Left")], *ARGS, host="0.0.0.0") as (left,),
            daemons_in(net.hosts[1], [_env("right-2", "Right")], *ARGS, host="0.0.0.0") as (right,),
            zeroconf_browser(browser_host, SERVICE_TYPE, net.addresses[2]) as plain,
        ):
            found = ids(
                discover_until(
                    browser_host,
                    lambda f: {"left-1", "right-2"} <= {e["id"] for e in f if e["ready"]},
                )
            )
            for device_id, daemon, address in (
                ("left-1", left, net.addresses[0]),
                ("right-2", right, net.addresses[1]),
            ):
                entry = found[device_id]
                assert entry["addresses"] == [address]  # its eth0, never 127.0.0.1
                assert entry["port"] == port_of(daemon)
                assert entry["url"] == f"http://{address}:{port_of(daemon)}"
                event = plain.wait(
                    lambda e, i=device_id: (
                        e.get("txt", {}).get("id") == i and e["txt"]["ready"] == "1"
                    )
                )
                assert (event["addresses"], event["port"]) == ([address], port_of(daemon))
                assert event["txt"] == entry["txt"]

            # A client on the third host reaches each appliance where it was announced.
            def health(url: str) -> int:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    return int(resp.status)

            for entry in found.values():
                assert browser_host.call(lambda u=entry["url"]: health(u)) == 200

            left.stop()
            plain.wait(
                lambda e: e == {"event": "removed", "name": f"Left.{SERVICE_TYPE}"}, timeout=10
            )
            after = ids(discover_until(browser_host, lambda f: "left-1" not in ids(f)))
            assert set(after) == {"right-2"}


def test_two_boxes_that_booted_apart_with_one_name_settle_on_two() -> None:
    """Both announce "Twin" while unplugged (probing finds no one); once on the same
    segment, the RFC 6762 tie-break renames exactly one of them."""
    with lan("twin", 3, plugged=False) as net:
        net.plug(2)  # the browser's host
        with (
            daemons_in(net.hosts[0], [_env("twin-a", "Twin")], *ARGS, host="0.0.0.0") as (a,),
            daemons_in(net.hosts[1], [_env("twin-b", "Twin")], *ARGS, host="0.0.0.0") as (b,),
        ):
            for daemon in (a, b):
                _wait_log(daemon.log, "mDNS: announcing Twin._appliance._tcp.local.")
            net.plug(0)
            net.plug(1)
            found = ids(
                discover_until(
                    net.hosts[2],
                    lambda f: (
                        sorted(e["name"] for e in f) == ["Twin", "Twin-2"] and len(ids(f)) == 2
                    ),
                )
            )
            # RFC 6762 §8.2 compares the SRV data: port first, then the host name (both names
            # have one length, so as strings). The later one keeps the name.
            daemons = {"twin-a": a, "twin-b": b}
            winner, loser = sorted(daemons, key=lambda i: (port_of(daemons[i]), i), reverse=True)
            assert found[winner]["name"] == "Twin"
            assert found[loser]["name"] == "Twin-2"
            assert any(
                f"{winner}.local. (port {port_of(daemons[winner])}) also claims 'Twin'; "
                "choosing a new name" in line
                for line in daemons[loser].log
            )
            assert not any("choosing a new name" in line for line in daemons[winner].log)


def test_an_address_that_comes_later_is_announced(lan_with_late_address: Lan) -> None:
    net = lan_with_late_address
    with daemons_in(
        net.hosts[0],
        [_env("late-1", "Late", APPLIANCE_MDNS__RESCAN_INTERVAL="0.2")],
        *ARGS,
        host="0.0.0.0",
    ) as (late,):
        _wait_log(late.log, "have no IPv4 address")
        net.hosts[0].ip("addr", "add", f"{net.addresses[0]}/24", "dev", "eth0")
        found = ids(discover_until(net.hosts[1], lambda f: "late-1" in ids(f)))
        assert found["late-1"]["addresses"] == [net.addresses[0]]
        assert found["late-1"]["port"] == port_of(late)


@pytest.fixture
def lan_with_late_address() -> Iterator[Lan]:
    """Two hosts; the first has no IPv4 address yet (its DHCP lease has not come)."""
    with lan("late", 2) as net:
        net.hosts[0].ip("addr", "del", f"{net.addresses[0]}/24", "dev", "eth0")
        yield net


def _wait_log(log: list[str], text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in log):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n" + "\n".join(log))
        time.sleep(0.05)
