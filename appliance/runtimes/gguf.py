"""GGUF language models through llama.cpp's low-level API, with continuous batching.

The model is loaded once; one context holds ``parallel`` slots (each with its own part of
the KV cache, ``n_ctx`` tokens) decoded together by :class:`~.llama_batch.BatchEngine` on
its own thread. A request is prepared on the model's worker threads — chat template,
tokenisation, checks, its sampler chain — so every error (a template that rejects the
messages, a prompt longer than the context, a bad schema) is raised before the first chunk;
then it joins the running batch and its text streams back through an asyncio queue.
Closing the stream cancels the sequence, which leaves the batch within one decode step.

Chat prompts are rendered with the model's own template (``tokenizer.chat_template`` in the
GGUF metadata, rendered by llama-cpp-python's sandboxed Jinja formatter) or, for models
without one, a named format; the rendered prompt is tokenised here so prompt usage is exact.
A request with tools goes through the template when it knows tools, else the generic format,
and its calls are constrained by a grammar built from the tools' schemas (``llama_tools``).
Embeddings use a second, lazily created context in embedding mode through llama-cpp-python's
high-level API: the weights are memory-mapped, so it shares them with the generating one.

The options and the rule that sizes the slots of a model without ``parallel`` are in
``llama_options``, chat templates in ``llama_chat``, the on-disk prompt cache in
``llama_prompt_cache``. Everything llama.cpp specific stays in this package, so the core and
the transports never see it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from appliance.core.types import Capability, EmbeddingResult, GenerateRequest, TokenChunk
from appliance.errors import ModelLoadError, RequestError
from appliance.runtimes.base import Runtime, RuntimeOptions
from appliance.runtimes.llama_batch import RELEASED, BatchEngine, Generation
from appliance.runtimes.llama_chat import chat_formatter, chat_template, file_details, format_name
from appliance.runtimes.llama_options import (
    QUANTIZED_KV,
    GgufOptions,
    auto_slots,
    available_memory,
    kv_bytes_per_token,
    slots_that_fit,
)
from appliance.runtimes.llama_prompt_cache import open_prompt_cache
from appliance.runtimes.llama_sampling import build_sampler, free_sampler, grammar_text
from appliance.runtimes.llama_tools import chat_messages, knows_tools, tool_grammar

log = logging.getLogger(__name__)


class GgufRuntime(Runtime):
    """A llama.cpp model: chat, completions, embeddings."""

    kind: ClassVar[str] = "gguf"
    options_model: ClassVar[type[RuntimeOptions]] = GgufOptions
    # Every admitted request gets a slot of its own in the batch; this caps the slots.
    max_parallel: ClassVar[int | None] = 64

    _model: Any = None  # llama_cpp._internals.LlamaModel
    _engine: BatchEngine | None = None
    _embedder: Any = None
    _formatter: Any = None
    _stop_ids: frozenset[int] = frozenset()
    _native_tools = False  # the chat template renders tools and <tool_call> answers

    @classmethod
    def default_parallel(cls) -> int:
        return auto_slots()

    def __init__(self, name: str, path: Path, options: RuntimeOptions, workers: int) -> None:
        super().__init__(name, path, options, workers)
        self.slots = max(1, workers)
        # A count nobody set is checked against the memory once the KV size is known.
        self._auto_slots = self._opts.parallel is None and self.slots == auto_slots()
        self._details: dict[str, str] = {}  # from the file, once loaded

    @property
    def _opts(self) -> GgufOptions:
        assert isinstance(self.options, GgufOptions)
        return self.options

    def load_blocking(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        opts = self._opts
        # llama.cpp's log callback prints whatever its Python logger lets through, and that
        # logger starts unfiltered: without this, every context creation writes pages of
        # debug lines to stderr (and so to the journal).
        logging.getLogger("llama-cpp-python").setLevel(
            logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        )
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = opts.n_gpu_layers
        params.use_mmap = opts.use_mmap
        params.use_extra_bufts = opts.cpu_repack
        # verbose=False would point the whole process's stdout and stderr at /dev/null while
        # the file loads, losing every log line of the daemon meanwhile; llama.cpp's own
        # output goes through its log callback, which the level above filters.
        try:
            self._model = _internals.LlamaModel(
                path_model=str(self.path), params=params, verbose=True
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {self.path.name}: {exc}") from exc
        self._metadata = self._model.metadata()
        self._details = file_details(self._metadata, self._model.desc(), self._model.n_params())
        trained = self._model.n_ctx_train()
        per_slot = min(opts.n_ctx or trained, trained) if trained > 0 else (opts.n_ctx or 2048)
        self.kv_bytes_per_slot = per_slot * self._kv_bytes_per_token()
        if self._auto_slots:
            self.slots = slots_that_fit(self.slots, self.kv_bytes_per_slot, available_memory())
        cpus = os.cpu_count() or 1
        vocab = self._model.vocab
        try:
            self._engine = BatchEngine(
                self._model.model,
                vocab,
                name=self.name,
                slots=self.slots,
                ctx_per_slot=per_slot,
                n_batch=opts.n_batch,
                threads=opts.threads or max(1, cpus // 2),
                threads_batch=opts.threads or cpus,
                kv=(opts.type_k, opts.type_v, opts.flash_attn),
                # Memoized: a foreign call per token would release the GIL once more.
                is_eog=functools.cache(
                    lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
                ),
                stats=self.stats,
                prompt_cache=open_prompt_cache(self.name, self.path, opts),
            )
        except RuntimeError as exc:
            raise ModelLoadError(str(exc)) from exc
        self._formatter, self._stop_ids = chat_formatter(
            self._model, self._metadata, opts.chat_format
        )
        template = chat_template(self._metadata, opts.chat_format)
        self._native_tools = bool(template) and knows_tools(self._formatter)
        log.info(
            "model %s: %d slot(s) of %d tokens (KV %s/%s, %.1f MiB a slot), chat format %s, "
            "tools %s",
            self.name,
            self.slots,
            self._engine.ctx_per_slot,
            opts.type_k,
            opts.type_v,
            self.kv_bytes_per_slot / (1 << 20),
            "template from file" if template else format_name(self._metadata, opts.chat_format),
            "through its template" if self._native_tools else "in the generic format",
        )

    def _kv_bytes_per_token(self) -> int:
        import llama_cpp

        model, meta = self._model.model, self._metadata
        arch = meta.get("general.architecture", "")
        n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
        head = int(llama_cpp.llama_model_n_embd(model)) // n_head
        key = int(meta.get(f"{arch}.attention.key_length", head))
        value = int(meta.get(f"{arch}.attention.value_length", head))
        layers = int(llama_cpp.llama_model_n_layer(model))
        opts = self._opts
        for key_name, kind, size in (("type_k", opts.type_k, key), ("type_v", opts.type_v, value)):
            if kind in QUANTIZED_KV and size % 32:
                raise ModelLoadError(
                    f"{key_name} {kind} needs attention heads a multiple of 32 wide; "
                    f"{self.path.name}'s are {size}"
                )
        return kv_bytes_per_token(
            layers, key * n_head_kv, value * n_head_kv, opts.type_k, opts.type_v
        )

    def close_blocking(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._model is not None:
            self._model.close()
            self._model = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        caps = {Capability.GENERATE}
        if self._opts.embeddings:
            caps.add(Capability.EMBED)
        return frozenset(caps)

    @property
    def details(self) -> Mapping[str, str]:
        return self._details

    @property
    def context_length(self) -> int | None:
        return self._engine.ctx_per_slot if self._engine is not None else None

    def count_tokens(self, text: str) -> int:
        return len(self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    # -- generation -------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        return self._stream(request)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        engine = self._engine
        assert engine is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        generation = await _prepared(self, request, loop, queue)
        try:
            engine.submit(generation)
        except RuntimeError:
            free_sampler(generation.sampler)
            raise
        ended = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                assert isinstance(item, TokenChunk)
                if item.finish_reason is not None:
                    ended = True
                    yield item
                    return
                yield item
        finally:
            if not ended:
                engine.cancel(generation)
                await _until_released(queue)

    def _prepare(
        self, request: GenerateRequest, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]
    ) -> Generation:
        """Render, tokenise and check a request and build its sampler (worker thread)."""
        model = self._model
        engine = self._engine
        assert engine is not None
        params = request.params
        stops = list(params.stop)
        stop_ids: frozenset[int] = frozenset()
        use = request.tools
        if use is not None and (params.json_schema is not None or params.json_object):
            raise RequestError(
                "response_format (Ollama: format) cannot be combined with tools",
                param="response_format",
            )
        if request.messages is not None:
            messages, tools = chat_messages(request.messages, use, native=self._native_tools)
            extra = {"tools": tools} if tools is not None else {}
            try:
                rendered = self._formatter(messages=messages, **extra)
            except Exception as exc:  # a template may raise anything, e.g. on role order
                raise RequestError(
                    f"the model's chat template rejected the messages: {exc}", param="messages"
                ) from None
            tokens = model.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            if rendered.stop:
                stops += [rendered.stop] if isinstance(rendered.stop, str) else rendered.stop
            if rendered.stopping_criteria is not None:
                stop_ids = self._stop_ids
        else:
            tokens = model.tokenize(
                (request.prompt or "").encode("utf-8"), add_bos=True, special=False
            )
        where = "messages" if request.messages is not None else "prompt"
        context = engine.ctx_per_slot
        if not tokens:
            raise RequestError("the prompt is empty", param=where)
        if len(tokens) >= context:
            raise RequestError(
                f"the prompt is {len(tokens)} tokens, longer than the model's context length "
                f"{context}",
                param=where,
            )
        n_vocab = model.n_vocab()
        for token in params.logit_bias or {}:
            if token >= n_vocab:
                raise RequestError(
                    f"logit_bias names token {token} but the vocabulary has {n_vocab}",
                    param="logit_bias",
                )
        sampler = build_sampler(
            model.vocab,
            n_vocab,
            params,
            seed=params.seed if params.seed is not None else self._opts.seed,
            prompt=tokens,
            grammar=grammar_text(params),
            tools=tool_grammar(use) if use is not None else None,
        )
        room = context - len(tokens)
        # No limit asked: the model's default (max_tokens option), not the whole context.
        limit = params.max_tokens or self._opts.max_tokens or room
        return Generation(
            prompt=tokens,
            sampler=sampler,
            max_tokens=min(limit, room),
            stops=stops,
            stop_ids=stop_ids,
            loop=loop,
            queue=queue,
        )

    # -- embeddings -------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        return await self.run_blocking(self._embed_blocking, list(texts))

    def _embed_blocking(self, texts: list[str]) -> EmbeddingResult:
        if self._embedder is None:
            self._embedder = self._open_embedder()
        vectors, count = self._embedder.embed(texts, normalize=True, return_count=True)
        return EmbeddingResult(
            vectors=[list(map(float, v)) for v in vectors], prompt_tokens=int(count)
        )

    def _open_embedder(self) -> Any:
        import llama_cpp

        from appliance.runtimes.llama_open import open_llama

        opts = self._opts
        n_ctx = self.context_length or 512
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": n_ctx,
            "n_batch": n_ctx,
            "n_ubatch": n_ctx,
            "n_gpu_layers": opts.n_gpu_layers,
            "use_mmap": opts.use_mmap,
            "verbose": False,
            "embedding": True,
            "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        }
        if opts.threads:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = opts.threads
        return open_llama(cpu_repack=opts.cpu_repack, **kwargs)


async def _until_released(queue: asyncio.Queue[Any]) -> None:
    """Wait for the decode loop to drop a cancelled sequence, even through cancellation.

    The model's admission slot is given back only once the sequence has left the batch;
    that happens within one decode step, so this wait is short.
    """
    interrupted = False
    getter: asyncio.Future[Any] | None = None
    while True:
        if getter is None:
            getter = asyncio.ensure_future(queue.get())
        try:
            item = await asyncio.shield(getter)
        except asyncio.CancelledError:
            interrupted = True
            continue
        getter = None
        if (
            item is RELEASED
            or isinstance(item, BaseException)
            or (isinstance(item, TokenChunk) and item.finish_reason is not None)
        ):
            break
    if interrupted:
        raise asyncio.CancelledError


async def _prepared(
    runtime: GgufRuntime,
    request: GenerateRequest,
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[Any],
) -> Generation:
    """``runtime._prepare`` off the loop; a sampler built for a caller that left is freed."""
    task = asyncio.ensure_future(runtime.run_blocking(runtime._prepare, request, loop, queue))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def drop(done: asyncio.Future[Generation]) -> None:
            if not done.cancelled() and done.exception() is None:
                free_sampler(done.result().sampler)

        task.add_done_callback(drop)
        raise
