"""The documentation of every HTTP route, as data: what ``/openapi.json`` and ``/docs`` say.

:data:`OPERATIONS` holds one OpenAPI operation per ``(method, path template)``; the
builder in ``openapi.py`` looks every route of the router up here, so a new route needs an
entry (the tests fail without one). Path parameters are described once in
:data:`PATH_PARAMETERS` and added from the template. Error responses name the shapes the one
error mapper (``errors.py``) produces. Bodies come from the pydantic models that validate
them (:data:`PYDANTIC_MODELS`) or from ``openapi_schemas.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from appliance.transports.http import ollama_schema, openai_schema
from appliance.transports.http.openapi_schemas import ref

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
        "binary tensor data extension Triton clients use. Errors are `{\"error\": \"...\"}`.",
        "externalDocs": {
            "url": "https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/"
        },
    },
    {
        "name": OLLAMA,
        "description": "The subset of the Ollama API that Home Assistant's Ollama "
        "integration and Open WebUI use. Models are named `name` or `name:latest`. "
        "Generation streams by default (`stream` defaults to true), one JSON object a line "
        "(`application/x-ndjson`). Errors are `{\"error\": \"...\"}`.",
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
            "data": [[[round(21.4 + 0.01 * i, 2), round(45.0 + 0.05 * (i % 4), 2),
                       round(0.02 + 0.001 * (i % 3), 3)] for i in range(32)]],
        }
    ],
}

PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "model": {"description": "Model name, as listed by `GET /v1/models`.",
              "schema": {"type": "string"}, "example": "qwen2.5-0.5b-instruct"},
    "name": {"description": "Model name, as listed by `GET /v1/models`.",
             "schema": {"type": "string"}, "example": "sensor-anomaly"},
    "version": {"description": "Model version, from the model's manifest (`1` for a model "
                "served from a bare file).", "schema": {"type": "string"}, "example": "1"},
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


def _json(description: str, schema: Mapping[str, Any], *,
          headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": dict(schema)}}}
    if headers:
        response["headers"] = dict(headers)
    return response


def _sse(event: str, first: str = "") -> dict[str, Any]:
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


def _op(
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
        out[code] = _json(_ERRORS[code], error_schema,
                          headers=RETRY_AFTER if code in (429, 503) else None)
    operation["responses"] = {str(code): out[code] for code in sorted(out)}
    return operation


def _model_metadata(operation_id: str, versioned: bool) -> dict[str, Any]:
    which = "one version of a model" if versioned else "a model"
    return _op(
        OIP, operation_id, f"Metadata of {which}",
        "Name, versions, platform and the input and output tensors with their datatypes and "
        "shapes (`-1`: any size). Also answers for models that are loading or failed, with "
        "their `state`.",
        {200: _json("The model's metadata.", ref("ModelMetadataResponse"))},
        errors=(404,),
    )


def _model_ready(operation_id: str, versioned: bool) -> dict[str, Any]:
    which = "one version of a model" if versioned else "a model"
    return _op(
        OIP, operation_id, f"Is {which} ready?",
        "200 when the model can serve inference now; 503 while it loads or when it failed.",
        {
            200: _json("Ready.", ref("ModelReadyResponse")),
            503: _json("Loading or failed; the message says which.", ref("Error")),
        },
        errors=(404,),
    )


def _infer(operation_id: str, versioned: bool) -> dict[str, Any]:
    which = "one version of a tensor model" if versioned else "a tensor model"
    operation = _op(
        OIP, operation_id, f"Run {which}",
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
                "headers": {INFERENCE_HEADER: {
                    "description": "Length of the JSON header (binary answers only).",
                    "schema": {"type": "integer", "minimum": 0},
                }},
                "content": {
                    "application/json": {"schema": ref("InferenceResponse")},
                    "application/octet-stream": {"schema": {
                        "type": "string",
                        "contentMediaType": "application/octet-stream",
                        "description": "An `InferenceResponse` JSON header followed by the "
                        "binary tensor data.",
                    }},
                },
            }
        },
        errors=(400, 404, 413, 503),
        body=ref("InferenceRequest"),
        example=INFER_EXAMPLE,
        header_parameters=[{
            "name": INFERENCE_HEADER, "in": "header", "required": False,
            "description": "Binary tensor data extension: length of the JSON header that "
            "starts the body; the rest is raw tensor data.",
            "schema": {"type": "integer", "minimum": 0},
        }],
    )
    operation["requestBody"]["content"]["application/octet-stream"] = {"schema": {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": f"An `InferenceRequest` JSON header of `{INFERENCE_HEADER}` bytes, "
        "then the binary tensor data.",
    }}
    # MessagePack is negotiated: a MessagePack request is answered in kind unless Accept
    # prefers JSON, a JSON one only when Accept prefers MessagePack; errors follow suit.
    operation["requestBody"]["content"][MSGPACK] = {"schema": {
        "type": "string",
        "contentMediaType": MSGPACK,
        "description": "An `InferenceRequest` as MessagePack; a tensor's `data` may be a "
        "`bin` of raw little-endian elements instead of a list.",
    }}
    operation["responses"]["200"]["content"][MSGPACK] = {"schema": {
        "type": "string",
        "contentMediaType": MSGPACK,
        "description": "An `InferenceResponse` as MessagePack, each tensor's `data` a `bin` "
        "(a list of `bin` for BYTES).",
    }}
    for status, response in operation["responses"].items():
        if status != "200":
            response["content"][MSGPACK] = {"schema": ref("Error")}
    return operation


def _openai(model: type[BaseModel]) -> dict[str, str]:
    return ref(model.__name__)


def _ollama(model: type[BaseModel]) -> dict[str, str]:
    # Ollama's models share names with OpenAI's (Message, ...): they get a prefix.
    return ref(OLLAMA_PREFIX + model.__name__)


def _ollama_generation(operation_id: str, summary: str, description: str,
                       body: type[BaseModel], answer: type[BaseModel],
                       example: dict[str, Any]) -> dict[str, Any]:
    return _op(
        OLLAMA, operation_id, summary, description,
        {200: {
            "description": "With `stream: false` the whole answer; otherwise (the "
            "default) a stream of lines.",
            "content": {
                "application/json": {"schema": _ollama(answer)},
                "application/x-ndjson": _ndjson(OLLAMA_PREFIX + answer.__name__),
            },
        }},
        errors=(400, 404, 413, 503),
        body=_ollama(body),
        example=example,
    )


# -------------------------------------------------------------- the documented routes

OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    # OpenAI-compatible
    ("GET", "/v1/models"): _op(
        OPENAI, "listModels", "List the models",
        "Every model the appliance serves or is loading, by name; models that failed to "
        "load are left out (see `/health`).",
        {200: _json("The models.", _openai(openai_schema.ModelList))},
    ),
    ("GET", "/v1/models/{model}"): _op(
        OPENAI, "retrieveModel", "Describe a model",
        "One model card, whatever the model's state.",
        {200: _json("The model card.", _openai(openai_schema.ModelCard))},
        errors=(404,),
    ),
    ("POST", "/v1/chat/completions"): _op(
        OPENAI, "createChatCompletion", "Chat with a language model",
        "The model's chat template turns the messages into a prompt. Sampling follows the "
        "OpenAI parameters plus llama.cpp's `top_k`, `min_p` and `repeat_penalty`; "
        "`response_format` constrains the answer to JSON (or a JSON Schema) by grammar. "
        "With `stream: true` the answer is a stream of chunks as Server-Sent Events.",
        {200: {
            "description": "The completion, or with `stream: true` a stream of chunks.",
            "content": {
                "application/json": {"schema": _openai(openai_schema.ChatCompletion)},
                "text/event-stream": _sse("ChatCompletionChunk",
                                          " (the first carries only the role)"),
            },
        }},
        errors=(400, 404, 413, 503),
        body=_openai(openai_schema.ChatCompletionRequest),
        example=CHAT_EXAMPLE,
    ),
    ("POST", "/v1/completions"): _op(
        OPENAI, "createCompletion", "Continue a prompt",
        "Raw text completion, no chat template. One prompt per request; `echo` prepends it "
        "to the answer. With `stream: true` the answer is a stream of Server-Sent Events.",
        {200: {
            "description": "The completion, or with `stream: true` a stream of pieces.",
            "content": {
                "application/json": {"schema": _openai(openai_schema.Completion)},
                "text/event-stream": _sse("Completion"),
            },
        }},
        errors=(400, 404, 413, 503),
        body=_openai(openai_schema.CompletionRequest),
        example=COMPLETION_EXAMPLE,
    ),
    ("POST", "/v1/embeddings"): _op(
        OPENAI, "createEmbedding", "Embed texts",
        "One vector per input text, as floats or base64 of little-endian float32; "
        "`dimensions` truncates each vector.",
        {200: _json("The vectors, in input order.", _openai(openai_schema.EmbeddingList))},
        errors=(400, 404, 413, 503),
        body=_openai(openai_schema.EmbeddingRequest),
        example=EMBEDDING_EXAMPLE,
    ),
    # Open Inference Protocol v2
    ("GET", "/v2"): _op(
        OIP, "serverMetadata", "Server metadata",
        "Name, version and the protocol extensions this server supports.",
        {200: _json("Server metadata.", ref("ServerMetadataResponse"))},
    ),
    ("GET", "/v2/health/live"): _op(
        OIP, "serverLive", "Is the server live?",
        "200 whenever the daemon answers at all: a liveness probe.",
        {200: _json("Live.", ref("ServerLiveResponse"))},
    ),
    ("GET", "/v2/health/ready"): _op(
        OIP, "serverReady", "Is the server ready?",
        "200 when at least one model can serve; 503 while models load or when none can.",
        {
            200: _json("Ready.", ref("ServerReadyResponse")),
            503: _json("Not ready; the message says why.", ref("Error")),
        },
    ),
    ("GET", "/v2/models/{name}"): _model_metadata("modelMetadata", versioned=False),
    ("GET", "/v2/models/{name}/versions/{version}"): _model_metadata(
        "modelVersionMetadata", versioned=True
    ),
    ("GET", "/v2/models/{name}/ready"): _model_ready("modelReady", versioned=False),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): _model_ready(
        "modelVersionReady", versioned=True
    ),
    ("POST", "/v2/models/{name}/infer"): _infer("modelInfer", versioned=False),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): _infer(
        "modelVersionInfer", versioned=True
    ),
    # Ollama-compatible
    ("GET", "/"): _op(
        OLLAMA, "ollamaRoot", "Ollama liveness probe",
        "Answers `Ollama is running`, as Ollama does: its clients probe this first. "
        "People looking for the API find it at `/docs`.",
        {200: {"description": "Running.", "content": {"text/plain": {
            "schema": {"const": "Ollama is running"}}}}},
    ),
    ("GET", "/api/version"): _op(
        OLLAMA, "ollamaVersion", "Ollama API version",
        "The Ollama API level this appliance implements.",
        {200: _json("The version.", _ollama(ollama_schema.Version))},
    ),
    ("GET", "/api/tags"): _op(
        OLLAMA, "ollamaTags", "List the language models",
        "Language models the appliance serves or is loading, as `name:latest`; tensor "
        "models are left out.",
        {200: _json("The models.", _ollama(ollama_schema.Tags))},
    ),
    ("GET", "/api/ps"): _op(
        OLLAMA, "ollamaPs", "List the loaded language models",
        "Language models that are ready now. They stay loaded while served, so "
        "`expires_at` lies far in the future.",
        {200: _json("The loaded models.", _ollama(ollama_schema.Running))},
    ),
    ("POST", "/api/show"): _op(
        OLLAMA, "ollamaShow", "Describe a model",
        "Details, capabilities (`completion`, `embedding`) and the appliance's own facts "
        "about one model.",
        {200: _json("The model.", _ollama(ollama_schema.Show))},
        errors=(400, 404, 413),
        body=_ollama(ollama_schema.ShowRequest),
        example={"model": "qwen2.5-0.5b-instruct"},
    ),
    ("POST", "/api/chat"): _ollama_generation(
        "ollamaChat", "Chat with a language model",
        "The model's chat template turns the messages into a prompt; `options` carries the "
        "sampling parameters, `format` constrains the answer to JSON or a JSON Schema. No "
        "messages only loads the model (Ollama's way to warm it up).",
        ollama_schema.ChatRequest, ollama_schema.ChatAnswer, OLLAMA_CHAT_EXAMPLE,
    ),
    ("POST", "/api/generate"): _ollama_generation(
        "ollamaGenerate", "Answer a prompt",
        "The prompt (and `system`) go through the model's template as one user turn; with "
        "`raw: true` the prompt is continued as-is. An empty prompt only loads the model.",
        ollama_schema.GenerateRequestBody, ollama_schema.GenerateAnswer,
        OLLAMA_GENERATE_EXAMPLE,
    ),
    ("POST", "/api/embed"): _op(
        OLLAMA, "ollamaEmbed", "Embed texts",
        "One vector per input text; `dimensions` truncates and re-normalises them.",
        {200: _json("The vectors, in input order.", _ollama(ollama_schema.Embed))},
        errors=(400, 404, 413, 503),
        body=_ollama(ollama_schema.EmbedRequest),
        example=OLLAMA_EMBED_EXAMPLE,
    ),
    ("POST", "/api/embeddings"): _op(
        OLLAMA, "ollamaEmbeddings", "Embed one text (older form)",
        "The single-text predecessor of `/api/embed`, still used by some clients.",
        {200: _json("The vector.", _ollama(ollama_schema.Embeddings))},
        errors=(400, 404, 413, 503),
        body=_ollama(ollama_schema.EmbeddingsRequest),
        example={"model": "qwen2.5-0.5b-instruct", "prompt": "kitchen"},
    ),
    # WebSocket
    ("GET", "/ws"): _op(
        WEBSOCKET, "websocket", "Open a WebSocket",
        "Upgrades to a WebSocket. Each message is a JSON object with a `type` and an `id` "
        "that its replies echo: `generate` (answered by `token` messages and one `done`), "
        "`infer` (one `result`), `embed` (one `embeddings`), `models`, `cancel` and `ping`. "
        "A request that fails is answered by one `error` with the `status` the same "
        "problem gets over HTTP. Binary frames carry the same objects as MessagePack.",
        {
            101: {"description": "Switching to the WebSocket protocol."},
            400: _json("Not a WebSocket upgrade request.", ref("Error")),
        },
    ),
    # Model repository administration (admin scope)
    ("POST", "/v2/repository/index"): _op(
        REPOSITORY, "repositoryIndex", "List every model version",
        "Triton's model repository extension: every served version of every model with its "
        "state (`READY`, `LOADING`, `UNLOADED`, `FAILED`) and, for a failed one, the reason. "
        "The body is optional; `{\"ready\": true}` lists only ready versions.",
        {200: _json("The versions.", {"type": "array", "items": {
            "type": "object", "required": ["name", "version", "state"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "state": {"type": "string"}, "reason": {"type": "string"}}}})},
        errors=(400, 413),
    ),
    ("POST", "/v2/repository/models/{name}/load"): _op(
        REPOSITORY, "repositoryModelLoad", "Load or reload a model",
        "Re-reads the model from the repository and loads it. A changed file or a new "
        "version loads beside the serving one and takes over once ready (with `[canary]` "
        "enabled, a new version starts as a canary); one that fails to load leaves the old "
        "one serving. No request is dropped.",
        {200: _json("The model's versions and their states.", ref("ModelVersions"))},
        errors=(400, 404, 413, 503),
    ),
    ("POST", "/v2/repository/models/{name}/unload"): _op(
        REPOSITORY, "repositoryModelUnload", "Unload a model",
        "Unloads every version once its admitted requests finished; the model answers 503 "
        "until it is loaded again.",
        {200: _json("The model's versions and their states.", ref("ModelVersions"))},
        errors=(400, 404, 413),
    ),
    ("POST", "/admin/reload"): _op(
        REPOSITORY, "adminReload", "Re-read the model repository",
        "What SIGHUP does: every model is re-read and what changed is hot-swapped.",
        {200: _json("Every model's versions and their states.", {
            "type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": {"type": "string"}}})},
        errors=(400, 413),
    ),
    ("POST", "/admin/models/{name}/promote"): _op(
        REPOSITORY, "adminCanaryPromote", "Promote a running canary",
        "The canary version becomes the stable one; the old stable version is retired.",
        {200: _json("The decision.", ref("CanaryDecision"))},
        errors=(400, 404, 413),
    ),
    ("POST", "/admin/models/{name}/rollback"): _op(
        REPOSITORY, "adminCanaryRollback", "Roll back a running canary",
        "The canary version is unloaded; the stable one serves everything.",
        {200: _json("The decision.", ref("CanaryDecision"))},
        errors=(400, 404, 413),
    ),
    # Operations
    ("GET", "/health"): _op(
        OPS, "health", "Appliance health",
        "For load balancers, systemd and people: 200 while the appliance serves (`ok`, or "
        "`degraded` when some model failed to load), 503 while models load, while stopping, "
        "or when no model can serve. The body is the same either way.",
        {
            200: _json("Serving.", ref("Health")),
            503: _json("Loading, stopping or unable to serve.", ref("Health")),
        },
    ),
    ("GET", "/metrics"): _op(
        OPS, "metrics", "Prometheus metrics",
        "Request counts and latency histograms per route and model, queue depths and model "
        "states, in the Prometheus text exposition format.",
        {200: {"description": "The metrics.", "content": {"text/plain": {
            "schema": {"type": "string"},
            "example": "# TYPE appliance_requests_total counter\n",
        }}}},
    ),
    ("GET", "/openapi.json"): _op(
        OPS, "openapi", "This API description",
        "The OpenAPI 3.1 document describing every route, generated from the running "
        "application's router.",
        {200: _json("An OpenAPI 3.1 document.", {"type": "object"})},
    ),
    ("GET", "/docs"): _op(
        OPS, "docs", "API documentation page",
        "This document as a self-contained HTML page: no scripts, no external resources.",
        {200: {"description": "An HTML page.",
               "content": {"text/html": {"schema": {"type": "string"}}}}},
    ),
}

# The pydantic models behind the bodies, by family: the schema-name prefix and, for each
# model, the side it describes (what is accepted, or what is sent).
PYDANTIC_MODELS: dict[str, list[tuple[type[BaseModel], JsonSchemaMode]]] = {
    "": [
        (openai_schema.ChatCompletionRequest, "validation"),
        (openai_schema.CompletionRequest, "validation"),
        (openai_schema.EmbeddingRequest, "validation"),
        (openai_schema.ModelList, "serialization"),
        (openai_schema.ModelCard, "serialization"),
        (openai_schema.ChatCompletion, "serialization"),
        (openai_schema.ChatCompletionChunk, "serialization"),
        (openai_schema.Completion, "serialization"),
        (openai_schema.EmbeddingList, "serialization"),
    ],
    OLLAMA_PREFIX: [
        (ollama_schema.ChatRequest, "validation"),
        (ollama_schema.GenerateRequestBody, "validation"),
        (ollama_schema.EmbedRequest, "validation"),
        (ollama_schema.EmbeddingsRequest, "validation"),
        (ollama_schema.ShowRequest, "validation"),
        (ollama_schema.Version, "serialization"),
        (ollama_schema.Tags, "serialization"),
        (ollama_schema.Running, "serialization"),
        (ollama_schema.Show, "serialization"),
        (ollama_schema.ChatAnswer, "serialization"),
        (ollama_schema.GenerateAnswer, "serialization"),
        (ollama_schema.Embed, "serialization"),
        (ollama_schema.Embeddings, "serialization"),
    ],
}
