"""Value types passed between transports, the core and runtimes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


class Capability(str, enum.Enum):
    """What a loaded model can do; transports pick routes by it."""

    INFER = "infer"  # tensors in, tensors out (Open Inference Protocol v2)
    GENERATE = "generate"  # text generation: completions and chat
    EMBED = "embed"  # text embeddings


class ModelState(str, enum.Enum):
    """Lifecycle of one model in the repository."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a tensor model. ``-1`` in ``shape`` is a dynamic dimension."""

    name: str
    datatype: str  # Open Inference Protocol name: FP32, INT64, BOOL, BYTES, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """The tensors a model takes and returns."""

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


Array = npt.NDArray[Any]


@dataclass(frozen=True)
class InferResult:
    """Outputs of one tensor inference, by name, in the model's output order."""

    outputs: Mapping[str, Array]


@dataclass(frozen=True)
class ToolCall:
    """A call of one tool: by the model in an answer, or an earlier one in the conversation."""

    id: str
    name: str
    arguments: Mapping[str, Any]  # always a JSON object; transports serialise it their way


@dataclass(frozen=True)
class ChatMessage:
    """One chat turn. An ``assistant`` turn may carry the tool calls it made; a ``tool``
    turn is the result of one, named by ``tool_call_id`` where the client gave one."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is the JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ToolUse:
    """The tools of a chat request and how the model may use them (validated by the core).

    ``choice``: ``auto`` (text or calls), ``required`` (at least one call) or ``function``
    (a call of ``function``). ``tool_choice: none`` never gets here: the request then has no
    tools at all.
    """

    tools: tuple[Tool, ...]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def callable(self) -> tuple[Tool, ...]:
        """The tools the answer may call."""
        if self.function is None:
            return self.tools
        return tuple(t for t in self.tools if t.name == self.function)


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call as it streams: the first piece of call ``index`` has its id
    and name, later ones more of its ``arguments`` (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. Validated by the core before any runtime sees them."""

    max_tokens: int | None = None  # None: until the context is full or a stop
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_schema: Mapping[str, Any] | None = None  # constrain output to this JSON schema
    json_object: bool = False  # constrain output to any JSON object
    logit_bias: Mapping[int, float] | None = None  # token id -> bias added to its logit


@dataclass(frozen=True)
class GenerateRequest:
    """A completion (``prompt``) or chat (``messages``) request."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    tools: ToolUse | None = None  # chat only


@dataclass(frozen=True)
class TokenChunk:
    """A piece of generated text (or of tool calls). The last chunk has ``finish_reason``
    and the usage counts."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class EmbeddingResult:
    """One vector per input text."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """What the transports may tell clients about a model."""

    name: str
    version: str
    runtime: str
    state: ModelState
    description: str
    error: str | None
    capabilities: frozenset[Capability]
    signature: Signature
    context_length: int | None
    created: int  # unix time the model file was last changed
    size: int = 0  # bytes of the model file
    # What the file says of itself (GGUF: family, parameter_size, quantization_level).
    details: Mapping[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


# Open Inference Protocol datatypes and their numpy equivalents. BYTES maps to object
# arrays of ``bytes``.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


# The same table the other way round: every request looks its tensors' names up here.
_NAMES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The Open Inference Protocol name of a numpy dtype."""
    name = _NAMES.get(dtype)
    if name is not None:
        return name
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in DATATYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"no Open Inference Protocol datatype for numpy dtype {dtype}")
