"""The HTTP security middlewares, shared by the appliance and the hub.

:func:`middlewares` returns two, run after the error mapper and before any handler:

1. ``guard`` — allow-list → Host/Origin → API key → scope → rate limit. It runs once the
   headers are parsed and before anything reads the body, so a refused client's body is
   never read (403/401/429 go out at once and the connection is closed). The client is
   the connection's address, or the one a trusted proxy forwarded
   (``security.trusted_proxies``); it is kept in ``request[CLIENT]`` for the access log
   (:class:`AccessLog`). A verified client certificate's CN may stand in for the key
   (``security.client_certs``).
2. ``body_limits`` — reads the body itself, counting HTTP chunks (``limits.max_chunks``)
   and bytes after Content-Encoding is undone (the body limit: a gzip bomb stops as soon
   as it passes it; aiohttp inflates in bounded steps), within ``limits.request_timeout``.
   Handlers then get it from ``request.read()`` as usual. Routes named in ``streamed``
   (method, route template) are left alone: their handlers read ``request.content`` in
   pieces and enforce limits of their own (the hub's artifact upload, far larger than
   any JSON body, is written to disk as it arrives).

Errors are raised as the shared exceptions (``appliance.errors``) so the one error mapper
of each application gives them its usual shape.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from appliance.config import LimitsConfig
from appliance.errors import PayloadTooLarge, RequestTimeout
from appliance.security.access import AccessPolicy
from appliance.security.tls import common_name
from appliance.transports.http.serverlog import ServerLog

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A route's scope, or None for a route that authenticates its callers itself (the hub's
# ingest, with device tokens).
ScopeOf = Callable[[str, str], "str | None"]

POLICY = web.AppKey("access_policy", AccessPolicy)
# The name of the API key a request came with, for logs ("" without one).
KEY_NAME: Final[web.RequestKey[str] | str] = (
    web.RequestKey("api_key_name", str) if hasattr(web, "RequestKey") else "api_key_name"
)
# The client's address as the checks saw it (behind a trusted proxy: the forwarded one).
CLIENT: Final[web.RequestKey[str] | str] = (
    web.RequestKey("client_address", str) if hasattr(web, "RequestKey") else "client_address"
)


def middlewares(
    policy: AccessPolicy,
    scope_of: ScopeOf,
    limits: LimitsConfig,
    max_body_bytes: int,
    streamed: frozenset[tuple[str, str]] = frozenset(),
) -> list[Middleware]:
    """The guard and the body limits for one application."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers = request.headers
        proxies = policy.proxies
        client = (
            proxies.client(request.remote, headers.getall(proxies.header, ()))
            if proxies.enabled
            else request.remote
        )
        request[CLIENT] = client or ""
        policy.check_network(client, headers.get(hdrs.HOST), headers.get(hdrs.ORIGIN))
        match = request.match_info
        resource = match.route.resource
        matched = resource is not None and match.http_exception is None
        template = resource.canonical if resource is not None and matched else request.path
        key = None
        if not policy.is_public(template):
            scope = scope_of(request.method, template) if matched else "any"
            if scope is not None:
                certificate = _certificate(request) if policy.store.certs else None
                key = policy.authenticate(
                    headers.get(hdrs.AUTHORIZATION), headers.get("X-API-Key"), certificate
                )
                if scope != "any":  # unknown paths: any valid key gets its 404
                    policy.authorize(key, scope)
        policy.limit(client, key)
        request[KEY_NAME] = key.name if key is not None else ""
        return await handler(request)

    @web.middleware
    async def body_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if streamed:
            resource = request.match_info.route.resource
            if resource is not None and (request.method, resource.canonical) in streamed:
                return await handler(request)
        if request.body_exists and request.headers.get(hdrs.UPGRADE) is None:
            length = request.content_length
            if length is not None and length > max_body_bytes:
                raise PayloadTooLarge(
                    f"request body is larger than the limit of {max_body_bytes} bytes", param="body"
                )
            content = request.content
            if (
                length is not None
                and content.is_eof()
                and hdrs.TRANSFER_ENCODING not in request.headers
                and hdrs.CONTENT_ENCODING not in request.headers
            ):
                # All of it arrived with the headers, as small bodies do: no chunks to
                # count, no bytes to inflate, no wait to time; its size is the length
                # checked above.
                request._read_bytes = content.read_nowait()
                return await handler(request)
            try:
                body = await _within(
                    limits.request_timeout, _read(request, max_body_bytes, limits.max_chunks)
                )
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {limits.request_timeout:g} s"
                ) from None
            # aiohttp's read() returns this from now on (its own cache of the body).
            request._read_bytes = body
        return await handler(request)

    return [guard, body_limits]


def _certificate(request: web.Request) -> str | None:
    """The CN of the client certificate the TLS handshake verified, if any."""
    transport = request.transport
    return common_name(transport.get_extra_info("peercert")) if transport else None


async def _within(seconds: float, work: Coroutine[Any, Any, bytes]) -> bytes:
    """``work`` within ``seconds``; a timeout context where there is one (Python 3.11+),
    so a request's body read costs no task of its own."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)


async def _read(request: web.Request, limit: int, max_chunks: int) -> bytes:
    parts: list[bytes] = []
    size = chunks = 0
    async for data, end_of_chunk in request.content.iter_chunks():
        size += len(data)
        if size > limit:
            decoded = " once decoded" if request.headers.get(hdrs.CONTENT_ENCODING) else ""
            raise PayloadTooLarge(
                f"request body is larger than the limit of {limit} bytes{decoded}", param="body"
            )
        chunks += end_of_chunk
        if chunks > max_chunks:
            raise PayloadTooLarge(
                f"request body comes in more than {max_chunks} chunks", param="body"
            )
        parts.append(data)
    return b"".join(parts)


def runner_options(limits: LimitsConfig) -> dict[str, Any]:
    """``web.AppRunner`` options enforcing the header and idle limits.

    aiohttp's keep-alive timer starts when a connection opens and after every response and
    closes a connection still waiting for its request then, so ``idle_timeout`` bounds
    idle keep-alive connections and clients that trickle their headers alike. aiohttp's
    own server log keeps clients' framing errors to one rate-limited line (``serverlog``).
    """
    return {
        "logger": ServerLog(logging.getLogger("aiohttp.server")),
        "keepalive_timeout": limits.idle_timeout,
        "max_line_size": limits.max_header_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": limits.max_headers,
        "access_log_class": AccessLog,
    }


class AccessLog(AbstractAccessLogger):
    """One line per request, naming the client as the checks saw it: behind a trusted
    proxy, the address it forwarded, not the proxy's. (aiohttp's own logger prints the
    connection's address and adds a time stamp the log handler already writes.)"""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        client = request.get(CLIENT) or request.remote or "-"
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s"',
            client,
            request.method,
            request.path_qs,
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
            request.headers.get(hdrs.USER_AGENT, "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


__all__ = ["CLIENT", "KEY_NAME", "POLICY", "AccessLog", "middlewares", "runner_options"]
