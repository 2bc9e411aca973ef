"""Tool calling in the GGUF runtime: the prompt and the grammar of a request with tools.

**Prompt.** A chat template that knows tools (it writes calls as ``<tool_call>`` JSON, as
Hermes, Qwen 2.5/3 and the project's own ``home-intent`` do, and renders the ``tools`` it is
given) gets the tools and the conversation's calls and results as Hugging Face templates
take them. Any other model gets the generic format of :mod:`appliance.core.tools`: the
instructions and the tools' schemas in the system prompt, calls written out in earlier
answers, results as user turns.

**Grammar.** The calls are constrained by a llama.cpp grammar built from the tools' JSON
schemas (llama-cpp-python's converter, after :func:`~appliance.core.tools.grammar_schema`
spelled out what it does not support), so arguments match their schema even from a model
that knows nothing of tools. With ``tool_choice: required`` or a named function the grammar
holds from the first token; with ``auto`` it is lazy, as in llama-server: the model writes
freely until it writes ``<tool_call>``, and from there on only a call that fits the grammar
can follow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.core.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    MAX_PARALLEL,
    generic_messages,
    grammar_schema,
    template_messages,
    template_tools,
)
from appliance.core.types import ChatMessage, Tool, ToolUse
from appliance.errors import RequestError

# llama.cpp matches a lazy grammar's trigger patterns against everything generated so far
# (std::regex_match: the whole text); the first group is where the grammar takes over.
TRIGGER = r"[\s\S]*?(" + re.escape(CALL_OPEN) + r")[\s\S]*"
# The converter's string character class, and llama.cpp's (no control characters).
_ANY_CHAR = r'[^"\\]'
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'
_PROBE = Tool(name="probe_tool_7f3a", description="", parameters={"type": "object"})


@dataclass(frozen=True)
class ToolGrammar:
    """A grammar for a request's calls; ``lazy`` ones wait for ``triggers`` to match."""

    text: str
    root: str
    lazy: bool
    triggers: tuple[str, ...] = ()


def knows_tools(formatter: Any) -> bool:
    """Whether a Jinja chat formatter renders tools and writes calls as ``<tool_call>``."""
    template = getattr(formatter, "template", None)
    if not isinstance(template, str) or CALL_OPEN not in template:
        return False
    messages = [{"role": "user", "content": "x"}]
    try:
        with_tools = formatter(messages=messages, tools=template_tools(ToolUse((_PROBE,))))
        without = formatter(messages=messages)
    except Exception:  # a template may raise anything; then it cannot take tools either
        return False
    return bool(with_tools.prompt != without.prompt)


def chat_messages(
    messages: Sequence[ChatMessage], use: ToolUse | None, *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and tools, for a template that takes them) to render."""
    if native:
        return template_messages(messages), template_tools(use) if use is not None else None
    if use is None and not any(m.tool_calls or m.role == "tool" for m in messages):
        return [{"role": m.role, "content": m.content} for m in messages], None
    return generic_messages(messages, use), None


def tool_grammar(use: ToolUse) -> ToolGrammar:
    """The grammar of the calls a request may make."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        calls = json_schema_to_gbnf(json.dumps(grammar_schema(use)))
    except Exception as exc:  # the converter raises several unrelated types
        raise RequestError(
            f"cannot build a grammar from the tools' parameters: {exc}", param="tools"
        ) from None
    # The converter's root becomes one call; our root is the calls in their tags. Its string
    # characters admit raw control characters, which JSON does not (llama.cpp's own
    # converter excludes them): a tiny model's newline would make the arguments unparsable.
    lines = [
        ("tool-call ::= " + line[len("root ::= ") :])
        if line.startswith("root ::= ")
        else line.replace(_ANY_CHAR, _JSON_CHAR, 1)
        if line.startswith("char ::= ")
        else line
        for line in calls.splitlines()
    ]
    one = f'{_literal(CALL_OPEN)} "\\n"? tool-call "\\n"? {_literal(CALL_CLOSE)}'
    more = f' ( "\\n"? {one} ){{0,{MAX_PARALLEL - 1}}}' if use.parallel else ""
    root = f"root ::= {one}{more}"
    text = "\n".join([root, *lines]) + "\n"
    lazy = use.choice == "auto"
    return ToolGrammar(text=text, root="root", lazy=lazy, triggers=(TRIGGER,) if lazy else ())


def _literal(text: str) -> str:
    return json.dumps(text)


def init_sampler(llama_cpp: Any, vocab: Any, grammar: ToolGrammar) -> Any:
    """A grammar sampler (``llama_sampler *``) for ``grammar``; lazy ones by pattern."""
    text, root = grammar.text.encode("utf-8"), grammar.root.encode("utf-8")
    if not grammar.lazy:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text, root)
    else:
        import ctypes

        patterns = (ctypes.c_char_p * len(grammar.triggers))(
            *(p.encode("utf-8") for p in grammar.triggers)
        )
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            vocab, text, root, patterns, len(grammar.triggers), None, 0
        )
    if not sampler:
        raise RequestError("llama.cpp cannot parse the grammar of these tools", param="tools")
    return sampler
