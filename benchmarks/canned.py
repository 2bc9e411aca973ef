"""The HTTP ceiling: aiohttp answering a canned Open Inference Protocol response.

It parses each request's JSON body with the appliance's own reader
(:func:`appliance.protocol.strictjson.loads`) and answers with a fixed body of
the same size as the appliance's answer, so its requests/s is what the transport alone
can do on this box. Run as ``python -m benchmarks.canned PORT RESPONSE_FILE``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

from appliance.protocol.strictjson import loads


def main() -> None:
    port, body = int(sys.argv[1]), Path(sys.argv[2]).read_bytes()

    async def infer(request: web.Request) -> web.Response:
        loads(await request.read())
        return web.Response(body=body, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
