"""Content negotiation between JSON and MessagePack on the inference routes.

A MessagePack request gets a MessagePack answer unless ``Accept`` prefers JSON; a JSON
request gets MessagePack only when ``Accept`` prefers it. Errors follow the same rule, so a
client decodes every answer of a route the same way.
"""

from __future__ import annotations

from aiohttp import web

from appliance.protocol.oip_msgpack import CONTENT_TYPES


def msgpack_request(request: web.Request) -> bool:
    """The body is MessagePack (by its ``Content-Type``)."""
    return request.content_type in CONTENT_TYPES


def answers_msgpack(request: web.Request, is_msgpack: bool | None = None) -> bool:
    """Whether the answer to ``request`` should be MessagePack; ``is_msgpack``: what
    :func:`msgpack_request` says of it, where the caller has asked already."""
    if is_msgpack is None:
        is_msgpack = msgpack_request(request)
    accept = request.headers.get("Accept", "")
    if "msgpack" not in accept.lower() and not is_msgpack:
        return False  # what the parse below concludes without a MessagePack type in Accept
    msgpack_q: float | None = None
    json_q: float | None = None
    for part in accept.split(","):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        if media in CONTENT_TYPES:
            msgpack_q = max(msgpack_q or 0.0, _quality(params))
        elif media == "application/json":
            json_q = max(json_q or 0.0, _quality(params))
    if msgpack_q == 0:  # q=0: explicitly not acceptable
        return False
    if msgpack_q is not None and msgpack_q > (json_q or 0.0):
        return True
    if json_q is not None and json_q > (msgpack_q or 0.0):
        return False
    return is_msgpack  # no (or no clear) preference: answer in kind


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 1.0
    return 1.0
