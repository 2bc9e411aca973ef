"""Log hygiene: secrets and personal data are redacted, and client text cannot forge lines.

:class:`RedactingFilter` rewrites every record on the handler that writes it (so records of
every library, aiohttp's access log included, pass through it): the message is formatted,
API keys, bearer tokens, ``key=value`` secrets, passwords in URLs, JWTs, e-mail addresses
and phone numbers are replaced by ``[REDACTED]``, and control characters (CR, LF, ESC and
the rest of C0/C1, which could start a forged log line or recolour a terminal) are written
as escapes. :class:`SafeFormatter` does the same for exception text and indents every
traceback line, so no line of a traceback can look like a record of its own.

Prompts and payloads are not logged at all unless ``logging.log_payloads`` is on.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[REDACTED]"

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Our API keys and hub device tokens, OpenAI-style keys.
    (re.compile(r"\b(?:apk|aph)_[A-Za-z0-9_-]{16,}"), REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    # JSON Web Tokens.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), REDACTED),
    # Authorization: Bearer/Basic <credentials>
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{6,}"), r"\1 " + REDACTED),
    # key=value and "key": "value" for secret-looking names (query strings, JSON, headers).
    (
        re.compile(
            r"(?i)([\"']?\b[\w-]*(?:key|token|secret|password|passwd|"
            r"authorization|credential)[\w-]*[\"']?\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|[^\s&,;}]+)"
        ),
        r"\1" + REDACTED,
    ),
    # Passwords in URLs: scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@"), r"\1" + REDACTED + "@"),
    # E-mail addresses.
    (
        re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        REDACTED,
    ),
    # Phone numbers: international (+CC ...) or grouped national forms (555-123-4567).
    (re.compile(r"(?<![\w.])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w.])"), REDACTED),
    (re.compile(r"(?<![\w.:-])\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?![\w.:-])"), REDACTED),
]
# C0 controls but TAB, DEL, and C1 controls (U+0085 NEL, U+2028/2029 separators too).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def redact(text: str) -> str:
    """``text`` with secrets and personal data replaced."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def neutralise(text: str) -> str:
    """``text`` on one line: control characters as visible escapes (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r"}.get(
        char, f"\\x{ord(char):02x}" if ord(char) < 256 else f"\\u{ord(char):04x}"
    )


def clean(text: str) -> str:
    return neutralise(redact(text))


class RedactingFilter(logging.Filter):
    """Formats the message once, cleaned; install on handlers (see module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} {record.args!r}"
        record.msg = clean(message)
        record.args = None
        return True


class SafeFormatter(logging.Formatter):
    """Cleans and indents exception and stack text (the message is the filter's job)."""

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _indent(redact(super().formatException(ei)))

    def formatStack(self, stack_info: str) -> str:
        return _indent(redact(super().formatStack(stack_info)))


def _indent(text: str) -> str:
    lines = text.split("\n")
    return "\n".join("    " + _CONTROL.sub(_escape, line) for line in lines)


def install(
    handler: logging.Handler, fmt: str, formatter: type[SafeFormatter] = SafeFormatter
) -> None:
    """Put the filter and a safe formatter on ``handler``."""
    handler.addFilter(RedactingFilter())
    handler.setFormatter(formatter(fmt))


__all__ = [
    "REDACTED",
    "RedactingFilter",
    "SafeFormatter",
    "clean",
    "install",
    "neutralise",
    "redact",
]
