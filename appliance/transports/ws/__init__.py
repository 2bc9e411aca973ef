"""The WebSocket transport: ``/ws`` on the HTTP port, many requests per connection.

The protocol (``protocol.py``) is independent of the connection that carries it
(``connection.py``); errors become ``error`` messages in one place (``errors.py``). The
upgrade is an ordinary HTTP ``GET``, so everything the HTTP application checks before a
handler runs (its middlewares: allow-list, Host/Origin, API key with the ``infer`` scope,
rate limits) applies to ``/ws`` unchanged.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, web

from appliance.errors import RequestError
from appliance.transports.http.keys import CONFIG, CORE
from appliance.transports.http.security import CLIENT
from appliance.transports.ws.connection import Connection

log = logging.getLogger(__name__)

PATH = "/ws"
_OPEN = web.AppKey("websockets", set[web.WebSocketResponse])


async def websocket(request: web.Request) -> web.StreamResponse:
    """Upgrade to a WebSocket that carries requests and their replies (see docs/websocket.md)."""
    config = request.app[CONFIG].websocket
    ws = web.WebSocketResponse(
        max_msg_size=config.max_message_bytes,
        heartbeat=config.heartbeat or None,
    )
    if not ws.can_prepare(request).ok:
        raise RequestError(
            f"{PATH} needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
            param="Upgrade",
        )
    await ws.prepare(request)
    request.app[_OPEN].add(ws)
    peer = request.get(CLIENT) or request.remote or "unknown"  # behind a proxy: the client
    log.debug("WebSocket %s connected", peer)
    try:
        await Connection(ws, request.app[CORE], config, peer).serve()
    finally:
        request.app[_OPEN].discard(ws)
        if not ws.closed:
            await ws.close()
    return ws


async def _close_all(app: web.Application) -> None:
    """``on_shutdown``: tell clients the server is going away instead of cutting them."""
    open_now: set[web.WebSocketResponse] = app[_OPEN]
    await asyncio.gather(
        *(
            ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            for ws in list(open_now)
        ),
        return_exceptions=True,
    )


def setup(app: web.Application) -> None:
    """Serve ``/ws`` on ``app`` unless ``websocket.enabled`` is off."""
    if not app[CONFIG].websocket.enabled:
        return
    app[_OPEN] = set()
    app.router.add_get(PATH, websocket)
    app.on_shutdown.append(_close_all)


__all__ = ["PATH", "setup", "websocket"]
