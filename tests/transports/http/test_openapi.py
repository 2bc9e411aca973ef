"""``/openapi.json`` and ``/docs`` against the real router, a real daemon and a real browser.

The document must validate as OpenAPI 3.1, describe exactly the routes the application
serves, and its schemas must accept what the daemon accepts and answers: real requests
and real responses are validated against it. The docs page is rendered by headless
Chromium (Debian's ``chromium`` package); those tests skip when it is not installed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from appliance import __version__
from appliance.core.metrics import Metrics
from appliance.core.models import ModelManager
from appliance.core.service import Core
from appliance.server import Server
from appliance.transports.http import build_app, openapi
from appliance.transports.http.openapi import parts as openapi_parts
from appliance.transports.http.openapi import routes as openapi_routes
from appliance.transports.http.openapi.docs_page import DEFAULT_BASE
from tests.conftest import base_url, make_config, serving

CHROMIUM = Path("/usr/bin/chromium")
LLM = "stories260K"
TENSOR_MODEL = "sensor-anomaly"


def _app() -> web.Application:
    """The application exactly as the daemon builds it (no model needs to load)."""
    config = make_config()
    metrics = Metrics()
    return build_app(Core(ModelManager([], config.models, metrics), metrics), config)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.build(_app().router)


@pytest.fixture
async def llm_server(stories_gguf: Path, default_models: Path) -> AsyncIterator[Server]:
    config = make_config(models={"dir": str(default_models), "files": [str(stories_gguf)]})
    async with serving(config) as server:
        yield server


# ------------------------------------------------------------------------- helpers


def _validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # The document's components ride along so "#/components/schemas/..." resolves.
    root = {"components": document["components"], **schema}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _errors(document: dict[str, Any], schema: dict[str, Any], value: Any) -> list[str]:
    found = _validator(document, schema).iter_errors(value)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def _operation(document: dict[str, Any], method: str, template: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][template][method.lower()]
    return operation


def _request_schema(document: dict[str, Any], method: str, template: str) -> dict[str, Any]:
    body = _operation(document, method, template)["requestBody"]
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return schema


def _response_media(
    document: dict[str, Any], method: str, template: str, status: int, content_type: str
) -> dict[str, Any]:
    responses = _operation(document, method, template)["responses"]
    assert str(status) in responses, f"{method} {template} does not document status {status}"
    content = responses[str(status)].get("content", {})
    media = content_type.split(";")[0].strip()
    assert media in content, f"{method} {template} {status} does not document {media}"
    found: dict[str, Any] = content[media]
    return found


async def _check(
    document: dict[str, Any], response: aiohttp.ClientResponse, method: str, template: str
) -> Any:
    """Validate a real JSON response against its documented schema; return the body."""
    media = _response_media(
        document, method, template, response.status, response.headers["Content-Type"]
    )
    body = await response.json()
    problems = _errors(document, media["schema"], body)
    assert not problems, f"{method} {template} {response.status}: {problems}\n{body}"
    documented = _operation(document, method, template)["responses"][str(response.status)]
    for header in documented.get("headers", {}):
        if header == "Retry-After":
            assert header in response.headers, f"{template} {response.status} lacks {header}"
    return body


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _with_model(example: dict[str, Any], model: str) -> dict[str, Any]:
    """The example for the test model: the docs name a realistic one (keeping its tag)."""
    body = copy.deepcopy(example)
    if "model" in body:
        _, colon, tag = body["model"].partition(":")
        body["model"] = model + colon + tag
    return body


# ------------------------------------------------------------------- the document


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    validate_openapi(document)  # raises OpenAPIValidationError with the path at fault
    assert document["openapi"].startswith("3.1")
    assert document["info"]["version"] == __version__


def test_every_schema_is_valid_and_every_reference_resolves(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
        assert name.isidentifier(), name
    prefix = "#/components/schemas/"
    dangling = {
        r for r in _refs(document) if not r.startswith(prefix) or r[len(prefix) :] not in schemas
    }
    assert not dangling


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    router = _app().router
    served = set(openapi.routes_of(router))
    document = openapi.build(router)  # strict: raises for an undocumented route
    described = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert described == served
    # Stale documentation of a route that no longer exists is an error too.
    assert set(openapi_routes.OPERATIONS) == served
    # Every GET also answers HEAD (aiohttp adds it); HEAD is implied, never listed.
    raw = {
        (route.method, resource.canonical) for resource in router.resources() for route in resource
    }
    assert {("HEAD", path) for method, path in raw if method == "GET"} <= raw


def test_operations_are_complete(document: dict[str, Any]) -> None:
    ids = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation["summary"] and operation["description"], where
            assert operation["tags"][0] in {t["name"] for t in document["tags"]}, where
            ids.append(operation["operationId"])
            # Success: 200, or 101 for the WebSocket upgrade.
            assert {"200", "101"} & operation["responses"].keys(), where
            params = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), where
            if method == "post":
                assert "400" in operation["responses"] and "413" in operation["responses"]
            for status, response in operation["responses"].items():
                if (
                    status == "503"
                    and path.startswith(("/v1/", "/v2/models/"))
                    and not path.endswith("/ready")
                ):
                    assert "Retry-After" in response["headers"], where
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def test_a_route_without_documentation_is_detected(caplog: pytest.LogCaptureFixture) -> None:
    app = _app()

    async def extra(request: web.Request) -> web.Response:
        """An extra route."""
        return web.Response()

    app.router.add_get("/extra/{thing}", extra)
    app.router.add_delete("/v1/models/{model}", extra)
    with pytest.raises(openapi.UndocumentedRoute) as caught:
        openapi.build(app.router)
    assert caught.value.routes == [("GET", "/extra/{thing}"), ("DELETE", "/v1/models/{model}")]
    assert "GET /extra/{thing}" in str(caught.value)
    # The daemon itself still starts: it documents the route as undocumented and logs it.
    with caplog.at_level(logging.WARNING, logger=openapi.__name__):
        document = openapi.build(app.router, strict=False)
    operation = document["paths"]["/extra/{thing}"]["get"]
    assert operation["tags"] == [openapi.UNDOCUMENTED]
    assert operation["summary"] == "An extra route."
    assert [p["name"] for p in operation["parameters"]] == ["thing"]
    assert "GET /extra/{thing}" in caplog.text
    validate_openapi(document)


async def test_start_up_names_undocumented_routes_before_rendering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _app()

    async def extra(request: web.Request) -> web.Response:
        """An extra route."""
        return web.Response()

    app.router.add_get("/extra", extra)
    with caplog.at_level(logging.WARNING, logger=openapi.__name__):
        await openapi.publish(app)  # the on_startup hook
    assert "GET /extra" in caplog.text
    published = await app[openapi.PUBLISHED].get()
    assert published.document["paths"]["/extra"]["get"]["tags"] == [openapi.UNDOCUMENTED]
    assert await app[openapi.PUBLISHED].get() is published


async def test_document_is_built_once_per_app_when_first_asked(
    default_models: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_build = openapi.build

    def counting(router: web.UrlDispatcher, *, strict: bool = True) -> dict[str, Any]:
        calls.append(strict)
        return real_build(router, strict=strict)

    monkeypatch.setattr(openapi, "build", counting)
    async with serving(make_config(models={"dir": str(default_models)})) as server:
        url = base_url(server)
        assert calls == []  # nobody asked yet: an idle box keeps the memory it would take
        bodies = []
        for _ in range(3):
            async with http.get(url + "/openapi.json") as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                bodies.append(await response.read())
            async with http.get(url + "/docs") as response:
                assert response.status == 200
                assert response.content_type == "text/html"
        assert calls == [False]
        assert bodies[0] == bodies[1] == bodies[2]
        served = json.loads(bodies[0])
        assert served == openapi.build(_app().router)


# ---------------------------------------------- real requests and responses vs schemas

VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [
        {"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        {
            "model": LLM,
            "max_tokens": 3,
            "temperature": 0,
            "seed": 7,
            "stop": ["\n", "."],
            "messages": [
                {"role": "system", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "top_k": 10,
            "min_p": 0.1,
            "repeat_penalty": 1.1,
            "logit_bias": {"5": -100},
            "stream": False,
            "stream_options": {"include_usage": True},
            "n": 1,
            "user": "ignored",
            "tools": [],
        },
        {
            "model": LLM,
            "max_completion_tokens": 3,
            "messages": [{"role": "user", "content": "List"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                },
            },
        },
    ],
    "/v1/completions": [
        {"model": LLM, "prompt": ["Once"], "max_tokens": 2, "echo": True, "top_p": 0.5},
        {
            "model": LLM,
            "prompt": "Once",
            "max_tokens": 2,
            "stop": "x",
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
        },
    ],
    "/v1/embeddings": [
        {"model": LLM, "input": "kitchen", "encoding_format": "base64", "dimensions": 8},
    ],
    "/v2/models/{name}/infer": [
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "FP32",
                    "shape": [2, 32, 3],
                    "data": [20.0, 50.0, 0.01] * 64,
                }
            ],
            "outputs": [{"name": "score"}],
            "parameters": {},
        },
    ],
    "/api/chat": [
        {
            "model": f"{LLM}:latest",
            "stream": False,
            "keep_alive": "5m",
            "format": "json",
            "messages": [{"role": "user", "content": "Hi"}],
            "options": {"num_predict": 4, "temperature": 0, "stop": ["\n"], "num_ctx": 4096},
        },
        {"model": LLM, "messages": []},  # loads the model only
    ],
    "/api/generate": [
        {
            "model": LLM,
            "prompt": "Once",
            "raw": True,
            "stream": False,
            "options": {"num_predict": 3, "seed": 1},
        },
        {
            "model": LLM,
            "prompt": "Once",
            "system": "Be brief.",
            "stream": False,
            "format": {"type": "object"},
            "keep_alive": -1,
            "options": {"num_predict": 3},
        },
    ],
    "/api/embed": [{"model": LLM, "input": "kitchen", "dimensions": 4}],
    "/api/embeddings": [{"model": LLM, "prompt": "kitchen"}],
    "/api/show": [{"name": LLM, "verbose": True}],
}

INVALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [
        {"model": LLM, "messages": []},
        {"model": LLM},
        {"model": "", "messages": [{"role": "user", "content": "Hi"}]},
        {"model": LLM, "messages": [{"role": "robot", "content": "Hi"}]},
        {"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "temperature": 3},
        {"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "n": 2},
        {"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0},
        {
            "model": LLM,
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "xml"},
        },
    ],
    "/v1/completions": [
        {"model": LLM},
        {"model": LLM, "prompt": "x", "top_p": 0},
    ],
    "/v1/embeddings": [
        {"model": LLM, "input": "x", "encoding_format": "hex"},
        {"model": LLM, "input": "x", "dimensions": 0},
    ],
    "/v2/models/{name}/infer": [
        {"inputs": []},
        {"inputs": [{"name": "window", "datatype": "FP99", "shape": [1], "data": [1]}]},
        {"inputs": [{"name": "window", "datatype": "FP32", "shape": [-1], "data": [1]}]},
        {"inputs": [{"name": "window", "datatype": "FP32", "shape": [1]}]},
    ],
    "/api/chat": [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"model": LLM, "messages": [{"role": "robot", "content": "Hi"}]},
        {"model": LLM, "messages": "Hi"},
        {"model": LLM, "messages": [], "options": {"temperature": "hot"}},
    ],
    "/api/generate": [{"model": LLM, "prompt": ["Once"]}],
    "/api/embed": [{"model": LLM, "input": "x", "dimensions": 0}, {"input": "x"}],
    "/api/embeddings": [{"model": LLM, "prompt": 5}],
}


def _url_path(template: str) -> str:
    return template.replace("{name}", TENSOR_MODEL)


async def test_documented_examples_validate_and_the_daemon_accepts_them(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    url = base_url(llm_server)
    examples = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            media = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if media is None:
                continue
            example = media["example"]
            assert not _errors(document, media["schema"], example), (path, example)
            if path.startswith(("/v1/", "/api/")):
                example = _with_model(example, LLM)
            concrete = path.replace("{name}", TENSOR_MODEL).replace("{version}", "1")
            async with http.request(method, url + concrete, json=example) as response:
                assert response.status == 200, await response.text()
                await _check(document, response, method, path)
            examples += 1
    assert examples == 10


@pytest.mark.parametrize("valid", [True, False], ids=["accepted", "rejected"])
async def test_request_schemas_agree_with_the_daemon(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any], valid: bool
) -> None:
    """What the schema accepts the daemon serves; what it rejects the daemon answers 400."""
    url = base_url(llm_server)
    for template, bodies in (VALID_BODIES if valid else INVALID_BODIES).items():
        schema = _request_schema(document, "POST", template)
        for body in bodies:
            problems = _errors(document, schema, body)
            assert (not problems) is valid, (template, body, problems)
            async with http.post(url + _url_path(template), json=body) as response:
                assert response.status == (200 if valid else 400), (
                    template,
                    body,
                    await response.text(),
                )
                await _check(document, response, "POST", template)


async def test_real_responses_match_documented_schemas(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    url = base_url(llm_server)
    gets = {
        "/v1/models": ("/v1/models", 200),
        "/v1/models/{model}": ("/v1/models/" + LLM, 200),
        "/v2": ("/v2", 200),
        "/v2/health/live": ("/v2/health/live", 200),
        "/v2/health/ready": ("/v2/health/ready", 200),
        "/v2/models/{name}": ("/v2/models/" + TENSOR_MODEL, 200),
        "/v2/models/{name}/versions/{version}": (f"/v2/models/{LLM}/versions/1", 200),
        "/v2/models/{name}/ready": ("/v2/models/" + TENSOR_MODEL + "/ready", 200),
        "/v2/models/{name}/versions/{version}/ready": (
            f"/v2/models/{TENSOR_MODEL}/versions/1/ready",
            200,
        ),
        "/health": ("/health", 200),
        "/openapi.json": ("/openapi.json", 200),
    }
    for template, (path, status) in gets.items():
        async with http.get(url + path) as response:
            assert response.status == status, (path, await response.text())
            await _check(document, response, "GET", template)
    errors = [
        ("/v1/models/{model}", "/v1/models/nope", 404),
        ("/v2/models/{name}", "/v2/models/nope", 404),
        ("/v2/models/{name}/versions/{version}", f"/v2/models/{TENSOR_MODEL}/versions/9", 404),
        ("/v2/models/{name}/ready", "/v2/models/nope/ready", 404),
    ]
    for template, path, status in errors:
        async with http.get(url + path) as response:
            assert response.status == status
            await _check(document, response, "GET", template)
    for template, body in [
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        ("/v2/models/{name}/versions/{version}/infer", {"inputs": "x"}),
    ]:
        path = template.replace("{name}", TENSOR_MODEL).replace("{version}", "1")
        async with http.post(url + path, json=body) as response:
            assert response.status in (400, 404)
            await _check(document, response, "POST", template)
    async with http.post(url + f"/v2/models/{LLM}/infer", json=INFER_BODY) as response:
        assert response.status == 400  # a language model has no tensors
        await _check(document, response, "POST", "/v2/models/{name}/infer")
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        media = _response_media(document, "GET", "/metrics", 200, response.content_type)
        assert media["schema"]["type"] == "string"
        assert "# TYPE" in await response.text()
    async with http.get(url + "/docs") as response:
        _response_media(document, "GET", "/docs", 200, response.content_type)
    for template in ("/api/version", "/api/tags", "/api/ps"):
        async with http.get(url + template) as response:
            assert response.status == 200
            await _check(document, response, "GET", template)
    async with http.post(url + "/api/show", json={"model": "nope"}) as response:
        assert response.status == 404
        await _check(document, response, "POST", "/api/show")
    async with http.get(url + "/") as response:
        media = _response_media(document, "GET", "/", 200, response.content_type)
        assert await response.text() == media["schema"]["const"]
    async with http.get(url + "/ws") as response:  # not an upgrade request
        assert response.status == 400
        await _check(document, response, "GET", "/ws")
    async with http.ws_connect(url + "/ws") as websocket:
        await websocket.send_json({"type": "ping", "id": 1})  # the docs page's example
        assert (await websocket.receive_json(timeout=10))["type"] == "pong"


INFER_BODY = {
    "inputs": [
        {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": [20.0, 50.0, 0.01] * 32}
    ]
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_streamed_events_match_the_documented_item_schema(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any], path: str
) -> None:
    example = _operation(document, "POST", path)["requestBody"]["content"]["application/json"]
    body = {
        **_with_model(example["example"], LLM),
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(base_url(llm_server) + path, json=body) as response:
        assert response.status == 200
        media = _response_media(document, "POST", path, 200, response.content_type)
        text = await response.text()
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert events[-1] == "[DONE]"
    item_schema = media["x-itemSchema"]
    for event in events[:-1]:
        problems = _errors(document, item_schema, json.loads(event))
        assert not problems, (event, problems)
    assert json.loads(events[-2])["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
async def test_ollama_stream_lines_match_the_documented_item_schema(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any], path: str
) -> None:
    example = _operation(document, "POST", path)["requestBody"]["content"]["application/json"]
    body = _with_model(example["example"], LLM)
    body.pop("stream")  # Ollama streams unless told not to
    body["options"] = {"num_predict": 6}
    async with http.post(base_url(llm_server) + path, json=body) as response:
        assert response.status == 200
        media = _response_media(document, "POST", path, 200, response.content_type)
        lines = (await response.text()).splitlines()
    for line in lines:
        problems = _errors(document, media["x-itemSchema"], json.loads(line))
        assert not problems, (line, problems)
    assert json.loads(lines[-1])["done"] is True


async def test_binary_inference_matches_the_documented_header(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    template = "/v2/models/{name}/infer"
    values = [20.0, 50.0, 0.01] * 32
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "FP32",
                    "shape": [1, 32, 3],
                    "parameters": {"binary_data_size": 4 * len(values)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    schema = _request_schema(document, "POST", template)
    assert not _errors(document, schema, json.loads(header))
    request_headers = {
        openapi_parts.INFERENCE_HEADER: str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    documented = {p["name"] for p in _operation(document, "POST", template)["parameters"]}
    assert openapi_parts.INFERENCE_HEADER in documented
    payload = header + struct.pack(f"<{len(values)}f", *values)
    url = base_url(llm_server) + _url_path(template)
    async with http.post(url, data=payload, headers=request_headers) as response:
        assert response.status == 200, await response.text()
        _response_media(document, "POST", template, 200, response.content_type)
        split = int(response.headers[openapi_parts.INFERENCE_HEADER])
        raw = await response.read()
    media = _response_media(document, "POST", template, 200, "application/json")
    answer = json.loads(raw[:split])
    assert not _errors(document, media["schema"], answer)
    sizes = [out["parameters"]["binary_data_size"] for out in answer["outputs"]]
    assert sum(sizes) == len(raw) - split


async def test_msgpack_inference_is_documented(
    llm_server: Server, http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    template = "/v2/models/{name}/infer"
    url = base_url(llm_server) + _url_path(template)
    headers = {"Content-Type": openapi_parts.MSGPACK}
    async with http.post(url, data=msgpack.packb(INFER_BODY), headers=headers) as response:
        assert response.status == 200
        _response_media(document, "POST", template, 200, response.content_type)
        answer = msgpack.unpackb(await response.read())
    assert [out["name"] for out in answer["outputs"]] == ["score", "is_anomaly"]
    async with http.post(url, data=msgpack.packb({"inputs": []}), headers=headers) as response:
        assert response.status == 400
        media = _response_media(document, "POST", template, 400, response.content_type)
        error = msgpack.unpackb(await response.read())
    assert not _errors(document, media["schema"], error)


async def test_overload_and_size_errors_match_the_documentation(
    stories_gguf: Path, http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    config = make_config(
        models={"files": [str(stories_gguf)], "queue_size": 0, "parallel": 1},
        http={"max_body_bytes": 1024},
    )
    async with serving(config) as server:
        url = base_url(server) + "/v1/completions"
        too_big = {"model": LLM, "prompt": "x" * 2048}
        async with http.post(url, json=too_big) as response:
            assert response.status == 413
            await _check(document, response, "POST", "/v1/completions")
        # Hold the model's only place, as a long generation would, without the timing race.
        assert server.core is not None
        ticket = server.core.models.get(LLM).admission.admit()
        try:
            async with http.post(url, json={"model": LLM, "prompt": "x"}) as response:
                assert response.status == 503
                await _check(document, response, "POST", "/v1/completions")
        finally:
            ticket.release()
        async with http.post(url, json={"model": LLM, "prompt": "x"}) as response:
            assert response.status == 200


async def test_health_while_loading_matches_the_documentation(
    stories_gguf: Path, http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    config = make_config(models={"files": [str(stories_gguf)]})
    async with (
        serving(config, wait_loaded=False) as server,
        http.get(base_url(server) + "/health") as response,
    ):
        # Whichever comes first; both are documented with the same body.
        assert response.status in (200, 503)
        body = await _check(document, response, "GET", "/health")
        assert body["status"] in ("loading", "ok")


# --------------------------------------------------------------------- the docs page


class _Resources(HTMLParser):
    """Collects what a page would load and what it would run."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for attribute in ("src", "srcset", "poster", "data"):
            if values.get(attribute):
                self.loads.append(f"{tag} {attribute}={values[attribute]}")
        if tag == "link":
            self.loads.append(f"link {values.get('href')}")
        for name, _value in attrs:
            if name.startswith("on"):
                self.scripts += 1  # inline event handler


async def test_docs_page_is_self_contained_and_escaped(
    default_models: Path, http: aiohttp.ClientSession
) -> None:
    # Any Host accepted, so the page's own escaping is what is tested (the default Host
    # check answers such a request with 403: tests/security/test_network.py).
    config = make_config(models={"dir": str(default_models)}, security={"allowed_hosts": ["*"]})
    async with serving(config) as server:
        url = base_url(server)
        async with http.get(url + "/docs") as response:
            page = await response.text()
            policy = response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        # A hostile Host header must not reach the page.
        async with http.get(url + "/docs", headers={"Host": 'x"><b>evil</b>'}) as response:
            hostile = await response.text()
    parser = _Resources()
    parser.feed(page)
    assert parser.scripts == 1  # the "Try it" forms' script, allowed by its hash alone
    assert parser.loads == []
    assert "@import" not in page and "url(" not in page
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
    assert "script-src 'sha256-" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy
    assert f"curl -sS {url}/v1/models" in page  # examples point at the box that served them
    assert "<b>evil</b>" not in hostile and "evil" not in hostile
    assert f"curl -sS {DEFAULT_BASE}/v1/models" in hostile


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        # Console messages, Content-Security-Policy violations among them, go to stderr.
        "--enable-logging=stderr",
        "--v=0",
        # Nothing but the daemon resolves: a page that needed the internet would show it.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install "
    "chromium) to render the docs page",
)
async def test_docs_page_renders_in_a_real_browser(
    default_models: Path, tmp_path: Path, document: dict[str, Any]
) -> None:
    screenshot = tmp_path / "docs.png"
    async with serving(make_config(models={"dir": str(default_models)})) as server:
        url = base_url(server) + "/docs"
        # The browser blocks, so it runs in a thread while the daemon serves on this loop.
        dom, shot = await asyncio.gather(
            asyncio.to_thread(_chromium, "--dump-dom", url, profile=tmp_path / "p1"),
            asyncio.to_thread(
                _chromium,
                f"--screenshot={screenshot}",
                "--window-size=1200,2000",
                "--hide-scrollbars",
                url,
                profile=tmp_path / "p2",
            ),
        )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert shot.returncode == 0, shot.stderr[-2000:]
    for run in (dom, shot):
        # The inline style matches the page's policy, and nothing else was tried.
        console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, console
    text = dom.stdout
    assert "<title>Appliance API" in text
    for path, operations in document["paths"].items():
        assert f"<code>{path}</code>" in text, path
        for operation in operations.values():
            assert f'id="op-{operation["operationId"]}"' in text
            assert operation["summary"].replace("'", "&#x27;") in text
    for tag in document["tags"]:
        assert f">{tag['name']}</h2>" in text
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in text
    # The curl examples name the daemon that served the page.
    assert f"curl -sS {base_url(server)}/v2/models/sensor-anomaly/ready" in text
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 2000)
    assert len(png) > 50_000  # a blank or error page compresses to a few KB


# Bodies on which the document and the server once disagreed, and their valid neighbours:
# the document must accept exactly what the server accepts.
_AGREEMENT = [
    ("/api/generate", {"model": LLM, "prompt": "Hi", "keep_alive": ""}, False),
    ("/api/generate", {"model": LLM, "prompt": "Hi", "keep_alive": "five"}, False),
    (
        "/api/generate",
        {
            "model": LLM,
            "prompt": "Hi",
            "keep_alive": "5m",
            "stream": False,
            "options": {"num_predict": 1},
        },
        True,
    ),
    (
        "/api/generate",
        {
            "model": LLM,
            "prompt": "Hi",
            "keep_alive": 0,
            "stream": False,
            "options": {"num_predict": 1},
        },
        True,
    ),
    ("/api/generate", {"model": "", "prompt": "Hi"}, False),
    ("/api/embed", {"input": "hi"}, False),
    ("/api/embed", {"model": "", "input": "hi"}, False),
    ("/api/embed", {"model": LLM, "input": "hi", "keep_alive": ""}, False),
    ("/api/embed", {"model": LLM, "input": "hi"}, True),
    ("/api/embeddings", {"prompt": "hi"}, False),
    ("/api/embeddings", {"model": "", "prompt": "hi"}, False),
    ("/api/embeddings", {"model": LLM, "prompt": "hi"}, True),
    ("/v1/completions", {"model": LLM, "prompt": []}, False),
    ("/v1/completions", {"model": LLM, "prompt": ["a", "b"]}, False),
    ("/v1/completions", {"model": LLM, "prompt": ["a"], "max_tokens": 1}, True),
    (
        "/v1/chat/completions",
        {
            "model": LLM,
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "json_schema"},
        },
        False,
    ),
    (
        "/v1/chat/completions",
        {
            "model": LLM,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "object"}},
            },
        },
        True,
    ),
    (
        "/v1/chat/completions",
        {
            "model": LLM,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "response_format": {"type": "json_object"},
        },
        True,
    ),
]


@pytest.mark.parametrize(("path", "body", "valid"), _AGREEMENT)
async def test_the_document_accepts_what_the_server_accepts(
    llm_server: Server, document: dict[str, Any], path: str, body: dict[str, Any], valid: bool
) -> None:
    errors = _errors(document, _request_schema(document, "POST", path), body)
    async with (
        aiohttp.ClientSession() as http,
        http.post(base_url(llm_server) + path, json=body) as response,
    ):
        answer = await response.read()
        accepted = response.status < 400
    assert accepted == valid, (response.status, answer)
    assert (not errors) == valid, errors
