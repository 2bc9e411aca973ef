"""The pieces the route documentation is built from: tags, the API description, request
examples, shared parameters and responses, and helpers that shape one operation.

``routes.py`` puts them together into one OpenAPI operation per route.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from appliance.transports.http.openapi.schemas import ref

OPENAI = "OpenAI-compatible"
OIP = "Open Inference Protocol v2"
OLLAMA = "Ollama-compatible"
WEBSOCKET = "WebSocket"
OPS = "Operations"
REPOSITORY = "Model repository"

TAGS: list[dict[str, Any]] = [
    {
        "name": OPENAI,
        "description": "The OpenAI REST API subset that LAN clients use: point the official "
        "`openai` client (or anything built on it) at `http://<box>:8080/v1`. Errors use "
        "OpenAI's error shape.",
        "externalDocs": {"url": "https://platform.openai.com/docs/api-reference"},
    },
    {
        "name": OIP,
        "description": "KServe / Triton REST inference for tensor models, including the "
        'binary tensor data extension Triton clients use. Errors are `{"error": "..."}`.',
        "externalDocs": {
            "url": "https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/"
        },
    },
    {
        "name": OLLAMA,
        "description": "The subset of the Ollama API that Home Assistant's Ollama "
        "integration and Open WebUI use. Models are named `name` or `name:latest`. "
        "Generation streams by default (`stream` defaults to true), one JSON object a line "
        '(`application/x-ndjson`). Errors are `{"error": "..."}`.',
        "externalDocs": {"url": "https://github.com/ollama/ollama/blob/main/docs/api.md"},
    },
    {
        "name": WEBSOCKET,
        "description": "Many requests over one connection, replies interleaved by request "
        "`id`: JSON text frames, or MessagePack binary frames.",
    },
    {
        "name": REPOSITORY,
        "description": "Load, unload and reload models and decide canaries at run time "
        "(Triton's model repository extension and `/admin`). Needs an API key with the "
        "`admin` scope.",
    },
    {
        "name": OPS,
        "description": "Health for load balancers and systemd, Prometheus metrics, and this "
        "API description.",
    },
]

DESCRIPTION = """\
One daemon on the box serves every model over this single port: GGUF language models through \
the OpenAI-compatible routes, ONNX tensor models through the Open Inference Protocol v2.

Errors always come as JSON naming what is wrong: OpenAI's shape under `/v1/`, \
`{"error": "..."}` elsewhere. A full model queue, a model that is still loading and a daemon \
that is stopping answer `503` with a `Retry-After` header: retry after that many seconds."""

# Examples double as test fixtures: the test suite sends each request example to a real
# daemon, so a documented example that the server rejects fails the build.
CHAT_EXAMPLE = {
    "model": "qwen2.5-0.5b-instruct",
    "messages": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What does a dew point of 18 °C feel like?"},
    ],
    "max_tokens": 64,
    "temperature": 0.2,
}
COMPLETION_EXAMPLE = {
    "model": "qwen2.5-0.5b-instruct",
    "prompt": "Once upon a time",
    "max_tokens": 32,
    "temperature": 0,
}
EMBEDDING_EXAMPLE = {"model": "qwen2.5-0.5b-instruct", "input": ["kitchen", "living room"]}
OLLAMA_CHAT_EXAMPLE = {
    "model": "qwen2.5-0.5b-instruct:latest",
    "messages": [{"role": "user", "content": "Is 60 %RH too humid for a bedroom?"}],
    "stream": False,
    "options": {"temperature": 0.2, "num_predict": 64},
}
OLLAMA_GENERATE_EXAMPLE = {
    "model": "qwen2.5-0.5b-instruct",
    "prompt": "Write a haiku about a quiet server room.",
    "stream": False,
    "options": {"num_predict": 48},
}
OLLAMA_EMBED_EXAMPLE = {"model": "qwen2.5-0.5b-instruct", "input": ["kitchen", "hallway"]}
INFER_EXAMPLE = {
    "id": "window-42",
    "inputs": [
        {
            "name": "window",
            "datatype": "FP32",
            "shape": [1, 32, 3],
            # 32 readings of a quiet room: temperature (°C), humidity (%RH), vibration (g).
            "data": [
                [
                    [
                        round(21.4 + 0.01 * i, 2),
                        round(45.0 + 0.05 * (i % 4), 2),
                        round(0.02 + 0.001 * (i % 3), 3),
                    ]
                    for i in range(32)
                ]
            ],
        }
    ],
}

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "model": {
        "description": "Model name, as listed by `GET /v1/models`.",
        "schema": {"type": "string"},
        "example": "qwen2.5-0.5b-instruct",
    },
    "name": {
        "description": "Model name, as listed by `GET /v1/models`.",
        "schema": {"type": "string"},
        "example": "sensor-anomaly",
    },
    "version": {
        "description": "Model version, from the model's manifest (`1` for a model "
        "served from a bare file).",
        "schema": {"type": "string"},
        "example": "1",
    },
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    }
}
INFERENCE_HEADER = "Inference-Header-Content-Length"
OLLAMA_PREFIX = "Ollama"
MSGPACK = "application/msgpack"

_ERRORS = {
    400: "The request is invalid; the message names the field at fault.",
    404: "No model of that name (or version).",
    413: "The request body is larger than `http.max_body_bytes`.",
    503: "The model's queue is full, the model is not ready yet, or the appliance is stopping.",
    # Every route (docs/security.md):
    401: "An API key is needed and none valid came (`Authorization: Bearer <key>` or "
    "`X-API-Key: <key>`).",
    403: "The key lacks this route's scope, the client's address is not allowed, or the "
    "`Host` (or `Origin`) names another site.",
    408: "The request body did not arrive within `limits.request_timeout`.",
    429: "Too many requests from this address or with this key: retry after `Retry-After`.",
}
# Statuses any route may answer before its handler runs (the security middlewares).
SECURITY_ERRORS = (401, 403, 429)


# ------------------------------------------------------------------ operation helpers


def json_body(
    description: str, schema: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": dict(schema)}},
    }
    if headers:
        response["headers"] = dict(headers)
    return response


def sse(event: str, first: str = "") -> dict[str, Any]:
    """The ``text/event-stream`` answer of a ``stream: true`` request."""
    return {
        "schema": {
            "type": "string",
            "description": f"Server-Sent Events. Each `data:` line holds one `{event}` as "
            f"JSON{first}; with `stream_options.include_usage` a last one with empty "
            "`choices` carries the `usage`. An error after the stream started arrives as an "
            "`OpenAIError` event. The stream ends with `data: [DONE]`.",
        },
        # OpenAPI 3.2 names this ``itemSchema``; 3.1 allows it only as an extension.
        "x-itemSchema": {"anyOf": [ref(event), ref("OpenAIError")]},
    }


def _ndjson(item: str) -> dict[str, Any]:
    """Ollama's streamed answer: one JSON object a line."""
    return {
        "schema": {
            "type": "string",
            "description": f"Newline-delimited JSON: one `{item}` a line, the last with "
            "`done: true`, the reason and the counts. An error after the stream started "
            "arrives as an `Error` line.",
        },
        "x-itemSchema": {"anyOf": [ref(item), ref("Error")]},
    }


def make_operation(
    tag: str,
    operation_id: str,
    summary: str,
    description: str,
    responses: Mapping[int, dict[str, Any]],
    *,
    errors: Iterable[int] = (),
    body: Mapping[str, Any] | None = None,
    example: Any = None,
    header_parameters: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One operation object; path parameters are added by :func:`build` from the template."""
    operation: dict[str, Any] = {
        "tags": [tag],
        "operationId": operation_id,
        "summary": summary,
        "description": description,
    }
    if header_parameters:
        operation["parameters"] = [dict(h) for h in header_parameters]
    if body is not None:
        media: dict[str, Any] = {"schema": dict(body)}
        if example is not None:
            media["example"] = example
        operation["requestBody"] = {"required": True, "content": {"application/json": media}}
    out = dict(responses)
    error_schema = ref("OpenAIError" if tag == OPENAI else "Error")
    codes = set(errors) | set(SECURITY_ERRORS) | ({408} if body is not None else set())
    for code in sorted(codes - set(out)):
        out[code] = json_body(
            _ERRORS[code], error_schema, headers=RETRY_AFTER if code in (429, 503) else None
        )
    operation["responses"] = {str(code): out[code] for code in sorted(out)}
    return operation


def model_metadata(operation_id: str, versioned: bool) -> dict[str, Any]:
    which = "one version of a model" if versioned else "a model"
    return make_operation(
        OIP,
        operation_id,
        f"Metadata of {which}",
        "Name, versions, platform and the input and output tensors with their datatypes and "
        "shapes (`-1`: any size). Also answers for models that are loading or failed, with "
        "their `state`.",
        {200: json_body("The model's metadata.", ref("ModelMetadataResponse"))},
        errors=(404,),
    )


def model_ready(operation_id: str, versioned: bool) -> dict[str, Any]:
    which = "one version of a model" if versioned else "a model"
    return make_operation(
        OIP,
        operation_id,
        f"Is {which} ready?",
        "200 when the model can serve inference now; 400 while it loads or when it failed "
        "(as Triton answers: the protocol asks for a 4xx).",
        {
            200: json_body("Ready.", ref("ModelReadyResponse")),
            400: json_body("Loading or failed; the message says which.", ref("Error")),
        },
        errors=(404,),
    )


def infer_operation(operation_id: str, versioned: bool) -> dict[str, Any]:
    which = "one version of a tensor model" if versioned else "a tensor model"
    operation = make_operation(
        OIP,
        operation_id,
        f"Run {which}",
        "Tensors in, tensors out. The JSON form carries the elements in `data`. With the "
        f"binary tensor data extension the body is a JSON header of `{INFERENCE_HEADER}` "
        "bytes followed by the raw tensors (little-endian; BYTES elements each prefixed "
        "by a 4-byte length), each input naming its `binary_data_size`; outputs come back "
        "binary when asked with `binary_data` or `binary_data_output`. MessagePack "
        "(`application/msgpack`) works both ways: a MessagePack request is answered in "
        "MessagePack unless `Accept` prefers JSON. Language models answer 400: use the "
        "OpenAI-compatible routes for them.",
        {
            200: {
                "description": "The outputs. Binary outputs make the body "
                "`application/octet-stream`: the JSON header, then the tensor bytes.",
                "headers": {
                    INFERENCE_HEADER: {
                        "description": "Length of the JSON header (binary answers only).",
                        "schema": {"type": "integer", "minimum": 0},
                    }
                },
                "content": {
                    "application/json": {"schema": ref("InferenceResponse")},
                    "application/octet-stream": {
                        "schema": {
                            "type": "string",
                            "contentMediaType": "application/octet-stream",
                            "description": "An `InferenceResponse` JSON header followed by the "
                            "binary tensor data.",
                        }
                    },
                },
            }
        },
        errors=(400, 404, 413, 503),
        body=ref("InferenceRequest"),
        example=INFER_EXAMPLE,
        header_parameters=[
            {
                "name": INFERENCE_HEADER,
                "in": "header",
                "required": False,
                "description": "Binary tensor data extension: length of the JSON header that "
                "starts the body; the rest is raw tensor data.",
                "schema": {"type": "integer", "minimum": 0},
            }
        ],
    )
    operation["requestBody"]["content"]["application/octet-stream"] = {
        "schema": {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": f"An `InferenceRequest` JSON header of `{INFERENCE_HEADER}` bytes, "
            "then the binary tensor data.",
        }
    }
    # MessagePack is negotiated: a MessagePack request is answered in kind unless Accept
    # prefers JSON, a JSON one only when Accept prefers MessagePack; errors follow suit.
    operation["requestBody"]["content"][MSGPACK] = {
        "schema": {
            "type": "string",
            "contentMediaType": MSGPACK,
            "description": "An `InferenceRequest` as MessagePack; a tensor's `data` may be a "
            "`bin` of raw little-endian elements instead of a list.",
        }
    }
    operation["responses"]["200"]["content"][MSGPACK] = {
        "schema": {
            "type": "string",
            "contentMediaType": MSGPACK,
            "description": "An `InferenceResponse` as MessagePack, each tensor's `data` a `bin` "
            "(a list of `bin` for BYTES).",
        }
    }
    for status, response in operation["responses"].items():
        if status != "200":
            response["content"][MSGPACK] = {"schema": ref("Error")}
    return operation


def openai_body(model: type[BaseModel]) -> dict[str, str]:
    return ref(model.__name__)


def ollama_body(model: type[BaseModel]) -> dict[str, str]:
    # Ollama's models share names with OpenAI's (Message, ...): they get a prefix.
    return ref(OLLAMA_PREFIX + model.__name__)


def ollama_generation(
    operation_id: str,
    summary: str,
    description: str,
    body: type[BaseModel],
    answer: type[BaseModel],
    example: dict[str, Any],
) -> dict[str, Any]:
    return make_operation(
        OLLAMA,
        operation_id,
        summary,
        description,
        {
            200: {
                "description": "With `stream: false` the whole answer; otherwise (the "
                "default) a stream of lines.",
                "content": {
                    "application/json": {"schema": ollama_body(answer)},
                    "application/x-ndjson": _ndjson(OLLAMA_PREFIX + answer.__name__),
                },
            }
        },
        errors=(400, 404, 413, 503),
        body=ollama_body(body),
        example=example,
    )
