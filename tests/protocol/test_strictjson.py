"""The strict reader's fast path (orjson) gives exactly what the stdlib path gives.

Every document below goes through :func:`strictjson.loads` and through the ``json`` path
alone (``_loads_json``, what the reader did before it had a fast path): the values must be
equal and of the same types throughout (an integer stays an integer, ``-0.0`` stays
negative), and a refused document must be refused with the same message.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import struct
from typing import Any

import pytest

from appliance.errors import RequestError
from appliance.protocol import strictjson

DOCUMENTS: list[bytes] = [
    b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.5, -2, 3e-7]}]}',
    b'{"a": 1, "a": 2}',  # duplicate keys: the last one wins, as json does
    b'{"a": {"b": 1}, "a": [2]}',
    b"[NaN, Infinity, -Infinity]",  # json accepts these literals; the core refuses NaN later
    b"[1e400, -1e400, 1e-400, -1e-400]",
    b"[-0.0, -0, 0.0, 1E2, 1e5]",
    b"[9223372036854775807, -9223372036854775808, 18446744073709551615]",
    b"[18446744073709551616, -9223372036854775809, 1234567890123456789012345]",
    b"[" + b"9" * 5000 + b"]",  # beyond Python's int-string limit
    b"[0.1234567890123456789012]",
    b'"\\ud800"',  # a lone surrogate escape
    b'{"\\udfff": 1}',
    b'"\\ud83d\\ude00"',  # a surrogate pair: valid
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8 bytes
    b'"\xff"',  # not UTF-8
    b"\xef\xbb\xbf[1]",  # a byte order mark
    '"é"'.encode("utf-16"),  # json detects UTF-16 and UTF-32 in bytes
    '[1, "ü"]'.encode("utf-32"),
    b"[" * 2000 + b"]" * 2000,  # deeper than orjson's limit and json's
    b"[" * 400 + b"]" * 400,
    b'"a\x01b"',
    b"[01]",
    b"[1.]",
    b"[.5]",
    b"[+1]",
    b"[1,]",
    b'{"a": 1,}',
    b"[1] x",
    b"",
    b" ",
    b"  [1]  \n",
    b'"\\u0000"',
    b"[true, false, null]",
    b"[tru]",
    b'{"a" 1}',
    b"1.7976931348623157e308",
]


def _reference(data: str | bytes) -> tuple[str, Any]:
    try:
        return "value", strictjson._loads_json(data, "the request body", "body")
    except RequestError as exc:
        return "error", (exc.message, exc.param)


def _fast(data: str | bytes) -> tuple[str, Any]:
    try:
        return "value", strictjson.loads(data)
    except RequestError as exc:
        return "error", (exc.message, exc.param)


def _typed(value: Any) -> Any:
    """``value`` with every number tagged by its type and float signs and NaN made visible."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value, math.copysign(1, value))
    return (type(value).__name__, value)


def _forms() -> list[str | bytes]:
    """Each document as bytes, and as text where it is UTF-8 (lone surrogates kept)."""
    forms: list[str | bytes] = []
    for data in DOCUMENTS:
        forms.append(data)
        with contextlib.suppress(UnicodeDecodeError):
            forms.append(data.decode("utf-8", "surrogatepass"))
    return forms


@pytest.mark.parametrize("text", _forms(), ids=lambda d: repr(d[:24]))
def test_same_value_or_same_error_as_json(text: str | bytes) -> None:
    expected, got = _reference(text), _fast(text)
    assert got[0] == expected[0]
    if got[0] == "value":
        assert _typed(got[1]) == _typed(expected[1])
    else:
        assert got[1] == expected[1]


def test_random_numbers_parse_to_the_same_values() -> None:
    rng = random.Random(7)
    numbers: list[str] = []
    for _ in range(3000):
        value = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if math.isfinite(value):
            numbers += [repr(value), f"{value:.17g}", f"{value:.5e}"]
        numbers.append(str(rng.randint(-(2**70), 2**70)))
        numbers.append(f"{rng.random() * 1000:.{rng.randint(0, 18)}f}")
    document = ("[" + ",".join(numbers) + "]").encode()
    assert _typed(strictjson.loads(document)) == _typed(json.loads(document))
    # Without 19-digit runs the fast path itself parses it.
    short = [n for n in numbers if not any(len(p) >= 19 for p in n.replace("-", " ").split())]
    document = ("[" + ",".join(short) + "]").encode()
    assert _typed(strictjson.loads(document)) == _typed(json.loads(document))


def test_errors_name_the_document_and_param() -> None:
    with pytest.raises(RequestError) as caught:
        strictjson.loads(b'"\\ud800"', what="the message", param=None)
    assert caught.value.message.startswith("the message holds a lone UTF-16 surrogate")
    assert caught.value.param is None
