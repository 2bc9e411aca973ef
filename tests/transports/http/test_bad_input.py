"""Every kind of bad request, table-driven, against one real daemon serving both runtimes.

Each case names the route, the raw body (bytes, so NaN literals, broken JSON and binary
tensor data can be sent exactly), the headers, the status expected and a substring of the
error message; on ``/v1`` routes also the ``param`` OpenAI clients point at. Every answer
must be JSON in its protocol's documented error shape and never a 500. The daemon is shared
by the whole module and must still serve good requests after the table has run.
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from appliance.server import Server
from tests.conftest import base_url, make_config, serving

pytestmark = pytest.mark.asyncio(loop_scope="module")

BODY_LIMIT = 4096
LLM = "stories260K"
ONNX = "sensor-anomaly"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
INFER = f"/v2/models/{ONNX}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"

# The documented OpenAI error types by status (transports/http/errors.py).
OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


@dataclass(frozen=True)
class Case:
    """One bad request and the error it must get."""

    method: str
    path: str
    body: bytes | None
    status: int
    message: str  # a substring of the error message
    param: str | None = None  # /v1 routes only: the exact "param" of the error
    headers: Mapping[str, str] = field(default_factory=dict)


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


def chat(**fields: Any) -> bytes:
    return j({"model": LLM, "messages": [{"role": "user", "content": "Hi"}], **fields})


def completion(**fields: Any) -> bytes:
    return j({"model": LLM, "prompt": "Once upon a time", "max_tokens": 4, **fields})


def window(**fields: Any) -> dict[str, Any]:
    """A well-formed ``window`` input tensor, with ``fields`` replaced."""
    return {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": [0.5] * 96, **fields}


def infer(*inputs: dict[str, Any], **fields: Any) -> bytes:
    return j({"inputs": list(inputs) or [window()], **fields})


def binary_infer(declared: int, data: bytes, message: str, header_length: str = "") -> Case:
    """A binary-tensor request whose ``window`` declares ``declared`` bytes of ``data``."""
    header = j(
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "FP32",
                    "shape": [1, 32, 3],
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    )
    length = header_length or str(len(header))
    return Case("POST", INFER, header + data, 400, message, headers={HEADER_LENGTH: length})


def padded(body: bytes, size: int) -> bytes:
    """``body`` with JSON whitespace appended up to exactly ``size`` bytes."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


FLOATS_96 = struct.pack("<96f", *([0.5] * 96))  # the 384 bytes a [1, 32, 3] FP32 tensor takes
# A long prompt that still fits the small body limit: stories260K's 512-token vocabulary
# spells a run of "x" one token per character.
LONG_TEXT = "x" * 2100


def post(
    path: str,
    body: bytes | None,
    status: int,
    message: str,
    param: str | None = None,
    **headers: str,
) -> Case:
    return Case(
        "POST",
        path,
        body,
        status,
        message,
        param,
        {k.replace("_", "-"): v for k, v in headers.items()},
    )


CASES: dict[str, Case] = {
    # -- the body is not a JSON object ----------------------------------------------------
    "invalid-json-chat": post(
        CHAT, b'{"model": "stories260K", ', 400, "invalid JSON at line 1", "body"
    ),
    "invalid-json-v2": post(INFER, b'{"inputs": [}', 400, "invalid JSON at line 1"),
    "trailing-garbage": post(COMPLETIONS, completion() + b"}", 400, "Extra data", "body"),
    "empty-body-completions": post(COMPLETIONS, b"", 400, "the request body is empty", "body"),
    "empty-body-embeddings": post(EMBEDDINGS, None, 400, "the request body is empty", "body"),
    "empty-body-v2": post(INFER, b"", 400, "the request body is empty"),
    "array-body-chat": post(CHAT, b"[1, 2]", 400, "must be a JSON object", "body"),
    "string-body-embeddings": post(EMBEDDINGS, b'"a text"', 400, "must be a JSON object", "body"),
    "null-body-completions": post(COMPLETIONS, b"null", 400, "must be a JSON object", "body"),
    "number-body-v2": post(INFER, b"42", 400, "must be a JSON object"),
    "not-utf8": post(CHAT, b'{"model": "\xff\xfe"}', 400, "not UTF-8 text", "body"),
    "nested-too-deeply-v1": post(
        COMPLETIONS, b"[" * 1500 + b"]" * 1500, 400, "nested too deeply", "body"
    ),
    "nested-too-deeply-v2": post(
        INFER, b'{"inputs": ' + b"[" * 1500 + b"]" * 1500 + b"}", 400, "nested too deeply"
    ),
    "lone-surrogate-prompt": post(
        COMPLETIONS, completion(prompt="\ud800 once"), 400, "lone UTF-16 surrogate", "body"
    ),
    "lone-surrogate-chat": post(
        CHAT,
        chat(messages=[{"role": "user", "content": "\udfff"}]),
        400,
        "lone UTF-16 surrogate",
        "body",
    ),
    "lone-surrogate-stop": post(
        COMPLETIONS, completion(stop=["\ud83d"]), 400, "lone UTF-16 surrogate", "body"
    ),
    "lone-surrogate-embedding": post(
        EMBEDDINGS, j({"model": LLM, "input": "\ud800"}), 400, "lone UTF-16 surrogate", "body"
    ),
    "lone-surrogate-bytes-tensor": post(
        INFER,
        infer(window(datatype="BYTES", shape=[1], data=["\ud800"])),
        400,
        "lone UTF-16 surrogate",
    ),
    "corrupt-gzip-body": post(
        COMPLETIONS,
        b"this is not gzip data",
        400,
        "cannot be decoded",
        "body",
        Content_Encoding="gzip",
    ),
    # -- wrong types --------------------------------------------------------------------
    "model-not-a-string": post(
        CHAT, chat(model=5), 400, "model: Input should be a valid string", "model"
    ),
    "messages-not-a-list": post(
        CHAT, chat(messages="Hi"), 400, "messages: Input should be a valid list", "messages"
    ),
    "message-not-an-object": post(CHAT, chat(messages=["Hi"]), 400, "messages.0", "messages.0"),
    "unknown-role": post(
        CHAT,
        chat(messages=[{"role": "wizard", "content": "Hi"}]),
        400,
        "messages.0.role",
        "messages.0.role",
    ),
    "content-part-not-text": post(
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages.0.content",
        "messages.0.content",
    ),
    "prompt-not-a-string": post(COMPLETIONS, completion(prompt=42), 400, "prompt:", "prompt"),
    "two-prompts": post(
        COMPLETIONS, completion(prompt=["a", "b"]), 400, "exactly one prompt", "prompt"
    ),
    "temperature-a-string": post(
        COMPLETIONS,
        completion(temperature="hot"),
        400,
        "temperature: Input should be a valid number",
        "temperature",
    ),
    "max-tokens-fractional": post(
        COMPLETIONS,
        completion(max_tokens=1.5),
        400,
        "max_tokens: Input should be a valid integer",
        "max_tokens",
    ),
    "stream-not-a-bool": post(
        CHAT, chat(stream="sometimes"), 400, "stream: Input should be a valid boolean", "stream"
    ),
    "stop-not-strings": post(COMPLETIONS, completion(stop=[1, 2]), 400, "stop:", "stop"),
    "logit-bias-key-not-a-token": post(
        COMPLETIONS,
        completion(logit_bias={"cat": 1}),
        400,
        "unable to parse string as an integer",
        "logit_bias.cat.[key]",
    ),
    "response-format-unknown": post(
        CHAT,
        chat(response_format={"type": "yaml"}),
        400,
        "response_format.type",
        "response_format.type",
    ),
    "embedding-input-not-text": post(
        EMBEDDINGS, j({"model": LLM, "input": {"a": 1}}), 400, "input:", "input"
    ),
    "encoding-format-unknown": post(
        EMBEDDINGS,
        j({"model": LLM, "input": "a", "encoding_format": "hex"}),
        400,
        "encoding_format",
        "encoding_format",
    ),
    "inputs-not-a-list": post(
        INFER, j({"inputs": {"window": [0.5]}}), 400, "'inputs' must be a non-empty list"
    ),
    "input-not-an-object": post(
        INFER, j({"inputs": ["window"]}), 400, "inputs[0] must be an object"
    ),
    "shape-not-a-list": post(
        INFER, infer(window(shape="1,32,3")), 400, "'shape' must be a list of non-negative integers"
    ),
    "shape-of-floats": post(
        INFER,
        infer(window(shape=[1.0, 32, 3])),
        400,
        "'shape' must be a list of non-negative integers",
    ),
    "unknown-datatype": post(
        INFER, infer(window(datatype="FLOAT")), 400, "unknown datatype 'FLOAT'; allowed: BOOL"
    ),
    "strings-for-fp32": post(
        INFER, infer(window(data=["0.5"] * 96)), 400, "FP32 data must be numbers, got str '0.5'"
    ),
    "bools-for-fp32": post(
        INFER, infer(window(data=[True] * 96)), 400, "FP32 data must be numbers, got bool True"
    ),
    "id-not-a-string": post(INFER, infer(id=7), 400, "'id' must be a string"),
    "parameters-not-an-object": post(
        INFER, infer(parameters=[1]), 400, "'parameters' must be an object"
    ),
    "outputs-not-a-list": post(INFER, infer(outputs="score"), 400, "'outputs' must be a list"),
    "output-without-name": post(
        INFER, infer(outputs=[{"id": "score"}]), 400, "each requested output needs a string 'name'"
    ),
    # -- missing required fields ----------------------------------------------------------
    "chat-without-messages": post(
        CHAT, j({"model": LLM}), 400, "messages: this field is required", "messages"
    ),
    "chat-with-no-messages": post(
        CHAT, chat(messages=[]), 400, "messages: List should have at least 1 item", "messages"
    ),
    "chat-without-model": post(
        CHAT,
        j({"messages": [{"role": "user", "content": "Hi"}]}),
        400,
        "model: this field is required",
        "model",
    ),
    "completion-without-prompt": post(
        COMPLETIONS, j({"model": LLM}), 400, "prompt: this field is required", "prompt"
    ),
    "completion-with-empty-model": post(
        COMPLETIONS,
        completion(model=""),
        400,
        "model: String should have at least 1 character",
        "model",
    ),
    "embedding-without-input": post(
        EMBEDDINGS, j({"model": LLM}), 400, "input: this field is required", "input"
    ),
    "embedding-of-no-texts": post(
        EMBEDDINGS,
        j({"model": LLM, "input": []}),
        400,
        "input must hold at least one text",
        "input",
    ),
    "json-schema-format-without-schema": post(
        CHAT,
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format.json_schema: this field is required",
        "response_format.json_schema",
    ),
    "infer-without-inputs": post(INFER, j({}), 400, "'inputs' must be a non-empty list"),
    "infer-with-no-inputs": post(
        INFER, j({"inputs": []}), 400, "'inputs' must be a non-empty list"
    ),
    "input-without-name": post(
        INFER,
        infer({"datatype": "FP32", "shape": [1], "data": [1]}),
        400,
        "inputs[0] needs a string 'name'",
    ),
    "input-without-data": post(
        INFER,
        infer({"name": "window", "datatype": "FP32", "shape": [1, 32, 3]}),
        400,
        "input tensor 'window': needs 'data'",
    ),
    # -- unknown models -------------------------------------------------------------------
    "unknown-model-chat": post(
        CHAT, chat(model="no-such-model"), 404, "model 'no-such-model' not found", "model"
    ),
    "unknown-model-completions": post(
        COMPLETIONS,
        completion(model="no-such-model"),
        404,
        "model 'no-such-model' not found",
        "model",
    ),
    "unknown-model-embeddings": post(
        EMBEDDINGS,
        j({"model": "no-such-model", "input": "a"}),
        404,
        "model 'no-such-model' not found",
        "model",
    ),
    "unknown-model-card": Case(
        "GET", "/v1/models/no-such-model", None, 404, "model 'no-such-model' not found", "model"
    ),
    "unknown-model-infer": post(
        "/v2/models/no-such-model/infer", infer(), 404, "model 'no-such-model' not found"
    ),
    "unknown-model-metadata": Case(
        "GET", "/v2/models/no-such-model", None, 404, "model 'no-such-model' not found"
    ),
    "unknown-model-ready": Case(
        "GET", "/v2/models/no-such-model/ready", None, 404, "model 'no-such-model' not found"
    ),
    "unknown-version-infer": post(
        f"/v2/models/{ONNX}/versions/7/infer", infer(), 404, f"model '{ONNX}' version '7' not found"
    ),
    "unknown-model-bad-body": post(
        "/v2/models/no-such-model/infer", b"{", 404, "model 'no-such-model' not found"
    ),
    # -- unknown routes and wrong methods -------------------------------------------------
    "unknown-route-v1": Case("GET", "/v1/engines", None, 404, "no route for GET /v1/engines"),
    "unknown-route-v2": Case(
        "POST",
        "/v2/systemsharedmemory/register",
        b"{}",
        404,
        "no route for POST /v2/systemsharedmemory/register",
    ),
    "unknown-route-root": Case("GET", "/admin", None, 404, "no route for GET /admin"),
    "wrong-method-chat": Case(
        "GET", CHAT, None, 405, f"method GET is not allowed for {CHAT}; allowed: POST"
    ),
    "wrong-method-models": Case(
        "DELETE", "/v1/models", None, 405, "method DELETE is not allowed for /v1/models"
    ),
    "wrong-method-infer": Case(
        "PUT", INFER, infer(), 405, f"method PUT is not allowed for {INFER}; allowed: POST"
    ),
    "wrong-method-health": Case(
        "POST", "/health", b"{}", 405, "method POST is not allowed for /health"
    ),
    "wrong-method-metrics": Case(
        "DELETE", "/metrics", None, 405, "method DELETE is not allowed for /metrics"
    ),
    # -- tensors that do not fit the model ------------------------------------------------
    "shape-mismatch": post(
        INFER,
        infer(window(shape=[1, 32, 2], data=[0.5] * 64)),
        400,
        "input tensor 'window' has shape [1, 32, 2], expected [-1 (any), 32, 3]",
    ),
    "rank-mismatch": post(
        INFER,
        infer(window(shape=[32, 3], data=[0.5] * 96)),
        400,
        "input tensor 'window' has shape [32, 3]",
    ),
    "negative-dimension": post(
        INFER,
        infer(window(shape=[-1, 32, 3])),
        400,
        "'shape' must be a list of non-negative integers, got [-1, 32, 3]",
    ),
    "absurd-shape": post(
        INFER, infer(window(shape=[10**12, 32, 3])), 400, "elements; at most 67108864 allowed"
    ),
    "dtype-mismatch-fp64": post(
        INFER,
        infer(window(datatype="FP64")),
        400,
        "input tensor 'window' has datatype FP64, expected FP32",
    ),
    "dtype-mismatch-int32": post(
        INFER,
        infer(window(datatype="INT32", data=[1] * 96)),
        400,
        "input tensor 'window' has datatype INT32, expected FP32",
    ),
    "value-does-not-fit-dtype": post(
        INFER, infer(window(datatype="INT8", data=[1000] * 96)), 400, "a value does not fit INT8"
    ),
    "too-few-elements": post(
        INFER, infer(window(data=[0.5] * 95)), 400, "shape [1, 32, 3] needs 96 elements, got 95"
    ),
    "too-many-elements": post(
        INFER,
        infer(window(data=[[0.5] * 3] * 33)),
        400,
        "shape [1, 32, 3] needs 96 elements, got 99",
    ),
    "binary-size-below-shape": binary_infer(
        380, FLOATS_96[:380], "shape [1, 32, 3] of FP32 needs 384 bytes, got 380"
    ),
    "binary-size-beyond-body": binary_infer(
        400, FLOATS_96, "declares 400 bytes of binary data but only 384 remain"
    ),
    "binary-size-below-body": binary_infer(
        384,
        FLOATS_96 + bytes(4),
        "carries 388 bytes of binary tensor data but the inputs declare 384",
    ),
    "binary-size-negative": binary_infer(
        -4, FLOATS_96, "'binary_data_size' must be a non-negative integer"
    ),
    "header-length-not-a-number": binary_infer(
        384, FLOATS_96, "Inference-Header-Content-Length must be an integer", "forty"
    ),
    "header-length-beyond-body": binary_infer(
        384, FLOATS_96, "Inference-Header-Content-Length 10000 is outside the body", "10000"
    ),
    "binary-data-without-header": post(
        INFER,
        infer(window(data=None, parameters={"binary_data_size": 384})),
        400,
        "declares 384 bytes of binary data but only 0 remain",
    ),
    "unknown-input-tensor": post(
        INFER,
        infer(window(name="windows")),
        400,
        "unexpected input tensor 'windows'; the model takes: window",
    ),
    "input-given-twice": post(
        INFER, infer(window(), window()), 400, "input tensor 'window' is given twice"
    ),
    "unknown-output": post(
        INFER,
        infer(outputs=[{"name": "verdict"}]),
        400,
        "unknown output tensor 'verdict'; the model returns: score, is_anomaly",
    ),
    # -- NaN and infinities ---------------------------------------------------------------
    "nan-in-tensor": post(
        INFER,
        b'{"inputs": [{"name": "window", "datatype": "FP32", '
        b'"shape": [1, 32, 3], "data": [NaN' + b", 0.5" * 95 + b"]}]}",
        400,
        "input tensor 'window' contains NaN or infinite values",
    ),
    "infinity-in-tensor": post(
        INFER,
        b'{"inputs": [{"name": "window", "datatype": "FP32", '
        b'"shape": [1, 32, 3], "data": [' + b"0.5, " * 95 + b"-Infinity]}]}",
        400,
        "contains NaN or infinite values",
    ),
    "float-beyond-fp32": post(
        INFER, infer(window(data=[0.5] * 95 + [1e39])), 400, "a value does not fit FP32"
    ),
    "number-in-json-overflowing-to-infinity": post(
        INFER,
        infer(window(data=[0.5] * 95)).replace(b"]}]}", b", 1e999]}]}"),
        400,
        "contains NaN or infinite values",
    ),
    "nan-in-binary-tensor": binary_infer(
        384, struct.pack("<f", float("nan")) + FLOATS_96[4:], "contains NaN or infinite values"
    ),
    "nan-temperature": post(
        CHAT,
        chat()[:-1] + b', "temperature": NaN}',
        400,
        "temperature: Input should be a finite number",
        "temperature",
    ),
    "infinite-top-p": post(
        COMPLETIONS,
        completion()[:-1] + b', "top_p": Infinity}',
        400,
        "top_p: Input should be a finite number",
        "top_p",
    ),
    "minus-infinite-presence-penalty": post(
        COMPLETIONS,
        completion()[:-1] + b', "presence_penalty": -Infinity}',
        400,
        "presence_penalty: Input should be a finite number",
        "presence_penalty",
    ),
    "overflowing-frequency-penalty": post(
        CHAT,
        chat()[:-1] + b', "frequency_penalty": 1e400}',
        400,
        "frequency_penalty: Input should be a finite number",
        "frequency_penalty",
    ),
    "nan-logit-bias": post(
        COMPLETIONS,
        completion()[:-1] + b', "logit_bias": {"5": NaN}}',
        400,
        "Input should be a finite number",
        "logit_bias.5",
    ),
    # -- negative and out-of-range numbers ------------------------------------------------
    "negative-max-tokens": post(
        COMPLETIONS,
        completion(max_tokens=-1),
        400,
        "max_tokens: Input should be greater than or equal to 1",
        "max_tokens",
    ),
    "zero-max-tokens-chat": post(
        CHAT,
        chat(max_tokens=0),
        400,
        "max_tokens: Input should be greater than or equal to 1",
        "max_tokens",
    ),
    "negative-max-completion-tokens": post(
        CHAT,
        chat(max_completion_tokens=-5),
        400,
        "greater than or equal to 1",
        "max_completion_tokens",
    ),
    "negative-temperature": post(
        CHAT,
        chat(temperature=-0.5),
        400,
        "temperature: Input should be greater than or equal to 0",
        "temperature",
    ),
    "negative-top-p": post(
        COMPLETIONS, completion(top_p=-0.1), 400, "top_p: Input should be greater than 0", "top_p"
    ),
    "negative-top-k": post(
        COMPLETIONS,
        completion(top_k=-1),
        400,
        "top_k: Input should be greater than or equal to 0",
        "top_k",
    ),
    "negative-token-in-logit-bias": post(
        COMPLETIONS,
        completion(logit_bias={"-3": 1}),
        400,
        "logit_bias must be token ids of 0 or more, got -3",
        "logit_bias",
    ),
    "logit-bias-beyond-100": post(
        COMPLETIONS,
        completion(logit_bias={"3": 101}),
        400,
        "logit_bias must be between -100 and 100, got 101.0",
        "logit_bias",
    ),
    "negative-dimensions": post(
        EMBEDDINGS,
        j({"model": LLM, "input": "a", "dimensions": -2}),
        400,
        "dimensions: Input should be greater than or equal to 1",
        "dimensions",
    ),
    "n-greater-than-1": post(
        COMPLETIONS, completion(n=2), 400, "n: Input should be less than or equal to 1", "n"
    ),
    "n-greater-than-1-chat": post(
        CHAT, chat(n=3), 400, "n: Input should be less than or equal to 1", "n"
    ),
    # -- beyond the model's context -------------------------------------------------------
    "absurd-max-tokens": post(
        COMPLETIONS,
        completion(max_tokens=1_000_000),
        400,
        "max_tokens 1000000 exceeds the model's context length 2048",
        "max_tokens",
    ),
    "absurd-max-tokens-chat": post(
        CHAT, chat(max_tokens=10**30), 400, "exceeds the model's context length 2048", "max_tokens"
    ),
    "prompt-longer-than-context": post(
        COMPLETIONS,
        completion(prompt=LONG_TEXT),
        400,
        "the prompt is 2102 tokens, longer than the model's context length 2048",
        "prompt",
    ),
    "prompt-longer-than-context-streamed": post(
        COMPLETIONS,
        completion(prompt=LONG_TEXT, stream=True),
        400,
        "longer than the model's context length 2048",
        "prompt",
    ),
    "chat-longer-than-context": post(
        CHAT,
        chat(messages=[{"role": "user", "content": LONG_TEXT}]),
        400,
        "longer than the model's context length 2048",
        "messages",
    ),
    "embedding-longer-than-context": post(
        EMBEDDINGS,
        j({"model": LLM, "input": ["a", LONG_TEXT]}),
        400,
        "input[1] is 2102 tokens",
        "input",
    ),
    # -- sampling options the model cannot honour -----------------------------------------
    "too-many-stop-sequences": post(
        COMPLETIONS,
        completion(stop=[f"s{i}" for i in range(17)]),
        400,
        "stop must be at most 16 sequences, got '17 sequences'",
        "stop",
    ),
    "empty-stop-sequence": post(
        CHAT,
        chat(stop=["end", ""]),
        400,
        "stop must be non-empty strings of at most 256 characters, got ''",
        "stop",
    ),
    "logit-bias-token-beyond-vocabulary": post(
        COMPLETIONS,
        completion(logit_bias={"512": -100}),
        400,
        "logit_bias names token 512 but the vocabulary has 512",
        "logit_bias",
    ),
    "logit-bias-token-beyond-vocabulary-streamed": post(
        CHAT,
        chat(logit_bias={"100000": 5}, stream=True),
        400,
        "logit_bias names token 100000 but the vocabulary has 512",
        "logit_bias",
    ),
    "unusable-json-schema": post(
        CHAT,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "wat"}},
            }
        ),
        400,
        "cannot use this JSON schema",
        "response_format",
    ),
    # -- the wrong kind of model for the route --------------------------------------------
    "chat-on-onnx": post(
        CHAT,
        chat(model=ONNX),
        400,
        f"model '{ONNX}' (onnx) does not support text generation; it supports: infer",
        "model",
    ),
    "completion-on-onnx": post(
        COMPLETIONS,
        completion(model=ONNX),
        400,
        "does not support text generation; it supports: infer",
        "model",
    ),
    "embeddings-on-onnx": post(
        EMBEDDINGS,
        j({"model": ONNX, "input": "a"}),
        400,
        "does not support embeddings; it supports: infer",
        "model",
    ),
    "infer-on-gguf": post(
        f"/v2/models/{LLM}/infer",
        infer(),
        400,
        f"model '{LLM}' is a gguf language model; use /v1/chat/completions or /v1/completions",
    ),
    # -- bodies over the limit ------------------------------------------------------------
    "body-one-byte-over-limit": post(
        COMPLETIONS,
        padded(completion(), BODY_LIMIT + 1),
        413,
        f"larger than the limit of {BODY_LIMIT} bytes",
        "body",
    ),
    "body-over-limit-chat": post(
        CHAT,
        chat(messages=[{"role": "user", "content": "y" * BODY_LIMIT}]),
        413,
        f"larger than the limit of {BODY_LIMIT} bytes",
        "body",
    ),
    "body-over-limit-v2": post(
        INFER,
        infer(window(data=[0.123456789] * 400)),
        413,
        f"larger than the limit of {BODY_LIMIT} bytes",
    ),
    "binary-body-over-limit": post(
        INFER,
        b"{}" + bytes(BODY_LIMIT),
        413,
        f"larger than the limit of {BODY_LIMIT} bytes",
        Inference_Header_Content_Length="2",
    ),
    "gzip-body-inflating-over-limit": post(
        COMPLETIONS,
        gzip.compress(completion(prompt="z" * 3 * BODY_LIMIT)),
        413,
        f"larger than the limit of {BODY_LIMIT} bytes",
        "body",
        Content_Encoding="gzip",
    ),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(default_models: Path, stories_gguf: Path) -> AsyncIterator[Server]:
    config = make_config(
        models={"dir": default_models, "files": [stories_gguf]}, http={"max_body_bytes": BODY_LIMIT}
    )
    async with serving(config) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # A fresh connection per request: the daemon closes one whose body it could not read.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


def check_error_shape(path: str, status: int, body: Any) -> str:
    """Assert the documented error shape of the route's protocol; return the message."""
    if path.startswith("/v1/"):
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str)
        assert error["message"]
        assert error["type"] == OPENAI_TYPES[status], body
        assert error["code"] is None
        return str(error["message"])
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert body["error"]
    return body["error"]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_bad_request_is_answered_with_a_json_error(
    server: Server, client: aiohttp.ClientSession, case: Case
) -> None:
    async with client.request(
        case.method, base_url(server) + case.path, data=case.body, headers=dict(case.headers)
    ) as resp:
        raw = await resp.read()
        status, content_type, allow = resp.status, resp.content_type, resp.headers.get("Allow")
    assert status != 500, raw
    assert (status, content_type) == (case.status, "application/json"), raw
    body = json.loads(raw)
    message = check_error_shape(case.path, status, body)
    assert case.message in message
    if case.path.startswith("/v1/"):
        assert body["error"]["param"] == case.param
    if status == 405:
        assert allow
        assert case.method not in allow.split(",")


async def test_chunked_body_over_limit_is_refused(
    server: Server, client: aiohttp.ClientSession
) -> None:
    """Without a Content-Length the limit holds too: the body is counted as it arrives."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "stories260K", "prompt": "'
        for _ in range(8):
            yield b"w" * 1024
        yield b'"}'

    async with client.post(base_url(server) + COMPLETIONS, data=chunks()) as resp:
        assert resp.status == 413
        body = await resp.json()
    assert check_error_shape(COMPLETIONS, 413, body).endswith(f"{BODY_LIMIT} bytes")
    assert body["error"]["param"] == "body"


async def test_body_of_exactly_the_limit_is_accepted(
    server: Server, client: aiohttp.ClientSession
) -> None:
    """The limit is the largest body accepted (one byte more is in the table as a 413)."""
    body = padded(completion(max_tokens=2), BODY_LIMIT)
    async with client.post(base_url(server) + COMPLETIONS, data=body) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["object"] == "text_completion"


def _samples(text: str, metric: str) -> dict[tuple[tuple[str, str], ...], float]:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric:
                break
        else:
            continue
        return {
            tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == metric
        }
    return {}


async def test_daemon_still_serves_after_the_table(
    server: Server, client: aiohttp.ClientSession
) -> None:
    """Runs after the table (file order): nothing was lost, nothing is stuck, no 500s."""
    url = base_url(server)
    async with client.post(url + INFER, data=infer()) as resp:
        assert resp.status == 200, await resp.text()
        outputs = {o["name"]: o for o in (await resp.json())["outputs"]}
    assert outputs["score"]["shape"] == [1]
    assert outputs["is_anomaly"]["datatype"] == "BOOL"

    async with client.post(
        url + COMPLETIONS, data=completion(max_tokens=12, temperature=0)
    ) as resp:
        assert resp.status == 200, await resp.text()
        text = (await resp.json())["choices"][0]["text"]
    assert text.startswith(", there was a little girl named Lily.")

    # The last token id of the 512-token vocabulary is fine, and the bias is applied: the
    # greedy story's first token (432, ",") is banned.
    async with client.post(
        url + COMPLETIONS,
        data=completion(max_tokens=6, temperature=0, logit_bias={"511": -100, "432": -100}),
    ) as resp:
        assert resp.status == 200, await resp.text()
        text = (await resp.json())["choices"][0]["text"]
    assert text.startswith(" there was")

    async with client.get(url + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    async with client.get(url + "/metrics") as resp:
        metrics = await resp.text()
    requests = _samples(metrics, "appliance_requests_total")
    statuses = {dict(labels)["status"] for labels in requests}
    assert "200" in statuses
    assert "500" not in statuses, requests
    for gauge in ("appliance_requests_running", "appliance_queue_depth"):
        values = _samples(metrics, gauge)
        assert values, gauge
        assert set(values.values()) == {0.0}, (gauge, values)
