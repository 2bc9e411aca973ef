"""The documentation of the routes beside the inference APIs: the WebSocket, model
repository administration and operations (health, metrics, the device page, these docs).

Merged into :data:`appliance.transports.http.openapi.routes.OPERATIONS`, after the
OpenAI, Open Inference Protocol and Ollama routes, in the order the docs list them.
"""

from __future__ import annotations

from typing import Any

from appliance.transports.http.openapi.parts import (
    OPS,
    REPOSITORY,
    WEBSOCKET,
    json_body,
    make_operation,
)
from appliance.transports.http.openapi.schemas import ref

SERVICE_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    # WebSocket
    ("GET", "/ws"): make_operation(
        WEBSOCKET,
        "websocket",
        "Open a WebSocket",
        "Upgrades to a WebSocket. Each message is a JSON object with a `type` and an `id` "
        "that its replies echo: `generate` (answered by `token` messages and one `done`), "
        "`infer` (one `result`), `embed` (one `embeddings`), `models`, `cancel` and `ping`. "
        "A request that fails is answered by one `error` with the `status` the same "
        "problem gets over HTTP. Binary frames carry the same objects as MessagePack.",
        {
            101: {"description": "Switching to the WebSocket protocol."},
            400: json_body("Not a WebSocket upgrade request.", ref("Error")),
        },
    ),
    # Model repository administration (admin scope)
    ("POST", "/v2/repository/index"): make_operation(
        REPOSITORY,
        "repositoryIndex",
        "List every model version",
        "Triton's model repository extension: every served version of every model with its "
        "state (`READY`, `LOADING`, `UNLOADED`, `FAILED`) and, for a failed one, the reason. "
        'The body is optional; `{"ready": true}` lists only ready versions.',
        {
            200: json_body(
                "The versions.",
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "version", "state"],
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "state": {"type": "string"},
                            "reason": {"type": "string"},
                        },
                    },
                },
            )
        },
        errors=(400, 413),
    ),
    ("POST", "/v2/repository/models/{name}/load"): make_operation(
        REPOSITORY,
        "repositoryModelLoad",
        "Load or reload a model",
        "Re-reads the model from the repository and loads it. A changed file or a new "
        "version loads beside the serving one and takes over once ready (with `[canary]` "
        "enabled, a new version starts as a canary); one that fails to load leaves the old "
        "one serving. No request is dropped.",
        {200: json_body("The model's versions and their states.", ref("ModelVersions"))},
        errors=(400, 404, 413, 503),
    ),
    ("POST", "/v2/repository/models/{name}/unload"): make_operation(
        REPOSITORY,
        "repositoryModelUnload",
        "Unload a model",
        "Unloads every version once its admitted requests finished; the model answers 503 "
        "until it is loaded again.",
        {200: json_body("The model's versions and their states.", ref("ModelVersions"))},
        errors=(400, 404, 413),
    ),
    ("POST", "/admin/reload"): make_operation(
        REPOSITORY,
        "adminReload",
        "Re-read the model repository",
        "What SIGHUP does: every model is re-read and what changed is hot-swapped.",
        {
            200: json_body(
                "Every model's versions and their states.",
                {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                    },
                },
            )
        },
        errors=(400, 413),
    ),
    ("POST", "/admin/models/{name}/promote"): make_operation(
        REPOSITORY,
        "adminCanaryPromote",
        "Promote a running canary",
        "The canary version becomes the stable one; the old stable version is retired.",
        {200: json_body("The decision.", ref("CanaryDecision"))},
        errors=(400, 404, 413),
    ),
    ("POST", "/admin/models/{name}/rollback"): make_operation(
        REPOSITORY,
        "adminCanaryRollback",
        "Roll back a running canary",
        "The canary version is unloaded; the stable one serves everything.",
        {200: json_body("The decision.", ref("CanaryDecision"))},
        errors=(400, 404, 413),
    ),
    # Operations
    ("GET", "/health"): make_operation(
        OPS,
        "health",
        "Appliance health",
        "For load balancers, systemd and people: 200 while the appliance serves (`ok`, or "
        "`degraded` when some model failed to load), 503 while models load, while stopping, "
        "or when no model can serve. The body is the same either way.",
        {
            200: json_body("Serving.", ref("Health")),
            503: json_body("Loading, stopping or unable to serve.", ref("Health")),
        },
    ),
    ("GET", "/metrics"): make_operation(
        OPS,
        "metrics",
        "Prometheus metrics",
        "Request counts and latency histograms per route and model, queue depths and model "
        "states, in the Prometheus text exposition format.",
        {
            200: {
                "description": "The metrics.",
                "content": {
                    "text/plain": {
                        "schema": {"type": "string"},
                        "example": "# TYPE appliance_requests_total counter\n",
                    }
                },
            }
        },
    ),
    ("GET", "/device"): make_operation(
        OPS,
        "device",
        "What the device page shows",
        "This device, its models and their state, chart points of the last hour (one per "
        "health snapshot: cpu, memory, temperature, gpu, latency_ms, rps, tokens_s), the "
        "alerts firing and the latest alert changes, and the MQTT topics it answers.",
        {200: json_body("The device.", {"type": "object"})},
    ),
    ("GET", "/openapi.json"): make_operation(
        OPS,
        "openapi",
        "This API description",
        "The OpenAPI 3.1 document describing every route, generated from the running "
        "application's router.",
        {200: json_body("An OpenAPI 3.1 document.", {"type": "object"})},
    ),
    ("GET", "/docs"): make_operation(
        OPS,
        "docs",
        "API documentation page",
        "This document as a self-contained HTML page: no scripts, no external resources.",
        {
            200: {
                "description": "An HTML page.",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    ),
}

__all__ = ["SERVICE_OPERATIONS"]
