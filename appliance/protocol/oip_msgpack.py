"""Open Inference Protocol v2 tensors as MessagePack, shared by every transport that speaks it.

The document has the JSON form's shape (``inputs``/``outputs`` with ``name``, ``datatype``,
``shape``), but a tensor's ``data`` may be a MessagePack ``bin`` holding the raw tensor:
little-endian elements in row-major order, BYTES elements each prefixed by a 4-byte
little-endian length, exactly as in the binary tensor data extension. Lists of numbers
(and, for BYTES, lists of ``str`` or ``bin``) are accepted as well. Answers always carry
raw bytes for numeric tensors and a list of ``bin`` for BYTES tensors.

Requests are turned into the binary extension's form and decoded by :mod:`core.oip`, so
every check (datatype, shape against the byte count, NaN later in the core) is the same one
HTTP JSON, HTTP binary, gRPC and MQTT clients meet.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from appliance.core.types import Array
from appliance.errors import RequestError
from appliance.protocol import oip
from appliance.protocol.oip import DecodedRequest, encode_outputs

CONTENT_TYPE = "application/msgpack"
# Names clients use for the same thing; the IANA registration is application/msgpack
# (RFC 9827 era), older libraries still send the x- and vnd. forms.
CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/x-msgpack", "application/vnd.msgpack"})


def unpack(raw: bytes) -> Any:
    """One MessagePack document, or a :class:`RequestError` saying why it is not one."""
    if not raw:
        raise RequestError("the request body is empty; a MessagePack map is expected", param="body")
    try:
        # strict_map_key: only str/bytes keys; the max_*_len limits default to the body size.
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except msgpack.ExtraData:
        raise RequestError(
            "the body holds data after the MessagePack document", param="body"
        ) from None
    except UnicodeDecodeError:
        raise RequestError("a MessagePack string is not valid UTF-8", param="body") from None
    except msgpack.StackError:
        raise RequestError("the MessagePack document is nested too deeply", param="body") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RequestError(f"the body is not valid MessagePack: {exc}", param="body") from None


def pack(document: Any) -> bytes:
    """``document`` as MessagePack (``bytes`` become ``bin``)."""
    return msgpack.packb(document, use_bin_type=True)  # type: ignore[no-any-return]


def decode_request(body: Any) -> DecodedRequest:
    """An OIP request decoded from MessagePack into core terms."""
    return oip.decode_request(*binary_form(body))


def binary_form(body: Any) -> tuple[Any, bytes]:
    """A MessagePack request as the binary extension has it: (header, tensor bytes)."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a MessagePack map", param="body")
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, list):
        return body, b""  # the shared decoder words the error
    inputs: list[Any] = []
    blobs: list[bytes] = []
    for tensor in raw_inputs:
        if isinstance(tensor, dict):
            tensor = _binary_form(tensor, blobs)
        inputs.append(tensor)
    return {**body, "inputs": inputs}, b"".join(blobs)


def _binary_form(tensor: dict[str, Any], blobs: list[bytes]) -> dict[str, Any]:
    """``tensor`` with raw ``data`` moved to the binary part, as the extension has it."""
    data = tensor.get("data")
    if isinstance(data, (bytes, bytearray)):
        blob = bytes(data)
    elif (
        tensor.get("datatype") == "BYTES"
        and isinstance(data, list)
        and any(isinstance(item, (bytes, bytearray)) for item in data)
    ):
        if not all(isinstance(item, (bytes, bytearray, str)) for item in data):
            name = tensor.get("name")
            raise RequestError(
                f"input tensor {name!r}: BYTES data must be strings or bin", param="inputs"
            )
        blob = b"".join(_length_prefixed(item) for item in data)
    else:
        return tensor
    params = tensor.get("parameters")
    params = dict(params) if isinstance(params, dict) else {}
    params["binary_data_size"] = len(blob)
    blobs.append(blob)
    return {k: v for k, v in tensor.items() if k != "data"} | {"parameters": params}


def _length_prefixed(item: bytes | bytearray | str) -> bytes:
    raw = item.encode() if isinstance(item, str) else bytes(item)
    return struct.pack("<I", len(raw)) + raw


def encode_outputs_msgpack(outputs: Mapping[str, Array]) -> list[dict[str, Any]]:
    """Output tensors with raw ``data``: little-endian bytes, or a list of ``bin`` for BYTES."""
    tensors, blobs = encode_outputs(outputs, set(outputs))
    for tensor, blob, value in zip(tensors, blobs, outputs.values(), strict=True):
        tensor.pop("parameters", None)
        if tensor["datatype"] == "BYTES":
            tensor["data"] = [
                v if isinstance(v, bytes) else str(v).encode()
                for v in np.asarray(value).reshape(-1)
            ]
        else:
            tensor["data"] = blob
    return tensors


__all__ = [
    "CONTENT_TYPE",
    "CONTENT_TYPES",
    "binary_form",
    "decode_request",
    "encode_outputs_msgpack",
    "pack",
    "unpack",
]
