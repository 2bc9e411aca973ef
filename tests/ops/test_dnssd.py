"""The DNS-SD contract without a network: TXT records, names, [mdns] config, the pool."""

from __future__ import annotations

import dataclasses

import pytest
from zeroconf import ServiceInfo

from appliance import config as config_mod
from appliance.client import AppliancePool, NoApplianceAvailable
from appliance.errors import ConfigError
from appliance.ops.discover_cli import table
from appliance.protocol.dnssd import (
    MAX_TXT_RECORD,
    MAX_TXT_STRING,
    SERVICE_TYPE,
    Announcement,
    Appliance,
    appliance_from_info,
    build_txt,
    instance_name,
    parse_interface_list,
    resolve_interfaces,
)


def _txt_size(txt: dict[str, str]) -> int:
    return sum(1 + len(f"{k}={v}".encode()) for k, v in txt.items())


def test_txt_record_carries_what_clients_need() -> None:
    txt = build_txt(
        Announcement(
            device_id="box-1",
            version="1.2.3",
            ready=True,
            models=["a", "b"],
            tls=True,
            api_key_required=True,
            websocket=True,
            grpc_port=8081,
            mqtt_topic_base="appliance/box-1",
        )
    )
    assert txt == {
        "txtvers": "1",
        "id": "box-1",
        "version": "1.2.3",
        "api": "openai,oip-v2,ollama,ws,grpc,mqtt",
        "openai": "/v1",
        "oip": "/v2",
        "ollama": "/api",
        "ws": "/ws",
        "grpc": "8081",
        "mqtt": "appliance/box-1",
        "health": "/health",
        "path": "/docs",
        "tls": "1",
        "auth": "apikey",
        "ready": "1",
        "nmodels": "2",
        "models": "a,b",
    }
    plain = build_txt(Announcement(device_id="box-1", version="1", ready=False))
    assert plain["api"] == "openai,oip-v2,ollama"
    assert not {"ws", "grpc", "mqtt"} & set(plain)
    assert (plain["tls"], plain["auth"], plain["ready"], plain["models"]) == ("0", "none", "0", "")

    info = ServiceInfo(
        SERVICE_TYPE,
        f"Box.{SERVICE_TYPE}",
        port=8080,
        properties=txt,
        server="box-1.local.",
        parsed_addresses=["10.0.0.2"],
    )
    a = appliance_from_info(info)
    assert a is not None
    assert a.protocols == ("openai", "oip-v2", "ollama", "ws", "grpc", "mqtt")
    assert a.paths == {
        "openai": "/v1",
        "oip": "/v2",
        "ollama": "/api",
        "ws": "/ws",
        "health": "/health",
        "path": "/docs",
    }
    assert (a.grpc_port, a.mqtt_topic_base, a.tls, a.auth) == (
        8081,
        "appliance/box-1",
        True,
        "apikey",
    )
    assert a.url == "https://10.0.0.2:8080"


def test_a_long_model_list_is_trimmed_to_whole_names_within_the_limits() -> None:
    names = [f"model-number-{i:03d}-q4_k_m" for i in range(100)]
    txt = build_txt(Announcement(device_id="box-1", version="1", ready=True, models=names))
    listed = txt["models"].split(",")
    assert listed == names[: len(listed)] and 5 < len(listed) < 100
    assert len(f"models={txt['models']}".encode()) <= MAX_TXT_STRING
    assert _txt_size(txt) <= MAX_TXT_RECORD
    assert txt["nmodels"] == "100"

    info = ServiceInfo(
        SERVICE_TYPE,
        f"Box.{SERVICE_TYPE}",
        port=8080,
        properties=txt,
        server="box-1.local.",
        parsed_addresses=["192.168.1.20"],
    )
    appliance = appliance_from_info(info)
    assert appliance is not None
    assert not appliance.models_complete and appliance.model_count == 100
    assert appliance.serves(names[0]) and not appliance.serves(names[-1])


def test_a_resolved_service_becomes_an_appliance() -> None:
    txt = build_txt(
        Announcement(device_id="box-1", version="1.2.3", ready=True, models=["sensor-anomaly"])
    )
    info = ServiceInfo(
        SERVICE_TYPE,
        f"Green house.{SERVICE_TYPE}",
        port=8080,
        properties=txt,
        server="box-1.local.",
        parsed_addresses=["127.0.0.1", "fe80::1", "192.168.1.20"],
    )
    a = appliance_from_info(info)
    assert a is not None
    assert (a.name, a.device_id, a.host, a.port, a.version) == (
        "Green house",
        "box-1",
        "box-1.local.",
        8080,
        "1.2.3",
    )
    assert a.address == "192.168.1.20"  # LAN IPv4 before loopback and link-local
    assert a.url == "http://192.168.1.20:8080"
    assert a.openai_base_url == "http://192.168.1.20:8080/v1"
    assert a.serves("sensor-anomaly") and not a.serves("other")
    assert a.to_json()["txt"] == txt
    not_ours = ServiceInfo(SERVICE_TYPE, f"X.{SERVICE_TYPE}", port=80, properties={"a": "b"})
    assert appliance_from_info(not_ours) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Greenhouse 3", "Greenhouse 3"),
        ("  tabs\tand\nnewlines ", "tabs and newlines"),
        ("", "appliance"),
        ("é" * 40, "é" * 31),  # 63 bytes at most, never half a character
    ],
)
def test_instance_names_are_one_printable_label(name: str, expected: str) -> None:
    assert instance_name(name) == expected
    assert len(instance_name(name).encode()) <= 63


def test_mdns_config_defaults_environment_and_errors() -> None:
    default = config_mod.load(env={})
    assert default.mdns.enabled is True
    assert default.mdns.interfaces == []  # every non-loopback interface
    cfg = config_mod.load(
        env={"APPLIANCE_MDNS__ENABLED": "false", "APPLIANCE_MDNS__INTERFACES": "lo, 127.0.0.1,eth0"}
    )
    assert cfg.mdns.enabled is False
    assert cfg.mdns.interfaces == ["lo", "127.0.0.1", "eth0"]
    with pytest.raises(ConfigError, match=r"mdns.interfaces = \['eth 0'\].*APPLIANCE_MDNS"):
        config_mod.load(env={"APPLIANCE_MDNS__INTERFACES": "eth 0"})
    with pytest.raises(ConfigError, match=r"mdns\.rescan_interval"):
        config_mod.load(overrides={"mdns": {"rescan_interval": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        config_mod.load(overrides={"mdns": {"interface": ["lo"]}})
    assert "| `interfaces` | `APPLIANCE_MDNS__INTERFACES` |" in config_mod.reference()


def test_interfaces_resolve_by_name_or_address() -> None:
    """Reads this machine's interface list; announces nothing."""
    assert resolve_interfaces(["lo"]).addresses == ("127.0.0.1",)
    assert resolve_interfaces(["127.0.0.1"]).addresses == ("127.0.0.1",)
    missing = resolve_interfaces(["lo", "no-such-if0", "192.0.2.254"])
    assert missing.addresses == ("127.0.0.1",)
    assert missing.missing == ("no-such-if0", "192.0.2.254")
    assert "127.0.0.1" not in resolve_interfaces([]).addresses
    assert parse_interface_list(" lo,, eth0 ") == ["lo", "eth0"]


def _appliance(
    device_id: str, *, ready: bool = True, models: tuple[str, ...] = ("m",), port: int = 8080
) -> Appliance:
    return Appliance(
        name=device_id.title(),
        service=f"{device_id.title()}.{SERVICE_TYPE}",
        device_id=device_id,
        host=f"{device_id}.local.",
        addresses=("10.0.0.1",),
        port=port,
        version="1",
        ready=ready,
        models=models,
        model_count=len(models),
        protocols=("openai", "oip-v2"),
        tls=False,
        auth="none",
        mqtt_topic_base=None,
    )


def test_pool_picks_ready_servers_of_a_model_least_busy_first() -> None:
    pool = AppliancePool()
    for a in (
        _appliance("a"),
        _appliance("b"),
        _appliance("c", ready=False),
        _appliance("d", models=("other",)),
    ):
        pool.upsert(a)
    assert [a.device_id for a in pool.candidates("m")] == ["a", "b"]
    picks = [pool.pick("m").device_id for _ in range(4)]
    assert picks in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
    with pool.lease("m") as held:
        assert pool.outstanding(held) == 1
        assert {pool.pick("m").device_id for _ in range(3)} == {"a", "b"} - {held.device_id}
    assert pool.outstanding(held) == 0
    with pytest.raises(NoApplianceAvailable) as exc:
        pool.pick("missing")
    assert isinstance(exc.value, LookupError) and exc.value.model == "missing"

    # A connection failure passes the appliance over while another serves.
    with pytest.raises(ConnectionRefusedError), pool.lease("m") as failing:
        raise ConnectionRefusedError
    (other,) = {"a", "b"} - {failing.device_id}
    assert {pool.pick("m").device_id for _ in range(3)} == {other}
    pool.remove(f"{other.title()}.{SERVICE_TYPE}")
    assert pool.pick("m").device_id == failing.device_id  # better than nothing

    # A re-announcement (new port, say) replaces the entry and clears the mark.
    pool.upsert(dataclasses.replace(_appliance(failing.device_id), port=9090))
    assert pool.pick("m").port == 9090


def test_pool_wait_until_times_out_with_a_timeout_error() -> None:
    pool = AppliancePool()
    with pytest.raises(TimeoutError):
        pool.wait_until(lambda apps: bool(apps), timeout=0.05)


def test_discover_table_lines_up() -> None:
    rows = table([_appliance("a", models=("x", "y")), _appliance("long-name", ready=False)])
    lines = rows.splitlines()
    assert lines[0].split() == ["NAME", "ID", "ADDRESS", "VERSION", "READY", "MODELS"]
    assert lines[1].split() == ["A", "a", "10.0.0.1:8080", "1", "yes", "x,y"]
    assert lines[2].split() == ["Long-Name", "long-name", "10.0.0.1:8080", "1", "no", "m"]
    starts = {line.index("10.0.0.1") for line in lines[1:]}
    assert len(starts) == 1 and lines[0].index("ADDRESS") in starts
