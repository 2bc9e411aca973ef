"""The one strict JSON reader for what clients send: HTTP bodies, WebSocket messages and
the hub's uploads.

``json.loads`` can fail in more ways than :class:`json.JSONDecodeError`: an integer longer
than Python's int-string limit (:func:`sys.get_int_max_str_digits`, 4,300 digits) raises a
plain :class:`ValueError`, nesting beyond the recursion limit a :class:`RecursionError`,
bytes that are not UTF-8 a :class:`UnicodeDecodeError`; and it accepts lone UTF-16
surrogates that no UTF-8 text can hold. Each becomes a :class:`RequestError` naming the
problem here, so no transport can turn a client's bad input into a 500.

Documents are parsed by orjson first, several times faster than ``json``; whatever it
refuses, and any document holding a run of 19 or more digits (orjson turns integers beyond
64 bits into floats, ``json`` keeps them exact), goes to ``json`` as before, so what is
accepted, every value and every error message stay those of ``json``. orjson accepts a
strict subset of what ``json`` does (no NaN or Infinity literals, no lone surrogates, no
bytes that are not UTF-8, at most 1,024 levels of nesting), and for the rest parses to the
same values: duplicate keys keep the last, floats round the same way.

Text that is not JSON at all (a syntax error, or an integer no Python int can hold) raises
the subclass :class:`Unparsable`, so a reader that also takes plain text (MQTT prompts) can
tell it from JSON that is broken in other ways.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import orjson

from appliance.errors import RequestError

# A ``\uD800``-``\uDFFF`` escape: json accepts lone surrogates, which no UTF-8 text can hold.
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")
# 19 digits in a row: perhaps an integer orjson would not keep exact (beyond 64 bits).
# Found by mapping every digit to "0" and everything else to " " and searching for 19
# zeros, at C speed: a regular expression takes several times longer than orjson's parse.
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_RUN = b"0" * 19


class Unparsable(RequestError):
    """The text does not parse as JSON, or holds an integer past the int-string limit."""


def loads(data: str | bytes, *, what: str = "the request body", param: str | None = "body") -> Any:
    """``data`` parsed as JSON, or a :class:`RequestError` naming what is wrong with it.

    ``what`` names the document in messages ("the request body", "the message"); ``param``
    is the error's ``param``.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if _LONG_RUN not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json decides: it may accept it (NaN, a BOM) or says what is wrong
    return _loads_json(data, what, param)


def _loads_json(data: str | bytes, what: str, param: str | None) -> Any:
    try:
        value = json.loads(data)
        if isinstance(data, bytes):
            suspect = not data.isascii() or _SURROGATE_BYTES.search(data) is not None
        else:
            suspect = _SURROGATE_TEXT.search(data) is not None
        if suspect:
            # Strings reach tokenizers and numpy as UTF-8; a lone surrogate would fail there.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{what} is not UTF-8 text", param=param) from None
    except UnicodeEncodeError:
        raise RequestError(
            f"{what} holds a lone UTF-16 surrogate (\\uD800-\\uDFFF), which is not valid "
            "Unicode text",
            param=param,
        ) from None
    except json.JSONDecodeError as exc:
        raise Unparsable(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", param=param
        ) from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply", param=param) from None
    except ValueError:
        # The only other ValueError json.loads raises: int("1" * 5000) refuses to convert.
        raise Unparsable(
            f"{what} holds an integer with more than {sys.get_int_max_str_digits()} digits; "
            "no field accepts numbers that large",
            param=param,
        ) from None
    return value


__all__ = ["Unparsable", "loads"]
