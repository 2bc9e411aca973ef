"""Ollama-compatible routes, so Home Assistant's Ollama integration and Open WebUI work.

The subset real clients use: ``GET /`` ("Ollama is running"), ``/api/version``,
``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/chat``, ``/api/generate``, ``/api/embed``
and ``/api/embeddings``. Answers stream as NDJSON unless ``stream`` is false; as on the
OpenAI routes the first token is awaited before the status is sent, so a request the model
rejects still gets a 4xx (``ollama_stream.py``). Errors are ``{"error": "..."}`` (mapped in
``errors.py``); one that happens after streaming started arrives as a last ``{"error": ...}``
line, as Ollama does.

Only language models are listed: tensor models are served by the Open Inference Protocol.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence

from aiohttp import web
from pydantic import BaseModel

from appliance.core.service import Core
from appliance.core.types import Capability, ModelInfo, ModelState, TokenChunk, ToolCall
from appliance.errors import RequestError
from appliance.transports.http import device_page
from appliance.transports.http.errors import read_json
from appliance.transports.http.keys import CORE, MODEL
from appliance.transports.http.ollama_answers import (
    AssistantMessage,
    CallFunction,
    CallOut,
    ChatAnswer,
    Embed,
    Embeddings,
    GenerateAnswer,
    ModelDetails,
    Running,
    RunningModel,
    Show,
    TagModel,
    Tags,
    Version,
)
from appliance.transports.http.ollama_schema import (
    LATEST,
    OLLAMA_VERSION,
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequestBody,
    ShowRequest,
    keep_alive_seconds,
    model_ref,
    parse,
)
from appliance.transports.http.ollama_stream import (
    Timing,
    final_fields,
    iso,
    json_answer,
    now,
    respond,
)

routes = web.RouteTableDef()

_TEXT = frozenset({Capability.GENERATE, Capability.EMBED})
# Models stay loaded for as long as they are served; Ollama shows "Forever" for this.
_FOREVER = "9999-12-31T23:59:59Z"


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    """Ollama's liveness answer; Ollama clients probe it before anything else. Browsers
    (``Accept: text/html``) get the device page instead."""
    if device_page.wants_html(request):
        return device_page.page(request)
    return web.Response(text="Ollama is running")


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return json_answer(Version(version=OLLAMA_VERSION))


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    models = [_tag(m) for m in request.app[CORE].list_models() if _language_model(m)]
    return json_answer(Tags(models=models))


@routes.get("/api/ps")
async def running(request: web.Request) -> web.Response:
    models = [
        RunningModel(**_tag(m).model_dump(), expires_at=_FOREVER, context_length=m.context_length)
        for m in request.app[CORE].list_models()
        if m.ready and _language_model(m)
    ]
    return json_answer(Running(models=models))


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    body: ShowRequest = parse(ShowRequest, await read_json(request))
    name, version = model_ref(body.model or body.name)
    info = request.app[CORE].model(name, version)
    request[MODEL] = info.name
    capabilities = [
        c
        for cap, c in ((Capability.GENERATE, "completion"), (Capability.EMBED, "embedding"))
        if cap in info.capabilities
    ]
    model_info: dict[str, object] = {
        "general.name": info.name,
        "appliance.runtime": info.runtime,
        "appliance.version": info.version,
        "appliance.state": info.state.value,
    }
    if info.context_length is not None:
        model_info["appliance.context_length"] = info.context_length
    return json_answer(
        Show(
            modelfile=f"# Served by the appliance from its model repository.\nFROM {info.name}\n",
            details=_details(info),
            model_info=model_info,
            capabilities=capabilities,
            modified_at=iso(info.created),
        )
    )


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    body: ChatRequest = parse(ChatRequest, await read_json(request))
    name, version = _target(request, body.model)
    _keep_alive(request, name, version, body.keep_alive)
    if body.thinking():
        raise RequestError(f"{json.dumps(body.model)} does not support thinking", param="think")
    if any(m.images for m in body.messages):
        raise RequestError(f"{json.dumps(body.model)} does not support images", param="messages")
    core = request.app[CORE]
    if not body.messages:  # Ollama's way to load (or, with keep_alive 0, unload) a model
        await _require_ready(core, name, version, unload=body.unload)
        return json_answer(
            ChatAnswer(
                model=body.model,
                created_at=now(),
                done=True,
                done_reason="unload" if body.unload else "load",
                message=AssistantMessage(content=""),
            )
        )
    stream = await core.generate(name, body.to_core(), version=version)

    def answer(
        chunk: TokenChunk, timing: Timing | None, calls: Sequence[ToolCall] = ()
    ) -> BaseModel:
        message = AssistantMessage(
            content=chunk.text,
            tool_calls=[
                CallOut(id=c.id, function=CallFunction(name=c.name, arguments=dict(c.arguments)))
                for c in calls
            ]
            or None,
        )
        return ChatAnswer(
            model=body.model,
            created_at=now(),
            done=timing is not None,
            message=message,
            **final_fields(chunk, timing),
        )

    return await respond(request, stream, answer, body.streaming, started)


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter_ns()
    body: GenerateRequestBody = parse(GenerateRequestBody, await read_json(request))
    name, version = _target(request, body.model)
    _keep_alive(request, name, version, body.keep_alive)
    unsupported = [
        ("suffix", "insert"),
        ("template", "custom templates"),
        ("context", "context"),
        ("images", "images"),
    ]
    for field, what in unsupported:
        if getattr(body, field):
            raise RequestError(f"{json.dumps(body.model)} does not support {what}", param=field)
    if body.thinking():
        raise RequestError(f"{json.dumps(body.model)} does not support thinking", param="think")
    core = request.app[CORE]
    if not body.prompt:  # load (or unload) only, as Ollama does for an empty prompt
        await _require_ready(core, name, version, unload=body.unload)
        return json_answer(
            GenerateAnswer(
                model=body.model,
                created_at=now(),
                done=True,
                done_reason="unload" if body.unload else "load",
                response="",
            )
        )
    stream = await core.generate(name, body.to_core(), version=version)

    def answer(chunk: TokenChunk, timing: Timing | None) -> BaseModel:
        return GenerateAnswer(
            model=body.model,
            created_at=now(),
            done=timing is not None,
            response=chunk.text,
            **final_fields(chunk, timing),
        )

    return await respond(request, stream, answer, body.streaming, started)


@routes.post("/api/embed")
async def embed(request: web.Request) -> web.Response:
    started = time.perf_counter_ns()
    body: EmbedRequest = parse(EmbedRequest, await read_json(request))
    name, version = _target(request, body.model)
    core = request.app[CORE]
    texts = body.texts()
    if not texts:  # Ollama loads the model and answers no vectors
        await _require_ready(core, name, version)
        return json_answer(Embed(model=body.model, embeddings=[]))
    result = await core.embed(name, texts, version=version)
    vectors = result.vectors
    if body.dimensions is not None:
        vectors = [_normalised(v[: body.dimensions]) for v in vectors]
    return json_answer(
        Embed(
            model=body.model,
            embeddings=vectors,
            load_duration=0,
            total_duration=time.perf_counter_ns() - started,
            prompt_eval_count=result.prompt_tokens,
        )
    )


@routes.post("/api/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body: EmbeddingsRequest = parse(EmbeddingsRequest, await read_json(request))
    name, version = _target(request, body.model)
    core = request.app[CORE]
    if not body.prompt:
        await _require_ready(core, name, version)
        return json_answer(Embeddings(embedding=[]))
    result = await core.embed(name, [body.prompt], version=version)
    return json_answer(Embeddings(embedding=result.vectors[0]))


# ------------------------------------------------------------------------ helpers


def _target(request: web.Request, reference: str) -> tuple[str, str | None]:
    """The model a request is for; an unknown one is a 404 before anything else, as in Ollama."""
    name, version = model_ref(reference)
    request[MODEL] = name
    request.app[CORE].model(name, version)
    return name, version


def _keep_alive(
    request: web.Request, name: str, version: str | None, value: float | str | None
) -> None:
    """Ollama's per-request ``keep_alive``: how long the model stays loaded once idle (0:
    unload as soon as it is idle; negative: forever)."""
    # As in Ollama, every request sets it: one without keep_alive restores the default.
    seconds = None if value is None else keep_alive_seconds(value)
    request.app[CORE].keep_alive(
        name, version, None if value is None else -1.0 if seconds is None else seconds
    )


async def _require_ready(
    core: Core, name: str, version: str | None, *, unload: bool = False
) -> None:
    """404 for an unknown model, 503 for one that cannot serve; loads it unless ``unload``
    (what loading it in Ollama does)."""
    info = core.model(name, version)
    if unload:
        return
    if info.state is not ModelState.READY:
        await core.load(name, version)


def _language_model(info: ModelInfo) -> bool:
    if info.state is ModelState.FAILED:
        return False
    if info.ready:
        return bool(info.capabilities & _TEXT)
    return info.runtime == "gguf"  # still loading: the file format tells


def _tag(info: ModelInfo) -> TagModel:
    reference = f"{info.name}:{LATEST}"
    identity = f"{info.name}\0{info.version}\0{info.created}\0{info.size}".encode()
    return TagModel(
        name=reference,
        model=reference,
        modified_at=iso(info.created),
        size=info.size,
        # Ollama's digest identifies a manifest; ours identifies the served file version.
        digest=hashlib.sha256(identity).hexdigest(),
        details=_details(info),
    )


def _details(info: ModelInfo) -> ModelDetails:
    """Family, size and quantization as the model file states them (GGUF metadata)."""
    family = info.details.get("family", "")
    return ModelDetails(
        format=info.runtime,
        family=family,
        families=[family] if family else None,
        parameter_size=info.details.get("parameter_size", ""),
        quantization_level=info.details.get("quantization_level", ""),
    )


def _normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


__all__ = ["routes"]
