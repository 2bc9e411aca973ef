"""The request bodies ``<base>/infer/<model>`` accepts, turned into core calls.

- Open Inference Protocol v2: ``{"inputs": [{"name", "datatype", "shape", "data"}], ...}``.
  In MessagePack a tensor's ``data`` may also be raw little-endian bytes, and numeric
  output tensors come back as raw bytes (``protocol/oip_msgpack.py``, as over HTTP).
- Simple tensor form: ``{"data": [...]}`` (or a bare array) for a single-input model, or
  ``{"inputs": {"<name>": [...]}}``; nested lists take the input's datatype, and a missing
  batch dimension is added (and taken off the outputs again).
- Text generation: ``{"prompt": "..."}`` (raw completion) or ``{"messages": [{"role",
  "content"}]}`` (the chat template) with optional sampling fields and ``"stream": true``;
  a payload that is not JSON is one user message, through the chat template.
  A chat may offer ``tools`` (``tool_choice``, ``parallel_tool_calls``) as on OpenAI's API;
  the calls made come whole in the final reply's ``tool_calls``.
- Embeddings: ``{"input": "text" | ["text", ...]}``.

``id`` and ``reply_to`` belong to the envelope and are allowed beside any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.core.tools import conversation, tool_use
from appliance.core.types import (
    DATATYPES,
    Array,
    ChatMessage,
    GenerateRequest,
    InferResult,
    ModelInfo,
    ModelState,
    SamplingParams,
    TensorSpec,
)
from appliance.errors import ModelUnavailable, RequestError
from appliance.protocol import oip_msgpack
from appliance.protocol.oip import decode_request, encode_outputs

ENVELOPE_KEYS = ("id", "reply_to")
MAX_STOP = 4


@dataclass
class TensorCall:
    inputs: dict[str, Array]
    outputs: list[str] | None
    oip: bool  # answer in the Open Inference Protocol shape
    batched: set[str] = field(default_factory=set)  # inputs that got a batch dimension added
    oip_id: str | None = None
    binary: bool = False  # MessagePack: answer numeric tensors as raw bytes


@dataclass
class GenerateCall:
    request: GenerateRequest
    stream: bool


@dataclass
class EmbedCall:
    texts: list[str]


Call = TensorCall | GenerateCall | EmbedCall


def parse(body: Any, info: ModelInfo, *, binary: bool = False) -> Call:
    """Decide what ``body`` asks of the model ``info`` describes, validating its shape.
    ``binary``: the body came as MessagePack."""
    if isinstance(body, str):
        # Plain text is what a person types: one user turn through the model's chat template,
        # as Ollama's /api/generate does (a chat model fed raw text rambles). {"prompt": ...}
        # is the raw completion, without the template.
        return GenerateCall(GenerateRequest(messages=(ChatMessage("user", body),)), stream=False)
    if isinstance(body, list):
        return _simple(info, {"data": body})
    if not isinstance(body, dict):
        raise RequestError(
            "the payload must be a JSON object, an array of numbers, or text (a prompt)",
            param="payload",
        )
    if isinstance(body.get("inputs"), list):
        return _oip(body, binary)
    if "inputs" in body or "data" in body:
        return _simple(info, body)
    if "prompt" in body or "messages" in body:
        return _generate(body)
    if "input" in body:
        return _embed(body)
    raise RequestError(
        "the request needs 'inputs' (Open Inference Protocol), 'data' (one tensor), "
        "'prompt' or 'messages' (text generation) or 'input' (embeddings)",
        param="payload",
    )


# ------------------------------------------------------------------------------ tensors


def _oip(body: dict[str, Any], binary: bool) -> TensorCall:
    # MessagePack may carry raw tensor bytes: the shared codec maps them onto the binary
    # extension, so every check is the one HTTP and gRPC clients meet.
    decoded = oip_msgpack.decode_request(body) if binary else decode_request(body)
    return TensorCall(decoded.inputs, decoded.outputs, oip=True, oip_id=decoded.id, binary=binary)


def _simple(info: ModelInfo, body: dict[str, Any]) -> TensorCall:
    _only(body, {"data", "inputs", "outputs"})
    if info.state is not ModelState.READY:
        raise ModelUnavailable(info.name, info.state.value, info.error)
    specs = {spec.name: spec for spec in info.signature.inputs}
    if "data" in body:
        if "inputs" in body:
            raise RequestError("give 'data' or 'inputs', not both", param="data")
        if len(specs) != 1:
            raise RequestError(
                f"model {info.name!r} takes {len(specs)} inputs ({', '.join(specs)}); name "
                'them: {"inputs": {"<name>": [...]}}',
                param="data",
            )
        raw = {next(iter(specs)): body["data"]}
    else:
        raw = body["inputs"]
        if not isinstance(raw, dict):
            raise RequestError("'inputs' must map input names to data", param="inputs")
    outputs = body.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs)
    ):
        raise RequestError("'outputs' must be a list of output names", param="outputs")
    call = TensorCall({}, outputs, oip=False)
    for name, value in raw.items():
        spec = specs.get(name)
        if spec is None:
            raise RequestError(
                f"unexpected input {name!r}; the model takes: {', '.join(specs)}",
                param="inputs",
            )
        array, added = _tensor(spec, value)
        call.inputs[name] = array
        if added:
            call.batched.add(name)
    return call


def _tensor(spec: TensorSpec, value: Any) -> tuple[Array, bool]:
    label = f"input {spec.name!r}"
    if spec.datatype == "BYTES":
        raise RequestError(
            f"{label} is BYTES: use the Open Inference Protocol form", param="inputs"
        )
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise RequestError(
            f"{label}: data must be a number or nested lists of equal length", param="inputs"
        ) from None
    kind = array.dtype.kind
    want = DATATYPES[spec.datatype]
    if kind not in "biuf":
        raise RequestError(
            f"{label}: data must be numbers (nested lists of equal length)", param="inputs"
        )
    if want.kind == "b" and kind != "b":
        raise RequestError(f"{label} is BOOL: data must be true/false", param="inputs")
    if want.kind != "b" and kind == "b":
        raise RequestError(f"{label} is {spec.datatype}: data must be numbers", param="inputs")
    if want.kind in "iu" and kind == "f":
        raise RequestError(f"{label} is {spec.datatype}: data must be integers", param="inputs")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(want)
    except (OverflowError, ValueError) as exc:
        raise RequestError(f"{label}: a value does not fit {spec.datatype}: {exc}") from None
    if array.ndim == len(spec.shape) - 1:
        return array[np.newaxis], True
    return array, False


def tensor_reply(call: TensorCall, info: ModelInfo, result: InferResult) -> dict[str, Any]:
    """The ``data`` of a tensor reply: OIP's response body, or plain ``{name: value}``."""
    if call.oip:
        if call.binary:
            tensors = oip_msgpack.encode_outputs_msgpack(result.outputs)
        else:
            tensors, _ = encode_outputs(result.outputs, set())
        data: dict[str, Any] = {
            "model_name": info.name,
            "model_version": info.version,
            "outputs": tensors,
        }
        if call.oip_id is not None:
            data["id"] = call.oip_id
        return data
    squeeze = bool(call.batched)
    return {
        "model_name": info.name,
        "model_version": info.version,
        "outputs": {name: plain(value, squeeze) for name, value in result.outputs.items()},
    }


def plain(value: Array, squeeze: bool) -> Any:
    """A tensor as JSON-ready nested lists; ``squeeze`` takes a batch of one off."""
    array = np.asarray(value)
    if squeeze and array.ndim >= 1 and array.shape[0] == 1:
        array = array[0]
    if array.dtype.kind in "OSU":
        flat = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            for v in array.reshape(-1)
        ]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


# ---------------------------------------------------------------------------- language


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: Any = None  # checked by the core (appliance.core.tools)
    tool_call_id: str | None = None


class _Generate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Any = None
    reply_to: Any = None
    prompt: str | None = None
    messages: list[_Message] | None = Field(default=None, min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return value


_SAMPLING = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


def _generate(body: dict[str, Any]) -> GenerateCall:
    parsed = _validate(_Generate, body)
    if parsed.prompt is not None and parsed.messages is not None:
        raise RequestError("give 'prompt' or 'messages', not both", param="messages")
    values: dict[str, Any] = {
        k: v for k, v in parsed.model_dump(include=set(_SAMPLING)).items() if v is not None
    }
    stop = parsed.stop
    values["stop"] = tuple([stop] if isinstance(stop, str) else (stop or []))
    messages = None
    tools = None
    if parsed.messages is not None:
        messages = conversation(
            (m.role, m.content, m.tool_calls, m.tool_call_id) for m in parsed.messages
        )
        tools = tool_use(parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls)
    elif parsed.tools is not None:
        raise RequestError("tools need messages (a chat)", param="tools")
    request = GenerateRequest(
        prompt=parsed.prompt, messages=messages, params=SamplingParams(**values), tools=tools
    )
    return GenerateCall(request, stream=parsed.stream)


class _Embed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Any = None
    reply_to: Any = None
    input: str | list[str]


def _embed(body: dict[str, Any]) -> EmbedCall:
    parsed = _validate(_Embed, body)
    texts = [parsed.input] if isinstance(parsed.input, str) else parsed.input
    return EmbedCall(texts)


def _validate(model: type[_Generate] | type[_Embed], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        if err["type"] == "extra_forbidden":
            raise RequestError(f"unknown field {where!r}", param=where) from None
        raise RequestError(f"{where}: {err['msg']}", param=str(err["loc"][0])) from None


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed and key not in ENVELOPE_KEYS:
            raise RequestError(
                f"unknown field {key!r}; this form takes: {', '.join(sorted(allowed))}",
                param=key,
            )
