"""Framing built to fill the log, against a real daemon process with raw sockets.

A body that says ``Content-Encoding: gzip`` but is not gzip, and a header holding a NUL
byte, are 400s; the log gets one WARNING line for them at most (rate-limited), never a
traceback, however often a client sends them.
"""

from __future__ import annotations

import logging
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, daemon


@pytest.fixture(scope="module")
def appliance(default_models: Path) -> Iterator[DaemonProcess]:
    with daemon("--models-dir", str(default_models)) as proc:
        yield proc


def _raw(url: str, request: bytes) -> bytes:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


NOT_GZIP = b"this is not gzip data"
BAD_GZIP = (
    b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
    b"application/json\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(NOT_GZIP), NOT_GZIP)
)
NUL_HEADER = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Evil: a\x00b\r\n\r\n"


def _new_lines(proc: DaemonProcess, seen: int, settle: float = 1.0) -> list[str]:
    time.sleep(settle)  # the log is read by a thread; let it catch up
    return [line for line in proc.log[seen:] if "aiohttp.access" not in line]


@pytest.mark.parametrize(
    ("case", "request_bytes", "needle"),
    [
        ("not-gzip", BAD_GZIP, b"cannot be decoded"),
        ("nul-in-header", NUL_HEADER, b"Invalid header value char"),
    ],
)
def test_bad_framing_is_a_400_and_one_warning_line_at_most(
    appliance: DaemonProcess, case: str, request_bytes: bytes, needle: bytes
) -> None:
    seen = len(appliance.log)
    for _ in range(20):
        answer = _raw(appliance.url, request_bytes)
        assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer
        assert needle in answer, answer
    lines = _new_lines(appliance, seen)
    assert not [line for line in lines if "Traceback" in line or "ERROR" in line], lines
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) <= 1, warnings
    assert len(lines) <= 1, lines  # no continuation lines of a traceback either
    # The daemon still serves.
    with urllib.request.urlopen(appliance.url + "/health", timeout=10) as response:
        assert response.status == 200


def test_server_log_keeps_real_faults_and_counts_what_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from appliance.transports.http.serverlog import ServerLog

    now = [0.0]
    log = ServerLog(logging.getLogger("test.serverlog"), interval=60, clock=lambda: now[0])
    # aiohttp's request handler calls logger.exception(..., exc_info=exc) outside any
    # except block, as here.
    report = log.exception
    with caplog.at_level(logging.DEBUG, "test.serverlog"):
        for _ in range(5):
            report("Error handling request from %s", "x", exc_info=BadHttpMessage("a\nb"))
        now[0] = 61.0
        report("Error handling request", exc_info=BadHttpMessage("again"))
        report("Unhandled exception", exc_info=RuntimeError("a bug of ours"))
    records = caplog.records
    assert [r.levelname for r in records] == ["WARNING", "WARNING", "ERROR"]
    assert records[0].getMessage().endswith(": a b")
    assert "4 more like it" in records[1].getMessage()
    assert records[0].exc_info is None and records[1].exc_info is None
    assert records[2].exc_info is not None  # our own faults keep their traceback
