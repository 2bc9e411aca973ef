"""Which API-key scope each HTTP route needs: the one table (docs/security.md).

``read`` lists and describes (models, metadata, health, metrics, the API description),
``infer`` runs models (and opens ``/ws``, which does both), ``admin`` changes the box (model
loading and unloading, configuration). A key with ``admin`` may do everything.

A route that is not in :data:`ROUTE_SCOPES` needs ``admin``: forgetting an entry locks a new
route down instead of opening it. To add a route, add its ``(method, path template)`` here;
the path template is the one it is registered with, e.g. ``"/v2/repository/models/{name}/load"``.
Routes matching ``security.public`` need no key at all.
"""

from __future__ import annotations

from appliance.config import Scope

READ: Scope = "read"
INFER: Scope = "infer"
ADMIN: Scope = "admin"

ROUTE_SCOPES: dict[tuple[str, str], Scope] = {
    # OpenAI-compatible
    ("GET", "/v1/models"): READ,
    ("GET", "/v1/models/{model}"): READ,
    ("POST", "/v1/chat/completions"): INFER,
    ("POST", "/v1/completions"): INFER,
    ("POST", "/v1/embeddings"): INFER,
    # Open Inference Protocol v2
    ("GET", "/v2"): READ,
    ("GET", "/v2/health/live"): READ,
    ("GET", "/v2/health/ready"): READ,
    ("GET", "/v2/models/{name}"): READ,
    ("GET", "/v2/models/{name}/versions/{version}"): READ,
    ("GET", "/v2/models/{name}/ready"): READ,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): READ,
    ("POST", "/v2/models/{name}/infer"): INFER,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): INFER,
    # Ollama-compatible
    ("GET", "/"): READ,
    ("GET", "/api/version"): READ,
    ("GET", "/api/tags"): READ,
    ("GET", "/api/ps"): READ,
    ("POST", "/api/show"): READ,
    ("POST", "/api/chat"): INFER,
    ("POST", "/api/generate"): INFER,
    ("POST", "/api/embed"): INFER,
    ("POST", "/api/embeddings"): INFER,
    # WebSocket: generate, infer and embed over one connection
    ("GET", "/ws"): INFER,
    # Model repository administration (appliance/transports/http/repository.py)
    ("POST", "/v2/repository/index"): ADMIN,
    ("POST", "/v2/repository/models/{name}/load"): ADMIN,
    ("POST", "/v2/repository/models/{name}/unload"): ADMIN,
    ("POST", "/admin/reload"): ADMIN,
    ("POST", "/admin/models/{name}/promote"): ADMIN,
    ("POST", "/admin/models/{name}/rollback"): ADMIN,
    # Operations
    ("GET", "/health"): READ,
    ("GET", "/device"): READ,
    ("GET", "/metrics"): READ,
    ("GET", "/openapi.json"): READ,
    ("GET", "/docs"): READ,
}


def scope_of(method: str, template: str) -> Scope:
    """The scope ``method template`` needs; unlisted routes need ``admin``."""
    method = "GET" if method == "HEAD" else method
    return ROUTE_SCOPES.get((method, template), ADMIN)


__all__ = ["ADMIN", "INFER", "READ", "ROUTE_SCOPES", "scope_of"]
