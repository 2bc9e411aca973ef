"""The OpenAPI 3.1 description of every route, built once per application.

The documentation of each route is data in ``routes.py`` (``OPERATIONS``, keyed by
method and path template). :func:`build` walks the application's router and looks every
route up there, so a route added without documentation cannot go unnoticed: in strict mode
(the tests) it raises :class:`UndocumentedRoute`; at start-up the daemon logs it and still
serves, because missing docs are no reason to take a box off the LAN.

Request and response bodies of the OpenAI- and Ollama-compatible routes come from the
pydantic models that validate them; the rest are hand-written JSON Schemas
(``schemas.py``). An ``on_startup`` hook checks that every route is documented (and
logs those that are not); the document and the docs page (``docs_page.py``) are rendered
once, when they are first asked for, and served from the application's state after that:
a box nobody reads the docs of keeps the megabytes they take.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from appliance import __version__
from appliance.transports.http.openapi import docs_page
from appliance.transports.http.openapi.parts import DESCRIPTION, PATH_PARAMETERS, TAGS
from appliance.transports.http.openapi.routes import OPERATIONS, PYDANTIC_MODELS
from appliance.transports.http.openapi.schemas import REF, SCHEMAS
from appliance.transports.http.scopes import scope_of

log = logging.getLogger(__name__)

UNDOCUMENTED = "Undocumented"


# --------------------------------------------------------------------------- building


class UndocumentedRoute(LookupError):
    """Routes of the application that :data:`OPERATIONS` does not describe."""

    def __init__(self, routes: list[tuple[str, str]]) -> None:
        listed = ", ".join(f"{method} {path}" for method, path in routes)
        super().__init__(
            f"routes without documentation: {listed}; describe them in "
            "appliance/transports/http/openapi/routes.py (OPERATIONS)"
        )
        self.routes = routes


def routes_of(router: web.UrlDispatcher) -> list[tuple[str, str]]:
    """``(method, path template)`` of every route, in registration order.

    aiohttp adds a HEAD route to every GET; HEAD is implied by GET in HTTP (and in
    OpenAPI practice), so only a HEAD without its GET counts as a route of its own.
    """
    found: list[tuple[str, str]] = []
    for resource in router.resources():
        methods = [route.method for route in resource]
        for method in methods:
            if method == "HEAD" and "GET" in methods:
                continue
            key = (method, resource.canonical)
            if key not in found:
                found.append(key)
    return found


def components() -> dict[str, Any]:
    """Every schema the operations refer to: pydantic's and the hand-written ones."""
    schemas: dict[str, Any] = {}
    families = [copy.deepcopy(SCHEMAS)]
    for prefix, models in PYDANTIC_MODELS.items():
        _, generated = models_json_schema(models, ref_template=REF + prefix + "{model}")
        families.append(
            {prefix + name: schema for name, schema in generated.get("$defs", {}).items()}
        )
    for family in families:
        clash = schemas.keys() & family.keys()
        if clash:  # a silent overwrite would describe one body with another's schema
            raise ValueError(f"schema names defined twice: {sorted(clash)}")
        schemas.update(family)
    return dict(sorted(schemas.items()))


def build(router: web.UrlDispatcher, *, strict: bool = True) -> dict[str, Any]:
    """An OpenAPI 3.1 document for the routes in ``router``.

    With ``strict``, a route missing from :data:`OPERATIONS` raises
    :class:`UndocumentedRoute`; without, it is described as undocumented and logged.
    """
    # Table order, not registration order: the table groups related routes for readers.
    order = {key: i for i, key in enumerate(OPERATIONS)}
    routes = sorted(routes_of(router), key=lambda key: order.get(key, len(order)))
    missing = [key for key in routes if key not in OPERATIONS]
    if missing and strict:
        raise UndocumentedRoute(missing)
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes:
        if (method, path) in OPERATIONS:
            operation = copy.deepcopy(OPERATIONS[(method, path)])
        else:
            log.warning(
                "route %s %s has no documentation in openapi.routes.OPERATIONS", method, path
            )
            operation = _undocumented(router, method, path)
        names = re.findall(r"{(\w+)(?::[^}]*)?}", path)
        if names:
            operation["parameters"] = [
                _path_parameter(n, strict=strict) for n in names
            ] + operation.get("parameters", [])
        operation["x-required-scope"] = scope_of(method, path)
        paths.setdefault(path, {})[method.lower()] = operation
    used = {op["tags"][0] for ops in paths.values() for op in ops.values()}
    tags = [tag for tag in TAGS if tag["name"] in used]
    if UNDOCUMENTED in used:
        tags.append({"name": UNDOCUMENTED, "description": "Routes nobody described yet."})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Appliance",
            "version": __version__,
            "summary": "Edge AI appliance: quantized ONNX and GGUF models over HTTP.",
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": copy.deepcopy(tags),
        "paths": paths,
        # Either header works; `{}`: no key, for routes in security.public and boxes that
        # serve loopback only (docs/security.md). x-required-scope names each route's scope.
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}, {}],
        "components": {"schemas": components(), "securitySchemes": SECURITY_SCHEMES},
    }


SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`appliance keys create`) as `Authorization: Bearer <key>`. "
        "Keys have scopes: `read`, `infer`, `admin` (each operation's `x-required-scope`).",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same API key in an `X-API-Key` header. Keys in the query string "
        "are never accepted (they end up in logs and browser history).",
    },
}


def _path_parameter(name: str, *, strict: bool) -> dict[str, Any]:
    details = PATH_PARAMETERS.get(name)
    if details is None:
        if strict:
            raise LookupError(
                f"path parameter {{{name}}} is not described in openapi.parts.PATH_PARAMETERS"
            )
        details = {"schema": {"type": "string"}}
    return {"name": name, "in": "path", "required": True, **copy.deepcopy(details)}


def _undocumented(router: web.UrlDispatcher, method: str, path: str) -> dict[str, Any]:
    doc = ""
    for resource in router.resources():
        for route in resource:
            if resource.canonical == path and route.method == method:
                doc = (route.handler.__doc__ or "").strip()
    summary = doc.splitlines()[0] if doc else "Undocumented route"
    return {
        "tags": [UNDOCUMENTED],
        "summary": summary,
        "responses": {"default": {"description": "Not documented yet."}},
    }


# ------------------------------------------------------------------ serving the result


@dataclass(frozen=True)
class Published:
    """The description of one application, rendered once at start-up."""

    document: dict[str, Any]
    json: bytes
    page: docs_page.Page


class Publication:
    """The description of one application, rendered on first use and kept.

    Rendering takes tens of milliseconds, a few hundred on a Pi 4: on a worker thread,
    once, however many requests ask at the same time; a client that goes away meanwhile
    does not cancel it for the others. The router is complete when this is made.
    """

    def __init__(self, router: web.UrlDispatcher) -> None:
        self._router = router
        self._rendering: asyncio.Task[Published] | None = None

    async def get(self) -> Published:
        task = self._rendering
        if task is None or (task.done() and (task.cancelled() or task.exception())):  # retry
            task = self._rendering = asyncio.get_running_loop().create_task(
                asyncio.to_thread(_render, self._router), name="appliance-openapi-render"
            )
        return await asyncio.shield(task)


PUBLISHED = web.AppKey("openapi", Publication)


async def publish(app: web.Application) -> None:
    """``on_startup`` hook: the router is complete; log routes nobody documented, and
    describe the app when the document or the docs page is first asked for."""
    for method, path in routes_of(app.router):
        if (method, path) not in OPERATIONS:
            log.warning(
                "route %s %s has no documentation in openapi.routes.OPERATIONS", method, path
            )
    app[PUBLISHED] = Publication(app.router)


def _render(router: web.UrlDispatcher) -> Published:
    document = build(router, strict=False)
    return Published(
        document=document,
        json=json.dumps(document, ensure_ascii=False).encode(),
        page=docs_page.Page(document),
    )


__all__ = [
    "PUBLISHED",
    "UNDOCUMENTED",
    "Publication",
    "Published",
    "UndocumentedRoute",
    "build",
    "components",
    "publish",
    "routes_of",
]
