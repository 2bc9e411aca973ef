"""Trusted proxies: X-Forwarded-For / Forwarded name the client only when a configured
proxy sent them, for the allow-list, rate limits and the access log. Real sockets from
several loopback addresses (127.0.0.0/8 is all loopback): 127.0.0.2 and 127.0.0.3 play
the proxies, 127.0.0.1 a client that talks to the box directly."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from appliance.security.proxies import TrustedProxies
from tests.conftest import make_config, serving
from tests.security.test_network import _raw, _status

PROXIES = ["127.0.0.2/32", "127.0.0.3/32"]


def _get(port: int, *headers: str, source: str = "127.0.0.2", path: str = "/v2") -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}Connection: close\r\n\r\n"
    return _raw(port, request.encode(), source=source)


def _config(default_models: Path, **security: Any) -> Any:
    return make_config(models={"dir": str(default_models)}, security=security)


async def test_allow_list_sees_the_forwarded_client_only_behind_a_trusted_proxy(
    default_models: Path,
) -> None:
    config = _config(default_models, allow=["10.0.0.0/8"], trusted_proxies=PROXIES)
    async with serving(config) as server:
        port = server.port

        async def get(*headers: str, source: str = "127.0.0.2") -> bytes:
            return await asyncio.to_thread(_get, port, *headers, source=source)

        assert _status(await get("X-Forwarded-For: 10.1.2.3")) == 200
        # Two trusted proxies in a row: the first address that is not one is the client.
        assert _status(await get("X-Forwarded-For: 10.1.2.3, 127.0.0.3")) == 200
        # A client writing its own header: the proxy appends the real address, and only
        # that counts; what the client wrote further left is never read.
        spoofed = await get("X-Forwarded-For: 10.1.2.3, 192.168.7.7")
        assert _status(spoofed) == 403 and b"192.168.7.7 is not allowed" in spoofed
        # Not a trusted proxy: its header is ignored, its own address counts.
        direct = await get("X-Forwarded-For: 10.1.2.3", source="127.0.0.1")
        assert _status(direct) == 403 and b"127.0.0.1 is not allowed" in direct
        # A proxy that forwarded nothing is itself the client.
        assert _status(await get()) == 403
        # A client the proxy could not name is unknown, never the proxy's address.
        unknown = await get("X-Forwarded-For: unknown")
        assert _status(unknown) == 403 and b"unknown is not allowed" in unknown
        # Only the configured header is read.
        assert _status(await get("Forwarded: for=10.1.2.3")) == 403


async def test_forwarded_header_when_configured(default_models: Path) -> None:
    config = _config(
        default_models,
        allow=["10.0.0.0/8", "fd00::/8"],
        trusted_proxies=PROXIES,
        forwarded_header="forwarded",
    )
    async with serving(config) as server:
        port = server.port
        cases = [
            ('Forwarded: for="10.1.2.3:5555";proto=https, for=127.0.0.3', 200),
            ('Forwarded: for="[fd00::17]:4711"', 200),
            ("Forwarded: for=10.1.2.3", 200),
            # Two lines are one list; the last element is the client here.
            ("Forwarded: for=10.1.2.3\r\nForwarded: for=192.168.7.7", 403),
            ("Forwarded: for=_hidden", 403),
            ("Forwarded: proto=https", 403),  # no for=: a hop that named nobody
            ("X-Forwarded-For: 10.1.2.3", 403),
        ]
        for header, expected in cases:
            answer = await asyncio.to_thread(_get, port, header)
            assert _status(answer) == expected, header


async def test_rate_limits_count_the_forwarded_client(default_models: Path) -> None:
    limits = {"rate_per_client": 0.001, "burst_per_client": 1}
    async with serving(_config(default_models, trusted_proxies=PROXIES, **limits)) as server:
        port = server.port
        statuses = [
            _status(await asyncio.to_thread(_get, port, f"X-Forwarded-For: {client}"))
            for client in ("10.0.0.1", "10.0.0.1", "10.0.0.2")
        ]
        assert statuses == [200, 429, 200]  # one bucket per client, not one for the proxy
    async with serving(_config(default_models, **limits)) as server:  # no trusted proxy
        port = server.port
        statuses = [
            _status(await asyncio.to_thread(_get, port, f"X-Forwarded-For: {client}"))
            for client in ("10.0.0.1", "10.0.0.2")
        ]
        assert statuses == [200, 429]  # the header is ignored: both are 127.0.0.2


async def test_access_log_names_the_forwarded_client(
    default_models: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    async with serving(_config(default_models, trusted_proxies=PROXIES)) as server:
        await asyncio.to_thread(
            _get, server.port, "X-Forwarded-For: 10.9.8.7", path="/v2/health/live"
        )
        await asyncio.to_thread(
            _get,
            server.port,
            "X-Forwarded-For: 10.9.8.6",
            source="127.0.0.1",
            path="/v2/health/ready",
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(line.startswith('10.9.8.7 "GET /v2/health/live HTTP/1.1" 200') for line in lines)
    assert any(line.startswith('127.0.0.1 "GET /v2/health/ready') for line in lines), lines
    assert not any("10.9.8.6" in line for line in lines)


def test_client_resolution() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
    assert proxies.client("10.0.0.1", ["203.0.113.5"]) == "203.0.113.5"
    assert proxies.client("10.0.0.1", ["203.0.113.5:4711"]) == "203.0.113.5"
    assert proxies.client("10.0.0.1", ["[2001:db8::1]:80"]) == "2001:db8::1"
    assert proxies.client("10.0.0.1", ["2001:db8::1"]) == "2001:db8::1"
    assert proxies.client("::ffff:10.0.0.1", ["203.0.113.5"]) == "203.0.113.5"
    assert proxies.client("fd00::9", ["1.1.1.1, 203.0.113.5", "10.0.0.7"]) == "203.0.113.5"
    assert proxies.client("10.0.0.1", ["10.0.0.9, 10.0.0.8"]) == "10.0.0.9"  # all proxies
    assert proxies.client("10.0.0.1", ["garbage, 10.0.0.8"]) == "unknown"
    assert proxies.client("10.0.0.1", []) == "10.0.0.1"
    assert proxies.client("192.0.2.1", ["203.0.113.5"]) == "192.0.2.1"  # not a proxy
    assert TrustedProxies([]).client("10.0.0.1", ["203.0.113.5"]) == "10.0.0.1"
    rfc = TrustedProxies(["10.0.0.0/8"], "forwarded")
    assert rfc.header == "Forwarded"
    assert rfc.client("10.0.0.1", ["for=192.0.2.60;proto=http;by=203.0.113.43"]) == "192.0.2.60"
    assert (
        rfc.client("10.0.0.1", ['for="_gazonk", For="[2001:db8:cafe::17]:4711"'])
        == "2001:db8:cafe::17"
    )
    assert rfc.client("10.0.0.1", ['for="a,b";by=x, for=10.0.0.2']) == "unknown"


def test_the_hub_trusts_the_same_way(tmp_path: Path) -> None:
    from tests.hub.conftest import hub

    env = {
        "APPLIANCE_HUB_SECURITY__ALLOW": "10.0.0.0/8",
        "APPLIANCE_HUB_SECURITY__TRUSTED_PROXIES": "127.0.0.2/32",
    }
    with hub(f"sqlite:///{tmp_path / 'hub.db'}", env=env) as process:
        port = int(process.url.rsplit(":", 1)[1])
        forwarded = "X-Forwarded-For: 10.1.2.3"
        assert _status(_get(port, forwarded, path="/health")) == 200
        assert _status(_get(port, forwarded, source="127.0.0.1", path="/health")) == 403
