"""Open Inference Protocol v2 tensor encoding, shared by every transport that speaks it.

Handles the JSON form and the binary tensor data extension used by Triton/KServe clients
(``Inference-Header-Content-Length``: a JSON header followed by raw tensor bytes, each input
naming its ``binary_data_size``). Errors name the tensor and what was expected.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.core.types import DATATYPES, Array, datatype_of
from appliance.errors import RequestError

MAX_ELEMENTS = 64 * 1024 * 1024  # per tensor; a guard against absurd shapes
# The ``platform`` of a model in OIP metadata, by runtime (Triton's names where it has one).
PLATFORMS = {"onnx": "onnxruntime_onnx", "gguf": "llama_cpp_gguf"}


@dataclass
class DecodedRequest:
    """An inference request in core terms."""

    inputs: dict[str, Array]
    outputs: list[str] | None  # None: all outputs
    binary_outputs: set[str] = field(default_factory=set)
    binary_default: bool = False  # binary_data_output request parameter
    id: str | None = None


def decode_request(body: Any, binary: bytes = b"") -> DecodedRequest:
    """Decode an OIP v2 inference request body (already parsed from JSON)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", param="body")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string", param="id")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object", param="parameters")
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("'inputs' must be a non-empty list of tensors", param="inputs")

    inputs: dict[str, Array] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        name, array, used = _decode_tensor(index, raw, binary, offset)
        if name in inputs:
            raise RequestError(f"input tensor {name!r} is given twice", param="inputs")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise RequestError(
            f"the request carries {len(binary)} bytes of binary tensor data but the inputs "
            f"declare {offset}",
            param="inputs",
        )

    outputs: list[str] | None = None
    binary_outputs: set[str] = set()
    raw_outputs = body.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise RequestError("'outputs' must be a list", param="outputs")
        outputs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise RequestError("each requested output needs a string 'name'", param="outputs")
            outputs.append(raw["name"])
            out_params = raw.get("parameters") or {}
            if isinstance(out_params, dict) and out_params.get("binary_data") is True:
                binary_outputs.add(raw["name"])
    return DecodedRequest(
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_outputs,
        binary_default=params.get("binary_data_output") is True,
        id=request_id,
    )


def _decode_tensor(index: int, raw: Any, binary: bytes, offset: int) -> tuple[str, Array, int]:
    if not isinstance(raw, dict):
        raise RequestError(f"inputs[{index}] must be an object", param="inputs")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"inputs[{index}] needs a string 'name'", param="inputs")
    label = f"input tensor {name!r}"
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise RequestError(
            f"{label}: unknown datatype {datatype!r}; allowed: {', '.join(DATATYPES)}",
            param="inputs",
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise RequestError(
            f"{label}: 'shape' must be a list of non-negative integers, got {shape!r}",
            param="inputs",
        )
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise RequestError(
            f"{label}: shape {shape} has {count} elements; at most {MAX_ELEMENTS} allowed",
            param="inputs",
        )
    dtype = DATATYPES[datatype]
    params = raw.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(f"{label}: 'binary_data_size' must be a non-negative integer")
        if offset + size > len(binary):
            raise RequestError(
                f"{label}: declares {size} bytes of binary data but only "
                f"{len(binary) - offset} remain",
                param="inputs",
            )
        chunk = binary[offset : offset + size]
        return name, _from_bytes(label, datatype, dtype, shape, count, chunk), size
    if "data" not in raw:
        raise RequestError(f"{label}: needs 'data' (or binary data)", param="inputs")
    data = raw["data"]
    # The element types, gathered at C speed: a flat list of plain numbers (what clients
    # send) is checked by looking at this set instead of at every element.
    kinds = set(map(type, data)) if isinstance(data, list) else {type(data)}
    if any(issubclass(kind, list) for kind in kinds):
        flat = _flatten(data)
        kinds = set(map(type, flat))
    else:
        flat = data if isinstance(data, list) else [data]
    if len(flat) != count:
        raise RequestError(
            f"{label}: shape {shape} needs {count} elements, got {len(flat)}", param="inputs"
        )
    return name, _from_list(label, datatype, dtype, flat, kinds).reshape(shape), 0


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


# Element types that pass each check without looking further (``type()``, not subclasses:
# anything else takes the element-by-element path, which decides).
_STRINGS = frozenset({str})
_BOOLS = frozenset({bool})
_NUMBERS = frozenset({int, float})
_INTEGERS = frozenset({int})


def _from_list(
    label: str, datatype: str, dtype: np.dtype[Any], flat: list[Any], kinds: set[type]
) -> Array:
    if datatype == "BYTES":
        if not (kinds <= _STRINGS or all(isinstance(v, str) for v in flat)):
            raise RequestError(f"{label}: BYTES data must be strings", param="inputs")
        return np.array([v.encode() for v in flat], dtype=np.object_)
    if datatype == "BOOL":
        if not (kinds <= _BOOLS or all(isinstance(v, bool) for v in flat)):
            raise RequestError(f"{label}: BOOL data must be true/false", param="inputs")
    elif not kinds <= (_INTEGERS if dtype.kind in "iu" else _NUMBERS):
        _check_numbers(label, datatype, dtype, flat)
    try:
        # A float beyond the type's range (1e39 for FP32) would only warn and become inf.
        with np.errstate(over="raise"):
            return np.array(flat, dtype=dtype)
    except (OverflowError, ValueError, FloatingPointError) as exc:
        raise RequestError(
            f"{label}: a value does not fit {datatype}: {exc}", param="inputs"
        ) from None


def _check_numbers(label: str, datatype: str, dtype: np.dtype[Any], flat: list[Any]) -> None:
    """Element by element: a number type's data must be numbers (integers for integer types)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        bad = next(v for v in flat if not isinstance(v, (int, float)) or isinstance(v, bool))
        raise RequestError(
            f"{label}: {datatype} data must be numbers, got {type(bad).__name__} {bad!r}",
            param="inputs",
        )
    if dtype.kind in "iu" and not all(isinstance(v, int) for v in flat):
        raise RequestError(f"{label}: {datatype} data must be integers", param="inputs")


def _from_bytes(
    label: str, datatype: str, dtype: np.dtype[Any], shape: list[int], count: int, chunk: bytes
) -> Array:
    if datatype == "BYTES":
        items: list[bytes] = []
        pos = 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise RequestError(f"{label}: truncated BYTES element length", param="inputs")
            (length,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + length > len(chunk):
                raise RequestError(f"{label}: truncated BYTES element", param="inputs")
            items.append(chunk[pos : pos + length])
            pos += length
        if len(items) != count:
            raise RequestError(
                f"{label}: shape {shape} needs {count} elements, got {len(items)}",
                param="inputs",
            )
        return np.array(items, dtype=np.object_).reshape(shape)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise RequestError(
            f"{label}: shape {shape} of {datatype} needs {expected} bytes, got {len(chunk)}",
            param="inputs",
        )
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def encode_outputs(
    outputs: Mapping[str, Array], binary_names: set[str] | Sequence[str]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """OIP output tensors; those in ``binary_names`` go to the returned byte blobs."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in outputs.items():
        value = np.asarray(value)
        datatype = datatype_of(value.dtype)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if name in binary_names:
            blob = _to_bytes(datatype, value)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            tensor["data"] = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in value.reshape(-1)
            ]
        elif value.dtype.kind == "f" and not np.isfinite(value).all():
            # JSON has no NaN or infinity; such elements are sent as null (binary data
            # carries them exactly).
            tensor["data"] = [v if math.isfinite(v) else None for v in value.reshape(-1).tolist()]
        else:
            tensor["data"] = value.reshape(-1).tolist()
        tensors.append(tensor)
    return tensors, blobs


def _to_bytes(datatype: str, value: Array) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in value.reshape(-1):
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
