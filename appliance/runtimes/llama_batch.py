"""Continuous batching for GGUF models: slots, one decode loop, many streams.

One llama.cpp context holds ``slots`` sequences, each with its own part of the KV cache
(``kv_unified`` off: a sequence never attends to, or is slowed by, another's cells), of
``ctx_per_slot`` tokens. A dedicated thread runs the loop:

1. take waiting sequences into free slots — a new request joins the running batch at the
   next step instead of waiting for the others to finish;
2. drop sequences whose client went away (their slot is free again within one step);
3. build one ``llama_batch``: the last sampled token of every generating sequence, then
   prompt tokens of newly joined ones up to ``n_batch`` (long prompts go in chunks, so
   they never stall the streams already running);
4. one ``llama_decode`` for all of them (llama.cpp releases the GIL meanwhile);
5. sample each sequence with its own sampler chain, detokenize, check stops, and hand the
   text to its asyncio consumer — one ``call_soon_threadsafe`` per step, not per token.

Prompt-prefix reuse: a slot keeps the tokens of its last sequence in the KV cache; a new
sequence goes to the free slot sharing the longest prefix with its prompt (the same system
prompt, the same chat history) and only the rest of the prompt is decoded. A shared prefix
is also saved to, and found in, the model's prompt cache on disk (``llama_prompt_cache``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.core.types import TokenChunk
from appliance.runtimes.base import RuntimeStats
from appliance.runtimes.llama_options import flash_attn_type, ggml_type
from appliance.runtimes.llama_prompt_cache import PromptCache
from appliance.runtimes.llama_sampling import Detokenizer, TextAssembler, free_sampler

log = logging.getLogger(__name__)


class Released:
    """Terminal item of a sequence that was cancelled: its slot is free."""


RELEASED = Released()


@dataclass(eq=False)
class Generation:
    """One request's generation, from submission until its terminal item is delivered.

    Every generation ends with exactly one terminal item on ``queue``, put there after its
    slot was freed: the final :class:`TokenChunk`, an exception, or :data:`RELEASED`.
    """

    prompt: list[int]
    sampler: Any  # llama_sampler *, owned (freed by the engine once the generation ends)
    max_tokens: int
    stops: Sequence[str]
    stop_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    cancelled: bool = False
    # Decode-thread state.
    generated: int = 0
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    next_token: int = -1  # sampled, not yet decoded
    assembler: TextAssembler | None = None
    reused: int = 0  # prompt tokens found in the slot's cache


@dataclass(eq=False)
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this slot holds
    generation: Generation | None = None
    last_used: int = 0


class BatchEngine:
    """The decode loop of one GGUF model (a lifecycle owned by the runtime)."""

    def __init__(
        self,
        model: Any,
        vocab: Any,
        *,
        name: str,
        slots: int,
        ctx_per_slot: int,
        n_batch: int,
        threads: int,
        threads_batch: int,
        kv: tuple[str, str, str] = ("f16", "f16", "auto"),
        is_eog: Callable[[int], bool],
        stats: RuntimeStats,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self.name = name
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = slots
        params.n_ctx = ctx_per_slot * slots
        params.n_batch = max(n_batch, slots)
        params.n_ubatch = min(params.n_batch, 512)
        params.n_threads = threads
        params.n_threads_batch = threads_batch
        params.kv_unified = False
        params.no_perf = True
        params.type_k, params.type_v = ggml_type(kv[0]), ggml_type(kv[1])
        params.flash_attn_type = flash_attn_type(kv[2])
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError(
                f"llama.cpp cannot create a context for {slots} slot(s) of {ctx_per_slot} "
                f"tokens with type_k {kv[0]}, type_v {kv[1]}, flash_attn {kv[2]}"
                + (" (a quantized type_v needs flash attention)" if kv[1] != "f16" else "")
            )
        self._cache = prompt_cache
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.ctx_per_slot = min(ctx_per_slot, int(llama_cpp.llama_n_ctx_seq(self._ctx)))
        self._n_batch = int(params.n_batch)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._slots = [Slot(seq_id=i) for i in range(slots)]
        self._detokenize = Detokenizer(vocab)
        self._is_eog = is_eog
        self._stats = stats
        self._waiting: deque[Generation] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._steps = 0
        self._thread = threading.Thread(
            target=self._run, name=f"appliance-{name}-decode", daemon=True
        )
        self._thread.start()

    # -- called from the event loop ---------------------------------------------------

    def submit(self, generation: Generation) -> None:
        """Queue ``generation``; it joins the batch at the next step a slot is free."""
        with self._wake:
            if self._stopping:
                raise RuntimeError(f"model {self.name!r} is unloading")
            self._waiting.append(generation)
            self._wake.notify()

    def cancel(self, generation: Generation) -> None:
        """Stop ``generation`` within one decode step; :data:`RELEASED` follows."""
        generation.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def busy_slots(self) -> int:
        return sum(slot.generation is not None for slot in self._slots)

    def close(self) -> None:
        """Stop the loop (running generations fail) and free the context. Blocks."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        if self._cache is not None:
            self._cache.wait()
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._llama.llama_free(self._ctx)
            self._ctx = None

    # -- the decode thread ------------------------------------------------------------

    def _run(self) -> None:
        outbox: list[tuple[Generation, Any]] = []
        try:
            while self._step(outbox):
                _deliver(outbox)
        except BaseException as exc:  # a bug here must not leave clients waiting forever
            log.exception("model %s: decode loop failed", self.name)
            self._fail_all(outbox, RuntimeError(f"model {self.name!r} failed: {exc}"))
        else:
            self._fail_all(outbox, RuntimeError(f"model {self.name!r} was unloaded"))
        _deliver(outbox)

    def _fail_all(self, outbox: list[tuple[Generation, Any]], error: Exception) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for generation in waiting:
            free_sampler(generation.sampler)
            outbox.append((generation, RELEASED if generation.cancelled else error))
        for slot in self._slots:
            if slot.generation is not None:
                self._end(slot, outbox, RELEASED if slot.generation.cancelled else error)

    def _step(self, outbox: list[tuple[Generation, Any]]) -> bool:
        """One iteration of the loop; False once the engine stops."""
        with self._wake:
            while not self._stopping and not self._waiting and self.busy_slots == 0:
                self._wake.wait()
            if self._stopping:
                return False
            self._admit_waiting(outbox)
        for slot in self._slots:
            if slot.generation is not None and slot.generation.cancelled:
                self._end(slot, outbox, RELEASED)
        batch = self._batch
        entries: list[tuple[Slot, int]] = []  # slots whose last batch entry has logits
        n = members = 0
        for slot in self._slots:  # generating sequences first: one token each
            gen = slot.generation
            if gen is not None and not gen.pending:
                self._put(batch, n, gen.next_token, len(slot.cached), slot.seq_id, True)
                slot.cached.append(gen.next_token)
                entries.append((slot, n))
                n += 1
                members += 1
        for slot in self._slots:  # then prompts, in chunks, within the batch budget
            gen = slot.generation
            if gen is None or not gen.pending or n >= self._n_batch:
                continue
            chunk = gen.pending[: self._n_batch - n]
            del gen.pending[: len(chunk)]
            members += 1
            for i, token in enumerate(chunk):
                last = not gen.pending and i == len(chunk) - 1
                self._put(batch, n, token, len(slot.cached), slot.seq_id, last)
                slot.cached.append(token)
                if last:
                    entries.append((slot, n))
                n += 1
        if n == 0:
            return True
        batch.n_tokens = n
        status = self._llama.llama_decode(self._ctx, batch)
        self._steps += 1
        self._stats.observe_batch(members)
        if status != 0:
            error = RuntimeError(f"llama_decode failed with status {status}")
            for slot in self._slots:
                if slot.generation is not None:
                    self._forget(slot)
                    self._end(slot, outbox, error)
            return True
        for slot, index in entries:
            self._sampled(slot, index, outbox)
        return True

    @staticmethod
    def _put(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits

    def _admit_waiting(self, outbox: list[tuple[Generation, Any]]) -> None:
        """Move waiting generations into free slots (called holding the lock)."""
        while self._waiting:
            generation = self._waiting[0]
            if generation.cancelled:
                self._waiting.popleft()
                free_sampler(generation.sampler)
                outbox.append((generation, RELEASED))
                continue
            free = [slot for slot in self._slots if slot.generation is None]
            if not free:
                return
            self._waiting.popleft()
            prompt = generation.prompt
            slot = max(free, key=lambda s: (_common_prefix(s.cached, prompt), -s.last_used))
            keep = min(_common_prefix(slot.cached, prompt), len(prompt) - 1)
            if not self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
                keep = 0  # a model whose cache cannot be cut (recurrent): start over
                self._forget(slot)
            del slot.cached[keep:]
            if self._cache is not None:
                keep = self._use_cache(slot, prompt, keep)
            generation.reused = keep
            self._stats.cached_prompt_tokens += keep
            generation.pending = list(prompt[keep:])
            generation.assembler = TextAssembler(generation.stops)
            slot.generation = generation
            slot.last_used = self._steps

    def _use_cache(self, slot: Slot, prompt: list[int], keep: int) -> int:
        """Load a longer saved prefix into ``slot``, or save the shared one it holds."""
        cache = self._cache
        assert cache is not None
        llama = self._llama
        entry = cache.best(prompt, better_than=keep)
        if entry is not None:
            payload = cache.read(entry)
            if payload is not None:
                self._forget(slot)
                buffer = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
                if llama.llama_state_seq_set_data(self._ctx, buffer, len(payload), slot.seq_id):
                    slot.cached = list(entry.tokens)
                    return len(entry.tokens)
                log.warning("model %s: prompt cache file %s refused", self.name, entry.path)
                cache.drop(entry)
                self._forget(slot)
                return 0
        if keep >= cache.min_tokens and not cache.has(prompt[:keep]):
            # Shared by two prompts: worth keeping for the next start too.
            size = int(llama.llama_state_seq_get_size(self._ctx, slot.seq_id))
            buffer = (ctypes.c_uint8 * size)()
            written = int(llama.llama_state_seq_get_data(self._ctx, buffer, size, slot.seq_id))
            if written:
                cache.save(prompt[:keep], memoryview(buffer).cast("B")[:written])
        return keep

    def _sampled(self, slot: Slot, index: int, outbox: list[tuple[Generation, Any]]) -> None:
        gen = slot.generation
        assert gen is not None and gen.assembler is not None
        token = int(self._llama.llama_sampler_sample(gen.sampler, self._ctx, index))
        if self._is_eog(token) or token in gen.stop_ids:
            self._finish(slot, outbox, "stop", gen.assembler.flush(), gen.generated)
            return
        gen.generated += 1
        text, stopped = gen.assembler.feed(self._detokenize(token))
        if stopped:
            # The token that completed the stop sequence is not part of the completion.
            self._finish(slot, outbox, "stop", text, gen.generated - 1)
            return
        if gen.generated >= gen.max_tokens or len(slot.cached) >= self.ctx_per_slot:
            self._finish(slot, outbox, "length", text + gen.assembler.flush(), gen.generated)
            return
        if text:
            outbox.append((gen, TokenChunk(text=text)))
        gen.next_token = token

    def _finish(
        self,
        slot: Slot,
        outbox: list[tuple[Generation, Any]],
        reason: str,
        text: str,
        completion: int,
    ) -> None:
        gen = slot.generation
        assert gen is not None
        if text:
            outbox.append((gen, TokenChunk(text=text)))
        final = TokenChunk(
            text="",
            finish_reason=reason,
            prompt_tokens=len(gen.prompt),
            completion_tokens=completion,
        )
        self._end(slot, outbox, final)

    def _end(self, slot: Slot, outbox: list[tuple[Generation, Any]], terminal: Any) -> None:
        gen = slot.generation
        assert gen is not None
        slot.generation = None
        slot.last_used = self._steps
        free_sampler(gen.sampler)
        gen.sampler = None
        outbox.append((gen, terminal))

    def _forget(self, slot: Slot) -> None:
        self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached.clear()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _deliver(outbox: list[tuple[Generation, Any]]) -> None:
    """Hand this step's items to their event loops: one wake-up per loop per step."""
    if not outbox:
        return
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Any]]] = {}
    for generation, item in outbox:
        by_loop.setdefault(generation.loop, []).append((generation, item))
    outbox.clear()
    for loop, items in by_loop.items():
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Generation, Any]]) -> None:
    for generation, item in items:
        generation.queue.put_nowait(item)
