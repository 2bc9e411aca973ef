"""Request bodies of the Ollama-compatible API (the subset real clients use).

Requests ignore fields we do not use, as Ollama does, and convert to core requests; ranges of
the sampling parameters are checked once, by the core. What only Ollama defines is checked
here: model references (``name[:tag]``), ``format``, ``keep_alive`` durations and the
meaning of negative ``num_predict``. The answers are
:mod:`appliance.transports.http.ollama_answers`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from appliance.core.sampling import SEED_SCHEMA, STOP_SCHEMA, sampling_params
from appliance.core.tools import conversation, tool_use
from appliance.core.types import ChatMessage, GenerateRequest, SamplingParams
from appliance.errors import RequestError
from appliance.protocol.problems import first_problem

# The Ollama API level this implements; clients such as Open WebUI only display it.
OLLAMA_VERSION = "0.9.0"
LATEST = "latest"

# Go's time.ParseDuration syntax, which Ollama uses for string keep_alive values ("0" too).
# One pattern both validates and is published in /openapi.json, so the two cannot differ.
DURATION = r"^(?:0|[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)$"
_DURATION = re.compile(DURATION.replace("$", r"\Z"))  # "5m\n" is no duration either


def _duration(value: Any) -> Any:
    """Ollama's own message for a bad duration (the pattern below also refuses it)."""
    if isinstance(value, str) and not _DURATION.match(value):
        raise ValueError(f"time: invalid duration {json.dumps(value, ensure_ascii=False)}")
    return value


# ``keep_alive``: seconds, or a Go duration.
KeepAlive = Annotated[
    float | Annotated[str, Field(pattern=DURATION)] | None,
    BeforeValidator(_duration),
    Field(
        description="How long the model stays loaded: seconds, or a Go duration such as "
        '"5m" or "-1s" (negative: forever); 0 unloads the model once idle.'
    ),
]
# A model reference, ``name[:tag]``: the name part cannot be empty.
ModelRef = Annotated[
    str,
    Field(
        pattern=r"^[^:]", description="Model name, optionally with a tag: `name` or `name:latest`."
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# Fields Ollama has and the appliance refuses unless empty. The handlers refuse them with
# a message naming the feature ("does not support images"); the schema says it too.
_EMPTY_LIST: dict[str, Any] = {"maxItems": 0}
_EMPTY_TEXT: dict[str, Any] = {"maxLength": 0}


def model_ref(reference: str) -> tuple[str, str | None]:
    """``name[:tag]`` → (model name, version or None). ``latest`` means whatever is served."""
    name, _, tag = reference.partition(":")
    if not name:
        raise RequestError("model is required", param="model")
    return name, (None if tag in ("", LATEST) else tag)


class Options(_Request):
    """``options``: Ollama's Modelfile parameters that map onto our sampling parameters.

    Load-time options (``num_ctx``, ``num_gpu``, ``num_thread``...) belong to the model's
    manifest on the appliance and are accepted but ignored, as unknown options are.
    """

    # The bounds the core checks (appliance.core.sampling), published in the schema; the
    # core's messages name them when a client sends something else.
    num_predict: int | None = Field(
        default=None,
        description="Tokens to generate at most; -1 or -2: until a stop.",
        json_schema_extra={"not": {"type": "integer", "maximum": 0, "not": {"enum": [-1, -2]}}},
    )
    temperature: float | None = Field(default=None, json_schema_extra={"minimum": 0})
    top_p: float | None = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 1})
    top_k: int | None = Field(default=None, json_schema_extra={"minimum": 0})
    min_p: float | None = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 1})
    repeat_penalty: float | None = Field(default=None, json_schema_extra={"exclusiveMinimum": 0})
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | str | None = Field(default=None, json_schema_extra=STOP_SCHEMA)
    seed: int | None = Field(default=None, json_schema_extra=SEED_SCHEMA)
    num_ctx: int | None = Field(default=None, description="Ignored: set n_ctx in the manifest.")

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, value: int | None) -> int | None:
        if value is not None and (value == 0 or value < -2):
            raise ValueError("must be -1 or -2 (no limit) or at least 1")
        return value

    def sampling(self, fmt: str | dict[str, Any] | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return sampling_params(
            max_tokens=None
            if self.num_predict is None or self.num_predict < 0
            else self.num_predict,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=tuple(stop),
            seed=self.seed,
            json_schema=fmt if isinstance(fmt, dict) else None,
            json_object=fmt == "json",
        )


class Message(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = Field(
        default=None, description="Not supported: must be empty.", json_schema_extra=_EMPTY_LIST
    )
    # Checked by the core (appliance.core.tools), as every transport's are.
    tool_calls: Any = Field(default=None, description="The calls an assistant turn made.")
    tool_call_id: str | None = Field(default=None, description="The call a tool turn answers.")
    tool_name: str | None = Field(default=None, description="The tool a tool turn answers.")


class _Generation(_Request):
    model: ModelRef
    format: Literal["", "json"] | dict[str, Any] | None = Field(
        default=None, description='"json" for any JSON value, or a JSON Schema to follow.'
    )
    options: Options | None = None
    stream: bool | None = Field(default=None, description="false: one answer; default: NDJSON.")
    keep_alive: KeepAlive = None
    think: bool | str | None = Field(
        default=None,
        description="Not supported: false or absent.",
        json_schema_extra={"enum": [False, "", "false", None]},
    )

    @property
    def unload(self) -> bool:
        """``keep_alive`` of zero: Ollama's request to unload the model now."""
        return self.keep_alive is not None and keep_alive_seconds(self.keep_alive) == 0

    @property
    def streaming(self) -> bool:
        """Ollama streams unless ``stream`` is false (null means the default)."""
        return self.stream is not False

    def sampling(self) -> SamplingParams:
        return (self.options or Options()).sampling(self.format or None)

    def thinking(self) -> bool:
        return self.think not in (None, False, "", "false")


class ChatRequest(_Generation):
    """POST /api/chat"""

    messages: list[Message] = Field(default_factory=list)
    tools: Any = Field(default=None, description="Functions the model may call.")

    def to_core(self) -> GenerateRequest:
        messages = conversation(
            (m.role, m.content, m.tool_calls, m.tool_call_id) for m in self.messages
        )
        return GenerateRequest(
            messages=messages, params=self.sampling(), tools=tool_use(self.tools)
        )


class GenerateRequestBody(_Generation):
    """POST /api/generate"""

    prompt: str = ""
    system: str = ""
    raw: bool = Field(default=False, description="Send the prompt as-is, without the template.")
    suffix: str = Field(
        default="", description="Not supported: must be empty.", json_schema_extra=_EMPTY_TEXT
    )
    template: str = Field(
        default="", description="Not supported: must be empty.", json_schema_extra=_EMPTY_TEXT
    )
    context: list[int] | None = Field(
        default=None, description="Not supported: must be empty.", json_schema_extra=_EMPTY_LIST
    )
    images: list[str] | None = Field(
        default=None, description="Not supported: must be empty.", json_schema_extra=_EMPTY_LIST
    )

    def to_core(self) -> GenerateRequest:
        if self.raw:
            return GenerateRequest(prompt=self.prompt, params=self.sampling())
        # Ollama renders /api/generate prompts with the model's template, as one user turn.
        turns = [ChatMessage(role="system", content=self.system)] if self.system else []
        turns.append(ChatMessage(role="user", content=self.prompt))
        return GenerateRequest(messages=tuple(turns), params=self.sampling())


class EmbedRequest(_Request):
    """POST /api/embed"""

    model: ModelRef
    input: str | list[str] = ""
    truncate: bool = Field(
        default=True, description="Accepted; inputs longer than the context are refused."
    )
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: KeepAlive = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return list(self.input)


class EmbeddingsRequest(_Request):
    """POST /api/embeddings (the older, single-text form)"""

    model: ModelRef
    prompt: str = ""
    keep_alive: KeepAlive = None


class ShowRequest(_Request):
    """POST /api/show"""

    # ``model``, or else ``name``, must name a model (model_ref); the schema says so.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["model"], "properties": {"model": {"pattern": "^[^:]"}}},
                {
                    "required": ["name"],
                    "properties": {"model": {"maxLength": 0}, "name": {"pattern": "^[^:]"}},
                },
            ]
        }
    )

    model: str = ""
    name: str = Field(default="", description="Older clients' spelling of `model`.")
    verbose: bool = False


# ----------------------------------------------------------------------- helpers


def keep_alive_seconds(value: float | str) -> float | None:
    """Seconds from an Ollama ``keep_alive``; None means forever (any negative value)."""
    if isinstance(value, str):
        seconds = 0.0 if value in ("0", "+0", "-0") else _go_duration(value)
    else:
        seconds = float(value)
    return None if seconds < 0 else seconds


_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    total = 0.0
    for number, unit in re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", text):
        total += float(number) * _UNITS[unit]
    return sign * total


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate ``body`` into ``model``; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", param="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problem = first_problem(exc, type_names=frozenset({"Options", "Message"}))
        raise problem.request_error("body") from None
