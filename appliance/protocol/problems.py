"""The first problem of a pydantic validation error, as every request schema reports it.

Request bodies (OpenAI, Ollama, WebSocket, MQTT forms, the hub's) are validated by pydantic
models; a client is told the first problem, named by the field's dotted path. pydantic adds
the names of union members, literals and validator functions to an error's location; they
are not fields, so they are dropped here, once for every schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from appliance.errors import RequestError

# Location parts pydantic adds for union members and wrapped validators.
_TYPE_PREFIXES = ("function-", "literal[", "list[", "dict[", "constrained-")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool"})
_SHOWN = 80


@dataclass(frozen=True)
class Problem:
    """The first thing wrong in a body: where (field path parts), pydantic's kind and text."""

    loc: list[str]
    kind: str
    message: str
    shown: str  # repr() of the offending value, at most 80 characters

    def field(self, default: str) -> str:
        return ".".join(self.loc) or default

    def request_error(self, default: str, *, missing: str = "{field} is required") -> RequestError:
        """A 400 naming the field: ``missing`` for an absent one, else pydantic's text."""
        field = self.field(default)
        if self.kind == "missing":
            return RequestError(missing.format(field=field), param=field)
        return RequestError(f"{field}: {self.message} (got {self.shown})", param=field)


def first_problem(
    exc: ValidationError, *, skip: int = 0, type_names: frozenset[str] = frozenset()
) -> Problem:
    """The first error of ``exc``; ``skip`` leading location parts (e.g. a discriminator's
    tag) and any part in ``type_names`` (a schema's own model names in unions) are dropped."""
    err = exc.errors()[0]
    loc = [
        str(part)
        for part in err["loc"][skip:]
        if not _is_type_part(str(part)) and str(part) not in type_names
    ]
    shown = repr(err.get("input"))
    if len(shown) > _SHOWN:
        shown = shown[: _SHOWN - 3] + "..."
    return Problem(loc=loc, kind=err["type"], message=err["msg"], shown=shown)


def _is_type_part(part: str) -> bool:
    return part.startswith(_TYPE_PREFIXES) or part in _TYPE_NAMES


__all__ = ["Problem", "first_problem"]
