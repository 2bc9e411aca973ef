"""Per-sequence sampling and text assembly for the GGUF runtime (llama.cpp's low-level API).

Each generation gets its own llama.cpp sampler chain, built once before it joins the batch:
logit bias, repetition penalties (primed with the prompt), an optional grammar (JSON schema
or any JSON object; or the calls of a request with tools, see ``llama_tools``), then greedy
at temperature 0 or top-k → top-p → min-p → temperature → a seeded draw. The order matches
llama-cpp-python's high-level API, so results do not change for clients moving from it.

:class:`TextAssembler` turns sampled token pieces into streamable text: it decodes UTF-8
incrementally (a character split over two tokens is sent whole) and holds back text that may
still become a stop sequence, so a stop string is never streamed in part.
"""

from __future__ import annotations

import codecs
import ctypes
import json
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.core.types import SamplingParams
from appliance.errors import RequestError
from appliance.runtimes.llama_tools import ToolGrammar, init_sampler

# Tokens the repetition penalties look back over (llama-cpp-python's default).
PENALTY_LAST_N = 64
# llama.cpp's "pick a random seed" value.
DEFAULT_SEED = 0xFFFFFFFF


def grammar_text(params: SamplingParams) -> tuple[str, str] | None:
    """The GBNF grammar and its root rule for a JSON-constrained request, else None."""
    if params.json_schema is None and not params.json_object:
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if params.json_schema is not None:
            grammar = LlamaGrammar.from_json_schema(json.dumps(params.json_schema), verbose=False)
        else:
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    except Exception as exc:  # the converter raises several unrelated types
        raise RequestError(f"cannot use this JSON schema: {exc}", param="response_format") from None
    return str(grammar._grammar), str(grammar._root)


def build_sampler(
    vocab: Any,
    n_vocab: int,
    params: SamplingParams,
    *,
    seed: int | None,
    prompt: Sequence[int],
    grammar: tuple[str, str] | None,
    tools: ToolGrammar | None = None,
) -> Any:
    """A new sampler chain (a ``llama_sampler *``) for one sequence; the caller frees it."""
    import llama_cpp

    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        _fill(
            llama_cpp,
            chain,
            vocab,
            n_vocab,
            params,
            seed=seed,
            prompt=prompt,
            grammar=grammar,
            tools=tools,
        )
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
    return chain


def _fill(
    llama_cpp: Any,
    chain: Any,
    vocab: Any,
    n_vocab: int,
    params: SamplingParams,
    *,
    seed: int | None,
    prompt: Sequence[int],
    grammar: tuple[str, str] | None,
    tools: ToolGrammar | None,
) -> None:
    add = llama_cpp.llama_sampler_chain_add
    if params.logit_bias:
        add(chain, _logit_bias(llama_cpp, n_vocab, params.logit_bias))
    if (
        params.repeat_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    ):
        penalties = llama_cpp.llama_sampler_init_penalties(
            n_vocab,
            PENALTY_LAST_N,
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        )
        # The prompt counts as history, as in llama-server: a story does not repeat its
        # own opening line. Accepted before joining the chain, so the grammar never sees it.
        for token in prompt[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(penalties, token)
        add(chain, penalties)
    if grammar is not None:
        text, root = grammar
        sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, text.encode("utf-8"), root.encode("utf-8")
        )
        if not sampler:
            raise RequestError(
                "llama.cpp cannot parse the grammar for this JSON schema", param="response_format"
            )
        add(chain, sampler)
    if tools is not None:
        add(chain, init_sampler(llama_cpp, vocab, tools))
    if params.temperature == 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return
    add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
    add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    draw_seed = DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
    add(chain, llama_cpp.llama_sampler_init_dist(draw_seed))


def _logit_bias(llama_cpp: Any, n_vocab: int, bias: Mapping[int, float]) -> Any:
    items = sorted(bias.items())
    array = (llama_cpp.llama_logit_bias * len(items))()
    for i, (token, value) in enumerate(items):
        array[i].token = token
        array[i].bias = value
    sampler = llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(items), array)
    # llama.cpp copies the array; nothing has to outlive this call.
    return sampler


def free_sampler(sampler: Any) -> None:
    import llama_cpp

    if sampler:
        llama_cpp.llama_sampler_free(sampler)


class Detokenizer:
    """Token id → bytes, each token's piece looked up in llama.cpp once (decode thread only).

    A piece never changes for a vocabulary, so after its first use a token costs a dict
    lookup instead of a foreign call — each such call releases and retakes the GIL, a chance
    for the event loop's thread to take it while the next decode step waits.
    """

    def __init__(self, vocab: Any) -> None:
        import llama_cpp

        self._vocab = vocab
        self._piece = llama_cpp.llama_token_to_piece
        self._size = 64
        self._buffer = ctypes.create_string_buffer(self._size)
        self._pieces: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._lookup(token)
        return piece

    def _lookup(self, token: int) -> bytes:
        n = self._piece(self._vocab, token, self._buffer, self._size, 0, False)
        if n < 0:  # a piece longer than the buffer: grow it once and retry
            self._size = -n
            self._buffer = ctypes.create_string_buffer(self._size)
            n = self._piece(self._vocab, token, self._buffer, self._size, 0, False)
        return self._buffer.raw[:n]


class TextAssembler:
    """Generated bytes in, text safe to stream out; finds stop sequences across tokens."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # text that may be the start of a stop sequence

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; returns the text to send now and whether a stop matched."""
        text = self._held + self._decoder.decode(piece)
        if not self._stops:
            self._held = ""
            return text, False
        found = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if found >= 0:
            self._held = ""
            return text[:found], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:k]):
                    keep = k
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text held back, once the generation has ended without a stop sequence."""
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text
