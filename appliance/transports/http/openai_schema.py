"""Request and response bodies of the OpenAI-compatible API.

Requests ignore fields we do not use (clients send many), but every field we do use is
checked: types, ranges, NaN. The same models describe the routes in ``/openapi.json``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from appliance.core.sampling import STOP_SCHEMA, sampling_params
from appliance.core.tools import conversation, tool_use
from appliance.core.types import GenerateRequest, SamplingParams
from appliance.errors import RequestError
from appliance.protocol.problems import first_problem

MAX_STOP = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    # Checked by the core (appliance.core.tools), as every transport's are.
    tool_calls: Any = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_object"]
    # llama-cpp-python's server accepts the schema here for json_object; so do we.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# One model per ``type``, so the schema says what each needs (json_schema: its object).
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]
FORMAT_TYPES = ("text", "json_object", "json_schema")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(min_length=1, description="Model name, as listed by GET /v1/models.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1000, description="llama.cpp extension.")
    min_p: float | None = Field(default=None, ge=0, le=1, description="llama.cpp extension.")
    repeat_penalty: float | None = Field(default=None, gt=0, le=10, description="llama.cpp ext.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # A lone "" means no stop sequence (see sampling); a list's entries must not be empty.
    stop: str | list[str] | None = Field(
        default=None,
        description=f"Up to {MAX_STOP} strings.",
        json_schema_extra={**STOP_SCHEMA, "minLength": 0},
    )
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    logit_bias: dict[int, float] | None = Field(
        default=None,
        description="Token id -> bias from -100 to 100 added to its logit.",
        # What the core checks (appliance.core.sampling), published: ids of 0 or more.
        json_schema_extra={
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
    )
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int | None, fmt: ResponseFormat | None = None) -> SamplingParams:
        # A lone "" means no stop sequence; in a list every entry is one (the core's
        # limits, appliance.core.sampling, judge them: this model only parses).
        stop = (
            ([self.stop] if self.stop else []) if isinstance(self.stop, str) else (self.stop or [])
        )
        schema = None
        json_object = False
        if isinstance(fmt, JsonSchemaResponseFormat):
            schema = fmt.json_schema.schema_
        elif isinstance(fmt, JsonObjectFormat):
            schema = fmt.schema_
            json_object = schema is None
        return sampling_params(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=tuple(stop),
            seed=self.seed,
            json_schema=schema,
            json_object=json_object,
            logit_bias=self.logit_bias,
        )


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions"""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: Any = Field(default=None, description="Functions the model may call.")
    tool_choice: Any = Field(
        default=None,
        description='"auto" (default), "none", "required" or '
        '{"type": "function", "function": {"name": ...}}.',
    )
    parallel_tool_calls: Any = Field(
        default=None, description="Several calls in one answer (default true)."
    )

    def to_core(self) -> GenerateRequest:
        messages = conversation(
            ((m.role, m.text(), m.tool_calls, m.tool_call_id) for m in self.messages),
            ids_required=True,
        )
        limit = self.max_completion_tokens or self.max_tokens
        return GenerateRequest(
            messages=messages,
            params=self.sampling(limit, self.response_format),
            tools=tool_use(self.tools, self.tool_choice, self.parallel_tool_calls),
        )


def _one_prompt(value: Any) -> Any:
    if isinstance(value, list) and len(value) != 1:
        raise ValueError("exactly one prompt is supported per request")
    return value


class CompletionRequest(_Sampling):
    """POST /v1/completions"""

    # The list's bounds publish the rule in the schema; the validator before them words it.
    prompt: Annotated[
        str | Annotated[list[str], Field(min_length=1, max_length=1)],
        BeforeValidator(_one_prompt),
        Field(description="One prompt (a list of one is accepted)."),
    ]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_core(self) -> GenerateRequest:
        return GenerateRequest(prompt=self.prompt_text(), params=self.sampling(self.max_tokens))


class EmbeddingRequest(_Request):
    """POST /v1/embeddings"""

    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="A text or a list of texts.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    state: str = Field(description="loading | ready | failed (appliance extension).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallDeltaOut(BaseModel):
    """A streamed piece of a call: the first has ``id`` and ``function.name``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One SSE ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    """A completion, or (``stream: true``) one SSE event of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


def parse(model: type[_Request], body: Any) -> Any:
    """Validate ``body`` into ``model``; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", param="body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problem = first_problem(exc)
        loc = problem.loc
        if loc[:1] == ["response_format"] and loc[1:2] and loc[1] in FORMAT_TYPES:
            del loc[1]  # the union's tag, not a field
        if problem.kind in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(str(exc.errors()[0].get("ctx", {}).get("discriminator", "type")).strip("'"))
        raise problem.request_error("body", missing="{field}: this field is required") from None
