"""Allow-list, Host/Origin (DNS-rebinding) guard and rate limits, from real sockets.

127.0.0.0/8 is all loopback on Linux, so a client bound to 127.0.0.2 is a second source
address without any interface set-up.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.errors import Forbidden
from appliance.security.hosts import AllowList, HostGuard
from appliance.security.ratelimit import RateLimiter
from tests.conftest import base_url, make_config, serving
from tests.security.conftest import KEYS, bearer, secured_config


def _raw(
    port: int,
    request: bytes,
    *,
    source: str = "127.0.0.1",
    host: str = "127.0.0.1",
    timeout: float = 5,
) -> bytes:
    """Send ``request`` from ``source``; return what arrives until close or a full answer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((host, port))
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not _complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


async def test_allow_list_refuses_other_addresses_before_reading_the_body(
    default_models: Path,
) -> None:
    config = make_config(
        models={"dir": str(default_models)}, security={"allow": ["127.0.0.1/32", "::1/128"]}
    )
    async with serving(config) as server:
        port = server.port
        ok = await asyncio.to_thread(
            _raw, port, b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        assert _status(ok) == 200
        # A gigabyte announced, none sent: the answer must come without waiting for it.
        started = time.monotonic()
        refused = await asyncio.to_thread(
            _raw,
            port,
            b"POST /v2/models/sensor-anomaly/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{",
            source="127.0.0.2",
        )
        assert _status(refused) == 403
        assert b"127.0.0.2 is not allowed" in refused
        assert time.monotonic() - started < 3
        # Public routes are not exempt from the allow-list.
        health = await asyncio.to_thread(
            _raw,
            port,
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            source="127.0.0.3",
        )
        assert _status(health) == 403


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_allow_list_takes_ipv6_networks(default_models: Path) -> None:
    request = b"GET /v2 HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
    for allow, expected in ((["::1/128"], 200), (["fd00::/8", "127.0.0.0/8"], 403)):
        config = make_config(
            models={"dir": str(default_models)}, http={"host": "::1"}, security={"allow": allow}
        )
        async with serving(config) as server:
            answer = await asyncio.to_thread(_raw, server.port, request, source="::1", host="::1")
            assert _status(answer) == expected, allow


def test_ipv4_mapped_clients_match_ipv4_networks() -> None:
    allow = AllowList(["192.168.1.0/24"])
    allow.check("::ffff:192.168.1.20")
    with pytest.raises(Forbidden):
        allow.check("::ffff:192.168.2.20")
    with pytest.raises(Forbidden):
        allow.check(None)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", 200),
        ("127.0.0.1:8080", 200),
        ("[::1]:8080", 200),
        ("localhost", 200),
        ("greenhouse-3.local", 200),
        ("sensors.example.org", 200),
        ("a.b.example.org", 200),
        ("evil.example", 403),
        ("example.org.evil.example", 403),
        ("localhost.evil.example", 403),
        ("192.168.1.20.nip.io", 403),
    ],
)
async def test_host_header_must_name_the_box(
    default_models: Path, host: str, expected: int
) -> None:
    config = make_config(
        models={"dir": str(default_models)},
        device={"id": "greenhouse-3"},
        security={"allowed_hosts": ["sensors.example.org", "*.b.example.org"]},
    )
    async with serving(config) as server:
        request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        answer = await asyncio.to_thread(_raw, server.port, request.encode())
        assert _status(answer) == expected, answer


async def test_origin_of_another_site_is_refused(
    default_models: Path, http: aiohttp.ClientSession
) -> None:
    async with serving(make_config(models={"dir": str(default_models)})) as server:
        url = base_url(server)
        for origin, expected in (
            ("http://evil.example", 403),
            ("null", 403),
            (url, 200),
            ("http://appliance.local:8080", 200),
        ):
            async with http.post(
                url + "/v2/models/sensor-anomaly/infer", data=b"{}", headers={"Origin": origin}
            ) as response:
                assert (response.status == 403) == (expected == 403), origin
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url + "/ws", origin="http://evil.example")
        assert refused.value.status == 403


def test_host_guard_unit() -> None:
    guard = HostGuard({"box", "box.local"}, ["*"])
    guard.check("anything.example")  # '*' turns the check off
    guard = HostGuard({"box"})
    assert guard.accepts("BOX.") and guard.accepts("fe80::1") and guard.accepts("x.localhost")
    assert not guard.accepts("box.evil")


# ------------------------------------------------------------------------ rate limits


def test_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0], max_buckets=2)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    limiter.take("b")
    limiter.take("c")  # evicts "a", the least recently used: memory stays bounded
    assert len(limiter._buckets) == 2
    assert RateLimiter(0, 1).take("x") == 0.0  # 0: no limit


async def test_rate_limit_per_client_address(default_models: Path) -> None:
    config = make_config(
        models={"dir": str(default_models)},
        security={"rate_per_client": 0.5, "burst_per_client": 3},
    )
    async with serving(config) as server:
        request = b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answers = [await asyncio.to_thread(_raw, server.port, request) for _ in range(4)]
        assert [_status(a) for a in answers] == [200, 200, 200, 429]
        assert b"Retry-After: 2\r\n" in answers[3]
        # Another address has its own bucket.
        other = await asyncio.to_thread(_raw, server.port, request, source="127.0.0.5")
        assert _status(other) == 200


async def test_rate_limit_per_key(default_models: Path, http: aiohttp.ClientSession) -> None:
    config = secured_config(default_models, security={"rate_per_key": 0.2, "burst_per_key": 2})
    async with serving(config) as server:
        url = base_url(server) + "/v1/models"
        statuses = []
        for _ in range(3):
            async with http.get(url, headers=bearer("read")) as response:
                statuses.append(response.status)
                retry = response.headers.get("Retry-After")
                body: Any = await response.json()
        assert statuses == [200, 200, 429]
        assert retry == "5"
        assert body["error"]["type"] == "rate_limit_error"
        async with http.get(url, headers={"X-API-Key": KEYS["admin"]}) as response:
            assert response.status == 200  # another key, another bucket
