"""The OpenAPI description of every route, and a self-contained docs page rendered from it."""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web

from appliance import __version__


def spec(router: web.UrlDispatcher) -> dict[str, Any]:
    """An OpenAPI 3.1 document for the routes in ``router``."""
    paths: dict[str, Any] = {}
    for resource in router.resources():
        path = resource.canonical
        for route in resource:
            if route.method == "HEAD":
                continue
            paths.setdefault(path, {})[route.method.lower()] = {
                "summary": (route.handler.__doc__ or "").strip().splitlines()[0:1] or [""],
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Appliance", "version": __version__},
        "paths": paths,
    }


def docs_page(document: dict[str, Any]) -> str:
    rows = "".join(
        f"<li><code>{html.escape(method.upper())} {html.escape(path)}</code></li>"
        for path, ops in document["paths"].items()
        for method in ops
    )
    return f"<!doctype html><title>Appliance API</title><ul>{rows}</ul>"
