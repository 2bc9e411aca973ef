"""Tool calling, the part every transport and runtime shares: what a request offers.

Transports hand the wire fields over as they came (OpenAI's and Ollama's shapes are the
same JSON here): :func:`tool_use` checks ``tools``, ``tool_choice`` and
``parallel_tool_calls``; :func:`tool_calls_of` the ``tool_calls`` of an assistant turn;
:func:`check_conversation` that every ``tool`` turn answers a call that was made. Each
problem is a :class:`~appliance.errors.RequestError` naming the field, so every transport
answers it the same way (HTTP 400, an MQTT or WebSocket error reply).

For runtimes: the messages and tools in the shape chat templates expect
(:func:`template_messages`, :func:`template_tools`), the generic format for models whose
template knows no tools (:func:`generic_system_prompt`, :func:`generic_messages`), and
:func:`grammar_schema`, the JSON schema a tool call's grammar is built from. The calls'
syntax is the same in both formats::

    <tool_call>{"name": "HassTurnOn", "arguments": {"area": "kitchen"}}</tool_call>

Parsing generated text back into calls is :mod:`appliance.core.toolcalls`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from appliance.core.types import ChatMessage, Tool, ToolCall, ToolUse
from appliance.errors import RequestError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128
# The most calls one answer may make with parallel_tool_calls (the grammar's bound, so a
# model cannot loop on calls until the context is full).
MAX_PARALLEL = 8
# OpenAI's rule for function names, widened by the dots and colons MCP servers use.
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Bounds the grammar spells out value by value (an enum); wider ranges are typed only.
MAX_ENUM_SPAN = 1000
MAX_STRING = 128  # characters of a string argument the schema leaves unbounded
MAX_ITEMS = 16  # items of an array argument the schema leaves unbounded


def new_call_id() -> str:
    """An id for a call the model made, in OpenAI's form."""
    return "call_" + secrets.token_hex(12)


def tool_use(
    tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None
) -> ToolUse | None:
    """The validated tools of a request, or None when it offers none or ``tool_choice`` is
    ``none`` (the model then answers in text, as without tools)."""
    if tools is None or (isinstance(tools, list) and not tools):
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of tools", param="tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"tools must hold at most {MAX_TOOLS} tools", param="tools")
    parsed = tuple(_tool(raw, f"tools[{i}]") for i, raw in enumerate(tools))
    names = [t.name for t in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(
                f"tools: {name!r} is defined twice", param=f"tools[{i}].function.name"
            )
    if parallel_tool_calls is None:
        parallel = True
    elif isinstance(parallel_tool_calls, bool):
        parallel = parallel_tool_calls
    else:
        raise RequestError("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if tool_choice is None or tool_choice == "auto":
        return ToolUse(parsed, "auto", None, parallel)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolUse(parsed, "required", None, parallel)
    name = _named_choice(tool_choice)
    if name not in names:
        raise RequestError(
            f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice"
        )
    return ToolUse(parsed, "function", name, False)


def _named_choice(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise RequestError(
            'tool_choice must be "auto", "none", "required" or '
            '{"type": "function", "function": {"name": "..."}}',
            param="tool_choice",
        )
    return name


def _tool(raw: Any, where: str) -> Tool:
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be an object", param=where)
    if raw.get("type", "function") != "function":
        raise RequestError(f'{where}.type must be "function"', param=f"{where}.type")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise RequestError(f"{where}.function must be an object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.function.name is required", param=f"{where}.function.name")
    if not _NAME.match(name):
        raise RequestError(
            f"{where}.function.name must be 1 to 64 letters, digits, '_', '-', '.' or ':', "
            f"got {name!r}",
            param=f"{where}.function.name",
        )
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise RequestError(
            f"{where}.function.description must be a string", param=f"{where}.function.description"
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise RequestError(
            f"{where}.function.parameters must be a JSON schema of type object",
            param=f"{where}.function.parameters",
        )
    return Tool(name=name, description=description, parameters=parameters)


def tool_calls_of(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """The ``tool_calls`` of an assistant turn: OpenAI's (``arguments`` a JSON string) or
    Ollama's (an object, often no id). Calls without an id get one."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RequestError(f"{where} must be a list", param=where)
    calls = []
    for i, call in enumerate(raw):
        at = f"{where}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{at}.function.name is required", param=f"{at}.function.name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise RequestError(
                    f"{at}.function.arguments is not valid JSON", param=f"{at}.function.arguments"
                ) from None
        if not isinstance(arguments, dict):
            raise RequestError(
                f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments"
            )
        call_id = call.get("id") or new_call_id()
        if not isinstance(call_id, str):
            raise RequestError(f"{at}.id must be a string", param=f"{at}.id")
        calls.append(ToolCall(id=call_id, name=function["name"], arguments=arguments))
    return tuple(calls)


def conversation(
    turns: Iterable[tuple[str, str, Any, str | None]], *, ids_required: bool = False
) -> tuple[ChatMessage, ...]:
    """The chat turns of a request, each ``(role, text, raw tool_calls, tool_call_id)`` as
    a transport parsed it, with their tool calls read (:func:`tool_calls_of`) and the
    conversation checked (:func:`check_conversation`): what every transport needs."""
    messages = tuple(
        ChatMessage(
            role,
            content,
            tool_calls=tool_calls_of(calls, f"messages[{i}].tool_calls"),
            tool_call_id=call_id,
        )
        for i, (role, content, calls, call_id) in enumerate(turns)
    )
    check_conversation(messages, ids_required=ids_required)
    return messages


def check_conversation(messages: Sequence[ChatMessage], *, ids_required: bool = False) -> None:
    """Every ``tool`` turn must answer a call made before it: its ``tool_call_id`` names
    one (required with ``ids_required``, as OpenAI's API does)."""
    made: set[str] = set()
    for i, message in enumerate(messages):
        made.update(call.id for call in message.tool_calls)
        if message.role != "tool":
            continue
        if message.tool_call_id is None:
            if ids_required:
                raise RequestError(
                    f"messages[{i}].tool_call_id is required for a tool message",
                    param=f"messages[{i}].tool_call_id",
                )
            continue
        if message.tool_call_id not in made:
            raise RequestError(
                f"messages[{i}].tool_call_id {message.tool_call_id!r} matches no tool call of "
                "an earlier assistant message",
                param=f"messages[{i}].tool_call_id",
            )


# -- for runtimes -------------------------------------------------------------------------


def template_tools(use: ToolUse) -> list[dict[str, Any]]:
    """The tools as chat templates take them (OpenAI's shape, as Hugging Face's do)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in use.tools
    ]


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as tool-aware chat templates take them: calls with ``arguments`` objects."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def call_text(call: ToolCall) -> str:
    """One call in the syntax models answer with."""
    return (
        f'{CALL_OPEN}{{"name": {json.dumps(call.name)}, '
        f'"arguments": {json.dumps(dict(call.arguments), ensure_ascii=False)}}}{CALL_CLOSE}'
    )


def generic_system_prompt(use: ToolUse) -> str:
    """The generic format's instructions, for models whose chat template knows no tools."""
    lines = [
        json.dumps(
            {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
            ensure_ascii=False,
        )
        for t in use.tools
    ]
    if use.choice == "function":
        rule = f"Answer with a call of {use.function}."
    elif use.choice == "required":
        rule = "Answer with at least one tool call."
    else:
        rule = "Answer in plain text when no tool is needed."
    many = " One line per call; several calls may follow each other." if use.parallel else ""
    return (
        "You can call these tools:\n<tools>\n" + "\n".join(lines) + "\n</tools>\n"
        f'To call a tool, answer {CALL_OPEN}{{"name": "<tool name>", "arguments": '
        f"<arguments as a JSON object>}}{CALL_CLOSE}.{many} {rule} "
        "Tool results come back in <tool_response> tags."
    )


def generic_messages(messages: Sequence[ChatMessage], use: ToolUse | None) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the instructions joined to the system
    prompt, calls written out in the answers, results as user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"}
            )
        elif m.tool_calls:
            text = "".join(call_text(c) for c in m.tool_calls)
            out.append({"role": m.role, "content": (m.content + "\n" + text).lstrip()})
        else:
            out.append({"role": m.role, "content": m.content})
    if use is not None:
        prompt = generic_system_prompt(use)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def grammar_schema(use: ToolUse) -> dict[str, Any]:
    """The JSON schema one call must match: ``{"name": ..., "arguments": ...}`` for any of
    the tools the answer may call, with each tool's parameters made grammar-ready."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": _bounded(t.parameters)},
            "required": ["name", "arguments"],
        }
        for t in use.callable
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _bounded(schema: Any) -> Any:
    """``schema`` with what llama.cpp's schema converter leaves out spelled out: numeric
    bounds as the values they allow, and a length limit on open strings and arrays (the
    values still match the original schema)."""
    if isinstance(schema, list):
        return [_bounded(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {
        k: _bounded(v) if k not in ("enum", "const", "default", "examples") else v
        for k, v in schema.items()
    }
    kind = out.get("type")
    if (
        kind in ("integer", "number")
        and "enum" not in out
        and (
            "minimum" in out
            or "maximum" in out
            or "exclusiveMinimum" in out
            or "exclusiveMaximum" in out
        )
    ):
        values = _range_values(out, whole=kind == "integer")
        if values is not None:
            return {
                k: v
                for k, v in out.items()
                if k not in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            } | {"enum": values}
    if (
        kind == "string"
        and "maxLength" not in out
        and "enum" not in out
        and "const" not in out
        and "pattern" not in out
        and "format" not in out
    ):
        out["maxLength"] = MAX_STRING
    if kind == "array" and "maxItems" not in out and "prefixItems" not in out:
        out["maxItems"] = MAX_ITEMS
    return out


def _range_values(schema: Mapping[str, Any], *, whole: bool) -> list[int | float] | None:
    """The values a bounded integer (or, in halves, number) schema allows, as an enum; None
    when the range is too wide to list. A range open on one side is cut to the
    ``MAX_ENUM_SPAN`` values nearest its bound (all of them valid)."""
    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema and isinstance(schema["exclusiveMinimum"], (int, float)):
        low = schema["exclusiveMinimum"]
    if "exclusiveMaximum" in schema and isinstance(schema["exclusiveMaximum"], (int, float)):
        high = schema["exclusiveMaximum"]
    step = 1.0 if whole else 0.5
    numeric = (int, float)
    if isinstance(low, numeric) and not isinstance(high, numeric):
        high = low + (MAX_ENUM_SPAN - 1) * step
    elif isinstance(high, numeric) and not isinstance(low, numeric):
        low = high - (MAX_ENUM_SPAN - 1) * step
    if not isinstance(low, numeric) or not isinstance(high, numeric):
        return None
    start = -int(-low // step)  # ceil(low / step)
    count = int(high // step) - start + 1
    if count <= 0 or count > MAX_ENUM_SPAN:
        return None
    values: list[int | float] = []
    for i in range(start, start + count):
        value = i * step
        if ("exclusiveMinimum" in schema and value <= low) or (
            "exclusiveMaximum" in schema and value >= high
        ):
            continue
        values.append(int(value) if float(value).is_integer() else value)
    return values or None
