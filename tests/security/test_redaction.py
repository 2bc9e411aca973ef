"""Log hygiene: secrets, personal data and forged lines through every logged field.

A real daemon subprocess logs at debug level (aiohttp's access log included: request line,
query string, Referer, User-Agent) while requests carry secrets and CR/LF/ANSI in every
place a client controls. Its whole output must hold none of them and no forged line.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
from pathlib import Path

import aiohttp
import pytest

from appliance.security.redact import REDACTED, RedactingFilter, SafeFormatter, clean
from tests.conftest import daemon
from tests.security.conftest import KEYS, keys_toml

SECRETS = [
    KEYS["admin"],
    KEYS["read"],
    "apk_stolen-0123456789abcdefghijklmnop",
    "aph_devicetoken0123456789abcdefghijk",
    "sk-openai0123456789abcdefghijklmn",
    "hunter2-password",
    "alice.smith@example.com",
    "+44 20 7946 0958",
    "555-867-5309",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2ln",
]
FORGED = "FORGED appliance.core: admin logged in"


@pytest.mark.parametrize("text", SECRETS)
def test_each_secret_is_redacted(text: str) -> None:
    # A password has no shape of its own: it is found by what stands before it.
    bare = [] if text == "hunter2-password" else [text]
    for line in (
        *bare,
        f"key={text}",
        f'{{"token": "{text}"}}',
        f"Authorization: Bearer {text}",
        f"x-api-key: {text}",
        f"see postgresql://user:{text}@db/x",
    ):
        cleaned = clean(line)
        assert text not in cleaned, line
        assert REDACTED in cleaned


def test_ordinary_text_is_kept() -> None:
    for text in (
        "model 'stories260K' loaded in 0.12 s",
        "listening on http://127.0.0.1:8080",
        '127.0.0.1 [27/Nov/2025:10:00:00 +0000] "GET /health HTTP/1.1" 200 512',
        "2025-11-27 10:00:00,123 tensor [1, 32, 3] FP32 version 1.2.3",
        "device appliance-0123456789ab, 1234567890 bytes, 192.168.1.20",
    ):
        assert clean(text) == text


def test_control_characters_cannot_forge_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for bad in (
            f"x\n{FORGED}",
            f"x\r{FORGED}",
            f"x\r\n{FORGED}",
            f"\x1b[2K\r{FORGED}",
            f"x\u2028{FORGED}",
            f"x\x85{FORGED}",
        ):
            logger.warning("client said %s", bad)
        try:
            raise ValueError(f"bad input\n{FORGED} {KEYS['admin']}")
        except ValueError:
            logger.exception("request failed for %s", f"a\n{FORGED}")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    for line in out.splitlines():
        assert not line.startswith("FORGED"), line
        assert line.startswith(("WARNING", "ERROR", "    ")), line
    assert "\x1b" not in out and "\r" not in out and KEYS["admin"] not in out


def test_daemon_output_holds_no_secret_and_no_forged_line(
    default_models: Path, tmp_path: Path
) -> None:
    (tmp_path / "appliance.toml").write_text(keys_toml())
    args = (
        "--config",
        str(tmp_path / "appliance.toml"),
        "--models-dir",
        str(default_models),
        "--log-level",
        "debug",
    )
    with daemon(*args, env={"APPLIANCE_SECURITY__AUTH": "on"}) as proc:
        import asyncio

        asyncio.run(_hostile_requests(proc.url))
    text = "\n".join(proc.log)
    assert "GET /v2" in text  # the access log was on: the fields did reach the log
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into the log"
    for line in proc.log:
        assert not line.startswith("FORGED"), line
        assert "\x1b" not in line and "\r" not in line


async def _hostile_requests(url: str) -> None:
    crlf = f"\r\n{FORGED}\x1b[31m"
    quoted = urllib.parse.quote(crlf + " " + SECRETS[6])
    async with aiohttp.ClientSession() as http:
        # Secrets in every header a client controls and in the query string.
        headers_list = [
            {"Authorization": f"Bearer {SECRETS[2]}"},
            {"X-API-Key": SECRETS[3]},
            {"Authorization": f"Basic {SECRETS[5]}"},
            {
                "Authorization": f"Bearer {KEYS['admin']}",
                "User-Agent": f"ua {SECRETS[6]} {SECRETS[7]}",
                "Referer": f"http://x/?token={SECRETS[4]}&mail={SECRETS[6]}",
            },
        ]
        for headers in headers_list:
            async with http.get(url + "/v2", headers=headers) as response:
                await response.read()
        for path in (
            f"/v2?api_key={SECRETS[0]}&phone={urllib.parse.quote(SECRETS[8])}",
            f"/v2/models/{quoted}",
            f"/no/such/{quoted}?password={SECRETS[5]}",
            f"/v1/models/{quoted}",
        ):
            async with http.get(url + path, headers={"X-API-Key": KEYS["admin"]}) as response:
                await response.read()
        # Bodies: model names, prompts and ids with secrets and CR/LF.
        bodies = [
            (
                "/v1/chat/completions",
                {
                    "model": crlf + SECRETS[6],
                    "messages": [
                        {"role": "user", "content": f"my mail is {SECRETS[6]}, key {SECRETS[0]}"}
                    ],
                },
            ),
            (
                "/v2/models/sensor-anomaly/infer",
                {
                    "id": crlf + SECRETS[9],
                    "inputs": [
                        {"name": crlf, "datatype": "FP32", "shape": [1], "data": [SECRETS[7]]}
                    ],
                },
            ),
            ("/api/generate", {"model": SECRETS[4], "prompt": SECRETS[5]}),
        ]
        for path, body in bodies:
            async with http.post(
                url + path, data=json.dumps(body), headers={"X-API-Key": KEYS["admin"]}
            ) as response:
                await response.read()
        async with http.ws_connect(url + "/ws", headers={"X-API-Key": KEYS["admin"]}) as ws:
            await ws.send_str(
                json.dumps({"type": "infer", "id": crlf + SECRETS[6], "model": crlf + SECRETS[9]})
            )
            await ws.receive()
            await ws.send_str(crlf + SECRETS[0])  # not JSON at all
            await ws.receive()
