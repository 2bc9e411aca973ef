"""The MessagePack tensor codec every transport shares, on every datatype it can carry."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest

from appliance.core.sampling import check_sampling
from appliance.core.types import DATATYPES, SamplingParams
from appliance.errors import RequestError
from appliance.protocol import oip_msgpack

NUMERIC = [name for name in DATATYPES if name != "BYTES"]


def request(**tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", **tensor}]}


@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_bytes_round_trip_every_numeric_datatype(datatype: str) -> None:
    dtype = DATATYPES[datatype]
    values = (np.arange(12) % 2 == 0) if datatype == "BOOL" else np.arange(12)
    array = values.astype(dtype).reshape(3, 4)
    body = oip_msgpack.unpack(
        oip_msgpack.pack(
            request(
                datatype=datatype,
                shape=[3, 4],
                data=array.astype(dtype.newbyteorder("<")).tobytes(),
            )
        )
    )
    decoded = oip_msgpack.decode_request(body).inputs["x"]
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, array)
    (tensor,) = oip_msgpack.encode_outputs_msgpack({"y": array})
    assert tensor == {
        "name": "y",
        "datatype": datatype,
        "shape": [3, 4],
        "data": array.astype(dtype.newbyteorder("<")).tobytes(),
    }


def test_bytes_tensors_as_bin_lists_or_length_prefixed() -> None:
    items: list[bytes | str] = [b"\x00\xffraw", "text", b""]
    as_list = oip_msgpack.decode_request(request(datatype="BYTES", shape=[3], data=items))
    prefixed = b"".join(
        struct.pack("<I", len(v)) + (v if isinstance(v, bytes) else v.encode()) for v in items
    )
    as_blob = oip_msgpack.decode_request(request(datatype="BYTES", shape=[3], data=prefixed))
    expected = [b"\x00\xffraw", b"text", b""]
    assert as_list.inputs["x"].tolist() == expected
    assert as_blob.inputs["x"].tolist() == expected
    (tensor,) = oip_msgpack.encode_outputs_msgpack({"y": np.array(expected, dtype=object)})
    assert tensor["data"] == expected


def test_number_lists_still_work_and_outputs_and_id_are_kept() -> None:
    decoded = oip_msgpack.decode_request(
        {
            "id": "req-1",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]}],
            "outputs": [{"name": "y"}],
        }
    )
    assert decoded.id == "req-1"
    assert decoded.outputs == ["y"]
    assert decoded.inputs["x"].tolist() == [1.5, 2.5]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (request(datatype="FP32", shape=[2], data=b"\0" * 7), "needs 8 bytes, got 7"),
        (request(datatype="INT8", shape=[2], data=[1, 2.5]), "must be integers"),
        (request(datatype="BYTES", shape=[2], data=[b"a", 3]), "strings or bin"),
        (request(datatype="NOPE", shape=[1], data=b"\0"), "unknown datatype 'NOPE'"),
        ({"inputs": "x"}, "'inputs' must be a non-empty list"),
        ([], "must be a MessagePack map"),
    ],
)
def test_bad_tensors_are_request_errors(body: Any, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        oip_msgpack.decode_request(body)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "body is empty"),
        (b"\xc1", "not valid MessagePack"),
        (b"\x92\x01", "not valid MessagePack"),  # truncated
        (msgpack.packb({1: 2}), "not valid MessagePack"),  # integer map keys
        (b"\xa2\xff\xfe", "not valid UTF-8"),
        (msgpack.packb(1) + b"\x01", "data after"),
    ],
)
def test_unpack_rejects_what_is_not_one_msgpack_document(raw: bytes, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        oip_msgpack.unpack(raw)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": -0.1}, "temperature must be at least 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 1.5}, "top_p must be between 0 and 1"),
        ({"top_k": -1}, "top_k must be 0 (off) or more"),
        ({"min_p": -1.0}, "min_p must be between 0 and 1"),
        ({"repeat_penalty": 0.0}, "repeat_penalty must be more than 0"),
        ({"presence_penalty": float("inf")}, "presence_penalty must be a finite number"),
        ({"stop": tuple(str(i) for i in range(17))}, "stop must be at most 16"),
        ({"stop": ("",)}, "stop must be non-empty"),
        ({"seed": 2**64}, "seed must be a 64-bit integer"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias must be token ids of 0 or more"),
        ({"logit_bias": {1: 101.0}}, "logit_bias must be between -100 and 100"),
    ],
)
def test_the_core_bounds_sampling_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_sampling(SamplingParams(**params))
    assert message in caught.value.message
    assert caught.value.param == message.split()[0]


def test_defaults_and_edges_are_accepted() -> None:
    check_sampling(SamplingParams())
    check_sampling(
        SamplingParams(
            temperature=0, top_p=1, top_k=0, min_p=0, seed=-(2**63), max_tokens=1, stop=("\n",) * 16
        )
    )
