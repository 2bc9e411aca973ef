"""The documentation of every HTTP route, as data: what ``/openapi.json`` and ``/docs`` say.

:data:`OPERATIONS` holds one OpenAPI operation per ``(method, path template)``; the
builder (``openapi/__init__.py``) looks every route of the router up here, so a new route
needs an entry (the tests fail without one). The inference APIs (OpenAI, Open Inference
Protocol, Ollama) are described here, the other routes in ``service_routes.py``. Path
parameters are described once in :data:`PATH_PARAMETERS` (``parts.py``, with the examples
and helpers) and added from the template. Error responses name the shapes the one error
mapper (``errors.py``) produces. Bodies come from the pydantic models that validate them
(:data:`PYDANTIC_MODELS`) or from ``schemas.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from appliance.transports.http import ollama_answers, ollama_schema, openai_schema
from appliance.transports.http.openapi.parts import (
    CHAT_EXAMPLE,
    COMPLETION_EXAMPLE,
    EMBEDDING_EXAMPLE,
    OIP,
    OLLAMA,
    OLLAMA_CHAT_EXAMPLE,
    OLLAMA_EMBED_EXAMPLE,
    OLLAMA_GENERATE_EXAMPLE,
    OLLAMA_PREFIX,
    OPENAI,
    infer_operation,
    json_body,
    make_operation,
    model_metadata,
    model_ready,
    ollama_body,
    ollama_generation,
    openai_body,
    sse,
)
from appliance.transports.http.openapi.schemas import ref
from appliance.transports.http.openapi.service_routes import SERVICE_OPERATIONS

# -------------------------------------------------------------- the documented routes

_APIS: dict[tuple[str, str], dict[str, Any]] = {
    # OpenAI-compatible
    ("GET", "/v1/models"): make_operation(
        OPENAI,
        "listModels",
        "List the models",
        "Every model the appliance serves or is loading, by name; models that failed to "
        "load are left out (see `/health`).",
        {200: json_body("The models.", openai_body(openai_schema.ModelList))},
    ),
    ("GET", "/v1/models/{model}"): make_operation(
        OPENAI,
        "retrieveModel",
        "Describe a model",
        "One model card, whatever the model's state.",
        {200: json_body("The model card.", openai_body(openai_schema.ModelCard))},
        errors=(404,),
    ),
    ("POST", "/v1/chat/completions"): make_operation(
        OPENAI,
        "createChatCompletion",
        "Chat with a language model",
        "The model's chat template turns the messages into a prompt. Sampling follows the "
        "OpenAI parameters plus llama.cpp's `top_k`, `min_p` and `repeat_penalty`; "
        "`response_format` constrains the answer to JSON (or a JSON Schema) by grammar. "
        "With `stream: true` the answer is a stream of chunks as Server-Sent Events.",
        {
            200: {
                "description": "The completion, or with `stream: true` a stream of chunks.",
                "content": {
                    "application/json": {"schema": openai_body(openai_schema.ChatCompletion)},
                    "text/event-stream": sse(
                        "ChatCompletionChunk", " (the first carries only the role)"
                    ),
                },
            }
        },
        errors=(400, 404, 413, 503),
        body=openai_body(openai_schema.ChatCompletionRequest),
        example=CHAT_EXAMPLE,
    ),
    ("POST", "/v1/completions"): make_operation(
        OPENAI,
        "createCompletion",
        "Continue a prompt",
        "Raw text completion, no chat template. One prompt per request; `echo` prepends it "
        "to the answer. With `stream: true` the answer is a stream of Server-Sent Events.",
        {
            200: {
                "description": "The completion, or with `stream: true` a stream of pieces.",
                "content": {
                    "application/json": {"schema": openai_body(openai_schema.Completion)},
                    "text/event-stream": sse("Completion"),
                },
            }
        },
        errors=(400, 404, 413, 503),
        body=openai_body(openai_schema.CompletionRequest),
        example=COMPLETION_EXAMPLE,
    ),
    ("POST", "/v1/embeddings"): make_operation(
        OPENAI,
        "createEmbedding",
        "Embed texts",
        "One vector per input text, as floats or base64 of little-endian float32; "
        "`dimensions` truncates each vector.",
        {200: json_body("The vectors, in input order.", openai_body(openai_schema.EmbeddingList))},
        errors=(400, 404, 413, 503),
        body=openai_body(openai_schema.EmbeddingRequest),
        example=EMBEDDING_EXAMPLE,
    ),
    # Open Inference Protocol v2
    ("GET", "/v2"): make_operation(
        OIP,
        "serverMetadata",
        "Server metadata",
        "Name, version and the protocol extensions this server supports.",
        {200: json_body("Server metadata.", ref("ServerMetadataResponse"))},
    ),
    ("GET", "/v2/health/live"): make_operation(
        OIP,
        "serverLive",
        "Is the server live?",
        "200 whenever the daemon answers at all: a liveness probe.",
        {200: json_body("Live.", ref("ServerLiveResponse"))},
    ),
    ("GET", "/v2/health/ready"): make_operation(
        OIP,
        "serverReady",
        "Is the server ready?",
        "200 when at least one model can serve; 503 while models load or when none can.",
        {
            200: json_body("Ready.", ref("ServerReadyResponse")),
            503: json_body("Not ready; the message says why.", ref("Error")),
        },
    ),
    ("GET", "/v2/models/{name}"): model_metadata("modelMetadata", versioned=False),
    ("GET", "/v2/models/{name}/versions/{version}"): model_metadata(
        "modelVersionMetadata", versioned=True
    ),
    ("GET", "/v2/models/{name}/ready"): model_ready("modelReady", versioned=False),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): model_ready(
        "modelVersionReady", versioned=True
    ),
    ("POST", "/v2/models/{name}/infer"): infer_operation("modelInfer", versioned=False),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): infer_operation(
        "modelVersionInfer", versioned=True
    ),
    # Ollama-compatible
    ("GET", "/"): make_operation(
        OLLAMA,
        "ollamaRoot",
        "Ollama liveness probe",
        "Answers `Ollama is running`, as Ollama does: its clients probe this first. A "
        "browser (`Accept: text/html`) gets the device page instead, which reads `/device`. "
        "People looking for the API find it at `/docs`.",
        {
            200: {
                "description": "Running, or the device page.",
                "content": {
                    "text/plain": {"schema": {"const": "Ollama is running"}},
                    "text/html": {"schema": {"type": "string"}},
                },
            }
        },
    ),
    ("GET", "/api/version"): make_operation(
        OLLAMA,
        "ollamaVersion",
        "Ollama API version",
        "The Ollama API level this appliance implements.",
        {200: json_body("The version.", ollama_body(ollama_answers.Version))},
    ),
    ("GET", "/api/tags"): make_operation(
        OLLAMA,
        "ollamaTags",
        "List the language models",
        "Language models the appliance serves or is loading, as `name:latest`; tensor "
        "models are left out.",
        {200: json_body("The models.", ollama_body(ollama_answers.Tags))},
    ),
    ("GET", "/api/ps"): make_operation(
        OLLAMA,
        "ollamaPs",
        "List the loaded language models",
        "Language models that are ready now. They stay loaded while served, so "
        "`expires_at` lies far in the future.",
        {200: json_body("The loaded models.", ollama_body(ollama_answers.Running))},
    ),
    ("POST", "/api/show"): make_operation(
        OLLAMA,
        "ollamaShow",
        "Describe a model",
        "Details, capabilities (`completion`, `embedding`) and the appliance's own facts "
        "about one model.",
        {200: json_body("The model.", ollama_body(ollama_answers.Show))},
        errors=(400, 404, 413),
        body=ollama_body(ollama_schema.ShowRequest),
        example={"model": "qwen2.5-0.5b-instruct"},
    ),
    ("POST", "/api/chat"): ollama_generation(
        "ollamaChat",
        "Chat with a language model",
        "The model's chat template turns the messages into a prompt; `options` carries the "
        "sampling parameters, `format` constrains the answer to JSON or a JSON Schema. No "
        "messages only loads the model (Ollama's way to warm it up).",
        ollama_schema.ChatRequest,
        ollama_answers.ChatAnswer,
        OLLAMA_CHAT_EXAMPLE,
    ),
    ("POST", "/api/generate"): ollama_generation(
        "ollamaGenerate",
        "Answer a prompt",
        "The prompt (and `system`) go through the model's template as one user turn; with "
        "`raw: true` the prompt is continued as-is. An empty prompt only loads the model.",
        ollama_schema.GenerateRequestBody,
        ollama_answers.GenerateAnswer,
        OLLAMA_GENERATE_EXAMPLE,
    ),
    ("POST", "/api/embed"): make_operation(
        OLLAMA,
        "ollamaEmbed",
        "Embed texts",
        "One vector per input text; `dimensions` truncates and re-normalises them.",
        {200: json_body("The vectors, in input order.", ollama_body(ollama_answers.Embed))},
        errors=(400, 404, 413, 503),
        body=ollama_body(ollama_schema.EmbedRequest),
        example=OLLAMA_EMBED_EXAMPLE,
    ),
    ("POST", "/api/embeddings"): make_operation(
        OLLAMA,
        "ollamaEmbeddings",
        "Embed one text (older form)",
        "The single-text predecessor of `/api/embed`, still used by some clients.",
        {200: json_body("The vector.", ollama_body(ollama_answers.Embeddings))},
        errors=(400, 404, 413, 503),
        body=ollama_body(ollama_schema.EmbeddingsRequest),
        example={"model": "qwen2.5-0.5b-instruct", "prompt": "kitchen"},
    ),
}
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {**_APIS, **SERVICE_OPERATIONS}

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
        (ollama_answers.Version, "serialization"),
        (ollama_answers.Tags, "serialization"),
        (ollama_answers.Running, "serialization"),
        (ollama_answers.Show, "serialization"),
        (ollama_answers.ChatAnswer, "serialization"),
        (ollama_answers.GenerateAnswer, "serialization"),
        (ollama_answers.Embed, "serialization"),
        (ollama_answers.Embeddings, "serialization"),
    ],
}
