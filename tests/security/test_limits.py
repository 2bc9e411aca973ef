"""Request limits: compression bombs, chunk counts, header sizes, slow bodies and slowloris."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from pathlib import Path

import aiohttp

from tests.conftest import base_url, make_config, serving

INFER = "/v2/models/sensor-anomaly/infer"


async def test_gzip_bomb_stops_at_the_body_limit(
    default_models: Path, http: aiohttp.ClientSession
) -> None:
    # 64 MiB of zeros squeeze into ~64 KiB: far under the limit on the wire, far over it
    # decoded.
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)
    config = make_config(models={"dir": str(default_models)}, http={"max_body_bytes": 1024 * 1024})
    async with serving(config) as server:
        started = time.monotonic()
        async with http.post(
            base_url(server) + INFER,
            data=bomb,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as response:
            body = await response.json()
        assert response.status == 413
        assert "larger than the limit of 1048576 bytes once decoded" in body["error"]
        assert time.monotonic() - started < 5
        # The box still serves.
        async with http.get(base_url(server) + "/health") as health:
            assert health.status == 200


def _exchange(
    port: int,
    request: bytes,
    *,
    trickle: bytes = b"",
    delay: float = 0.0,
    timeout: float = 10,
    until_close: bool = False,
) -> tuple[bytes, float]:
    """Send ``request``, then ``trickle`` a byte at a time; the answer and how long it took
    to come (``until_close``: until the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.monotonic()
        sock.sendall(request)
        data = b""
        try:
            for byte in trickle:
                sock.sendall(bytes([byte]))
                time.sleep(delay)
        except OSError:  # the server closed on us: what we are testing for
            pass
        while until_close or not _complete(data):
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        return data, time.monotonic() - started


def _complete(data: bytes) -> bool:
    head, found, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n") if found else ():
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


async def test_too_many_chunks(default_models: Path) -> None:
    config = make_config(models={"dir": str(default_models)}, limits={"max_chunks": 10})
    async with serving(config) as server:
        chunks = b"".join(b"1\r\n" + b" " + b"\r\n" for _ in range(50)) + b"0\r\n\r\n"
        request = (
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunks
        )
        answer, _ = await asyncio.to_thread(_exchange, server.port, request)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"more than 10 chunks" in answer
        few = b"".join(b"1\r\n" + b" " + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
        answer, _ = await asyncio.to_thread(_exchange, server.port, request.replace(chunks, few))
        assert answer.startswith(b"HTTP/1.1 400"), answer  # through to the handler: bad JSON


async def test_header_limits(default_models: Path) -> None:
    config = make_config(
        models={"dir": str(default_models)}, limits={"max_header_bytes": 2048, "max_headers": 20}
    )
    async with serving(config) as server:
        big = (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
            + b"a" * 4096
            + b"\r\nConnection: close\r\n\r\n"
        )
        answer, _ = await asyncio.to_thread(_exchange, server.port, big)
        assert answer.split(b" ")[1] in (b"400", b"431"), answer[:200]
        many = (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(40))
            + b"Connection: close\r\n\r\n"
        )
        answer, _ = await asyncio.to_thread(_exchange, server.port, many)
        assert answer.split(b" ")[1] in (b"400", b"431"), answer[:200]
        fine = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answer, _ = await asyncio.to_thread(_exchange, server.port, fine)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


async def test_slow_body_times_out_with_408(default_models: Path) -> None:
    config = make_config(models={"dir": str(default_models)}, limits={"request_timeout": 0.5})
    async with serving(config) as server:
        request = (
            b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer, took = await asyncio.to_thread(
            _exchange, server.port, request, trickle=b"       ", delay=0.3
        )
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert took < 5


async def test_slowloris_headers_and_idle_connections_are_closed(default_models: Path) -> None:
    config = make_config(models={"dir": str(default_models)}, limits={"idle_timeout": 1.0})
    async with serving(config) as server:
        # Headers one byte every 0.2 s, never finished: cut after about idle_timeout.
        header = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        answer, took = await asyncio.to_thread(
            _exchange, server.port, b"", trickle=header, delay=0.05, until_close=True
        )
        assert answer == b""
        assert took < 4
        # An idle keep-alive connection after a response is closed too.
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        answer, took = await asyncio.to_thread(_exchange, server.port, request, until_close=True)
        assert answer.startswith(b"HTTP/1.1 200")
        assert 0.5 < took < 4
