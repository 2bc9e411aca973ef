"""Numbers built to break the JSON reader, against a real daemon process and a real hub
process, with a real HTTP client.

A JSON integer longer than Python's int-string limit (4,300 digits) is a 400 naming the
problem on every JSON route, never a 500 (which would also count towards the critical
``http_5xx`` alert).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, daemon
from tests.hub.conftest import enroll_direct, hub

LLM = "stories260K"
ONNX = "sensor-anomaly"
DIGITS = 5000  # beyond sys.get_int_max_str_digits() (4,300 by default)
HUGE = b"1" + b"0" * DIGITS


@pytest.fixture(scope="module")
def appliance(default_models: Path, stories_gguf: Path) -> Iterator[DaemonProcess]:
    with daemon(
        "--models-dir", str(default_models), "--model", str(stories_gguf), timeout=120
    ) as proc:
        yield proc


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _message(body: Any) -> str:
    error = body["error"]
    return str(error["message"] if isinstance(error, dict) else error)


# Every route of the daemon that reads a JSON body, with a body that is valid in all but
# the one huge integer (the example found by the hostile pass).
JSON_ROUTES: dict[str, bytes] = {
    "/v1/chat/completions": b'{"model": "%s", "messages": [], "max_tokens": %s}'
    % (LLM.encode(), HUGE),
    "/v1/completions": b'{"model": "%s", "prompt": "Once", "max_tokens": %s}'
    % (LLM.encode(), HUGE),
    "/v1/embeddings": b'{"model": "%s", "input": "hi", "dimensions": %s}' % (LLM.encode(), HUGE),
    f"/v2/models/{ONNX}/infer": b'{"inputs": [{"name": "window", "datatype": "FP32", '
    b'"shape": [%s], "data": []}]}' % HUGE,
    f"/v2/models/{ONNX}/versions/1/infer": b'{"id": "a", "inputs": [], "n": %s}' % HUGE,
    "/api/generate": b'{"model": "%s", "prompt": "Once", "options": {"num_predict": %s}}'
    % (LLM.encode(), HUGE),
    "/api/chat": b'{"model": "%s", "messages": [], "keep_alive": %s}' % (LLM.encode(), HUGE),
    "/api/show": b'{"model": "%s", "verbose": %s}' % (LLM.encode(), HUGE),
    "/api/embed": b'{"model": "%s", "input": "hi", "dimensions": %s}' % (LLM.encode(), HUGE),
    "/api/embeddings": b'{"model": "%s", "prompt": "hi", "keep_alive": %s}' % (LLM.encode(), HUGE),
    "/v2/repository/index": b'{"ready": %s}' % HUGE,
}


@pytest.mark.parametrize("path", list(JSON_ROUTES))
def test_a_huge_integer_is_a_400_on_every_json_route(appliance: DaemonProcess, path: str) -> None:
    assert sys.get_int_max_str_digits() < DIGITS  # the limit this case is about
    status, body = _post(appliance.url + path, JSON_ROUTES[path])
    assert status == 400, body
    message = _message(body)
    assert "integer" in message and "digits" in message, message
    if path.startswith("/v1/"):
        assert body["error"]["param"] == "body"
        assert body["error"]["type"] == "invalid_request_error"


def test_the_table_covers_every_json_route(appliance: DaemonProcess) -> None:
    """A JSON route added later must join the table above (the OpenAPI document lists them)."""
    with urllib.request.urlopen(appliance.url + "/openapi.json", timeout=10) as response:
        document = json.loads(response.read())
    json_routes = set()
    for template, operations in document["paths"].items():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                json_routes.add(template.replace("{name}", ONNX).replace("{version}", "1"))
    assert json_routes <= set(JSON_ROUTES), sorted(json_routes - set(JSON_ROUTES))


def test_huge_integers_raise_no_5xx_and_no_alert(appliance: DaemonProcess) -> None:
    for path, body in JSON_ROUTES.items():
        assert _post(appliance.url + path, body)[0] == 400
    with urllib.request.urlopen(appliance.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    # (/health answers 503 while the models load: a probe's answer, which the alert skips.)
    statuses = [
        line
        for line in metrics.splitlines()
        if line.startswith("appliance_requests_total{")
        and 'transport="http"' in line
        and 'route="/health"' not in line
    ]
    assert statuses and not [s for s in statuses if 'status="5' in s], statuses
    assert "Exceeds the limit" not in "\n".join(appliance.log)  # nothing logged as a crash


def test_a_huge_integer_is_a_400_on_the_hub_ingest(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'hub.db'}"
    token = enroll_direct(storage, "box-1")
    body = (
        b'{"device": "box-1", "stream": "00112233", "records": [{"seq": %s, '
        b'"kind": "heartbeat", "time": 1, "body": {}}]}' % HUGE
    )
    with hub(storage) as process:
        status, answer = _post(
            process.url + "/api/v1/ingest", body, {"Authorization": f"Bearer {token}"}
        )
        assert status == 400, answer
        assert "integer" in answer["error"] and "digits" in answer["error"], answer
        assert "Traceback" not in "\n".join(process.log)
