"""The messages of the WebSocket protocol, separate from the connection that carries them.

Every message is a JSON object in a text frame, or the same object as MessagePack in a
binary frame (tensor ``data`` may then be raw bytes; see ``protocol/oip_msgpack.py``). Replies
go back in the kind of frame their request came in. Every request carries an ``id`` (a
string or an integer) that its replies echo, so one connection can carry many requests at
once; replies of different requests interleave.

Client → server, by ``type``:

- ``generate``: ``model`` plus ``prompt`` (completion) or ``messages`` (chat), and sampling
  parameters; answered by ``token`` messages and one ``done``. A chat may offer ``tools``
  (with ``tool_choice`` and ``parallel_tool_calls``, as on OpenAI's API); the calls the model
  makes stream as ``tool_call`` messages (``index``; ``call_id`` and ``name`` first, then
  ``arguments`` text in pieces) and come whole in ``done.tool_calls``. Messages may carry
  ``tool_calls`` (assistant) and ``tool_call_id`` (tool) as on OpenAI's API.
- ``infer``: ``model`` (``version``), Open Inference Protocol ``inputs`` (``outputs``);
  answered by one ``result``.
- ``embed``: ``model`` and ``input`` (a text or a list); answered by one ``embeddings``.
- ``models``: answered by one ``models``.
- ``cancel``: stops the request with that ``id``; it answers ``cancelled``.
- ``ping``: answered by ``pong`` (for clients that cannot send WebSocket ping frames).

Any request can instead be answered by one ``error``: ``status`` (the HTTP status the same
problem gets on HTTP), ``error`` (the message) and, when known, ``param``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError

from appliance.core.sampling import sampling_params
from appliance.core.tools import conversation, tool_use
from appliance.core.types import GenerateRequest, ToolCall, ToolCallDelta
from appliance.errors import RequestError
from appliance.protocol import oip_msgpack, strictjson
from appliance.protocol.problems import first_problem

# Strict: true is not the id 1, and 1 is not the id "1"; replies echo the id as sent.
RequestId = Annotated[str, Field(min_length=1, max_length=128)] | StrictInt


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class Turn(_Message):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: Any = None  # checked by the core (appliance.core.tools)
    tool_call_id: str | None = None


class Generate(_Message):
    """Text generation: ``prompt`` for a completion, ``messages`` for a chat."""

    type: Literal["generate"]
    id: RequestId
    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[Turn] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    json_schema: dict[str, Any] | None = Field(
        default=None, description="Constrain the answer to this JSON Schema."
    )
    json_object: bool = Field(default=False, description="Constrain the answer to JSON.")
    tools: Any = Field(default=None, description="Functions the model may call (chat).")
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    def to_core(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("give either 'prompt' or 'messages'", param="prompt")
        params = sampling_params(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            json_schema=self.json_schema,
            json_object=self.json_object,
        )
        if self.messages is not None:
            turns = conversation(
                (m.role, m.content, m.tool_calls, m.tool_call_id) for m in self.messages
            )
            return GenerateRequest(
                messages=turns,
                params=params,
                tools=tool_use(self.tools, self.tool_choice, self.parallel_tool_calls),
            )
        if self.tools is not None:
            raise RequestError("tools need messages (a chat)", param="tools")
        return GenerateRequest(prompt=self.prompt, params=params)


class Infer(_Message):
    """Tensor inference with Open Inference Protocol v2 tensors."""

    type: Literal["infer"]
    id: RequestId
    model: str = Field(min_length=1)
    version: str | None = None
    inputs: list[Any]
    outputs: list[Any] | None = None
    parameters: dict[str, Any] | None = None

    def oip_body(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "parameters": self.parameters or {}}


class Embed(_Message):
    type: Literal["embed"]
    id: RequestId
    model: str = Field(min_length=1)
    input: str | list[str]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Models(_Message):
    type: Literal["models"]
    id: RequestId


class Cancel(_Message):
    type: Literal["cancel"]
    id: RequestId


class Ping(_Message):
    type: Literal["ping"]
    id: RequestId | None = None


Request = Annotated[Generate | Infer | Embed | Models | Cancel | Ping, Field(discriminator="type")]
Work = Generate | Infer | Embed  # what runs as a task and can be cancelled
_REQUEST: TypeAdapter[Generate | Infer | Embed | Models | Cancel | Ping] = TypeAdapter(Request)
TYPES = ("generate", "infer", "embed", "models", "cancel", "ping")


def decode(data: str | bytes) -> tuple[Any, Request]:
    """A frame → (its id, the validated message).

    Raises :class:`BadMessage`, which carries the id when one could be read, so the error
    reply can still be correlated with the request that caused it.
    """
    document = _document(data)
    raw_id = document.get("id") if isinstance(document, dict) else None
    echo = raw_id if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
    if not isinstance(document, dict):
        raise BadMessage(echo, RequestError("a message must be an object", param="type"))
    kind = document.get("type")
    if kind not in TYPES:
        raise BadMessage(
            echo,
            RequestError(
                f"unknown message type {kind!r}; allowed: {', '.join(TYPES)}", param="type"
            ),
        )
    try:
        return echo, _REQUEST.validate_python(document)
    except ValidationError as exc:
        raise BadMessage(echo, _request_error(exc)) from None


class BadMessage(Exception):
    """A frame that is not a valid message; ``id`` is its id when one could be read."""

    def __init__(self, request_id: Any, error: RequestError) -> None:
        super().__init__(error.message)
        self.id = request_id
        self.error = error


def _document(data: str | bytes) -> Any:
    if isinstance(data, bytes):
        try:
            return oip_msgpack.unpack(data)
        except RequestError as exc:
            raise BadMessage(None, exc) from None
    try:
        return strictjson.loads(data, what="the message", param=None)
    except RequestError as exc:
        raise BadMessage(None, exc) from None


def _request_error(exc: ValidationError) -> RequestError:
    # The discriminator's tag is not a field; drop it.
    return first_problem(exc, skip=1).request_error("message")


# -------------------------------------------------------------------- server → client


def token(request_id: Any, text: str) -> dict[str, Any]:
    return {"type": "token", "id": request_id, "text": text}


def tool_call(request_id: Any, delta: ToolCallDelta) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "tool_call", "id": request_id, "index": delta.index}
    if delta.id is not None:
        message.update(call_id=delta.id, name=delta.name)
    message["arguments"] = delta.arguments
    return message


def done(
    request_id: Any,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    calls: list[ToolCall] | None = None,
) -> dict[str, Any]:
    message = {
        "type": "done",
        "id": request_id,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "name": c.name, "arguments": dict(c.arguments)} for c in calls
        ]
    return message


def cancelled(request_id: Any) -> dict[str, Any]:
    return {"type": "cancelled", "id": request_id}


def pong(request_id: Any) -> dict[str, Any]:
    return {"type": "pong", "id": request_id}
