"""Answer bodies of the Ollama-compatible API, field for field as Ollama sends them.

Fields a client may miss are optional and left out of the JSON when unset (answers are
dumped with ``exclude_none``), as Ollama leaves them out; durations are nanoseconds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class TagModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class Tags(BaseModel):
    models: list[TagModel]


class RunningModel(TagModel):
    expires_at: str
    size_vram: int = 0
    context_length: int | None = None


class Running(BaseModel):
    models: list[RunningModel]


class Show(BaseModel):
    modelfile: str
    parameters: str = ""
    template: str = ""
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class CallFunction(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(description="The arguments as a JSON object.")


class CallOut(BaseModel):
    id: str
    function: CallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[CallOut] | None = None


class _Answer(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatAnswer(_Answer):
    """A chat answer, or one line of a streamed one."""

    message: AssistantMessage


class GenerateAnswer(_Answer):
    """A generate answer, or one line of a streamed one."""

    response: str


class Embed(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class Embeddings(BaseModel):
    embedding: list[float]


class Version(BaseModel):
    version: str


__all__ = [
    "AssistantMessage",
    "CallFunction",
    "CallOut",
    "ChatAnswer",
    "Embed",
    "Embeddings",
    "GenerateAnswer",
    "ModelDetails",
    "Running",
    "RunningModel",
    "Show",
    "TagModel",
    "Tags",
    "Version",
]
