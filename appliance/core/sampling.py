"""The limits every transport's sampling parameters meet, whatever their wire names.

Wire formats bound their own fields more tightly where their specification says so (OpenAI
caps ``temperature`` at 2); these are the limits beyond which a runtime would misbehave, so
a transport that only parses (Ollama ``options``, WebSocket messages) needs no copy of them.
"""

from __future__ import annotations

import math
from typing import Any

from appliance.core.types import SamplingParams
from appliance.errors import RequestError

MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 100.0
# The same limits as JSON Schema, for the transports' published request schemas.
STOP_SCHEMA: dict[str, Any] = {
    "minLength": 1,
    "maxLength": MAX_STOP_CHARS,
    "maxItems": MAX_STOP,
    "items": {"minLength": 1, "maxLength": MAX_STOP_CHARS},
}
SEED_SCHEMA: dict[str, Any] = {"minimum": -(2**63), "maximum": 2**64 - 1}


def sampling_params(**given: Any) -> SamplingParams:
    """:class:`SamplingParams` from a transport's fields: one left out or None (not sent)
    takes the default, so every transport shares one set of defaults."""
    return SamplingParams(**{name: value for name, value in given.items() if value is not None})


def check_sampling(params: SamplingParams) -> None:
    """Raise :class:`RequestError` naming the first parameter out of range."""
    if params.max_tokens is not None and params.max_tokens < 1:
        _bad("max_tokens", params.max_tokens, "at least 1")
    _number("temperature", params.temperature, low=0.0)
    _number("top_p", params.top_p, low=0.0, high=1.0)
    if params.top_k < 0:
        _bad("top_k", params.top_k, "0 (off) or more")
    _number("min_p", params.min_p, low=0.0, high=1.0)
    _number("repeat_penalty", params.repeat_penalty, low=0.0, strict_low=True)
    _number("presence_penalty", params.presence_penalty)
    _number("frequency_penalty", params.frequency_penalty)
    if len(params.stop) > MAX_STOP:
        _bad("stop", f"{len(params.stop)} sequences", f"at most {MAX_STOP} sequences")
    for stop in params.stop:
        if not stop or len(stop) > MAX_STOP_CHARS:
            _bad("stop", stop, f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        _bad("seed", params.seed, "a 64-bit integer")
    for token, bias in (params.logit_bias or {}).items():
        if token < 0:
            _bad("logit_bias", token, "token ids of 0 or more")
        _number("logit_bias", bias, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)


def _number(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    strict_low: bool = False,
) -> None:
    if not math.isfinite(value):
        _bad(name, value, "a finite number")
    too_low = low is not None and (value <= low if strict_low else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        if low is not None and high is not None:
            allowed = f"between {low:g} and {high:g}"
        elif low is not None:
            allowed = f"more than {low:g}" if strict_low else f"at least {low:g}"
        else:
            allowed = f"at most {high:g}"
        _bad(name, value, allowed)


def _bad(name: str, value: object, allowed: str) -> None:
    raise RequestError(f"{name} must be {allowed}, got {value!r}", param=name)
