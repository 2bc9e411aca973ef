"""GGUF language models through llama-cpp-python.

Chat prompts are rendered with the model's own template (``tokenizer.chat_template`` in the
GGUF metadata, rendered by llama-cpp-python's sandboxed Jinja formatter) or, for models
without one, a named format; the rendered prompt is tokenised here so prompt usage is exact.
Generation runs in the model's worker thread and feeds an asyncio queue; closing the stream
sets a flag the thread checks after every token, so an abandoned request stops within one
token. Embeddings use a second, lazily created context in embedding mode: the weights are
memory-mapped, so it shares them with the generating context.

Everything llama-cpp-python specific stays in this module, so the generation loop can be
replaced (continuous batching) without touching the core or the transports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

from pydantic import Field

from appliance.core.types import (
    Capability,
    EmbeddingResult,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
)
from appliance.errors import ModelLoadError, RequestError
from appliance.runtimes.base import Runtime, RuntimeOptions

log = logging.getLogger(__name__)

_END = object()


class GgufOptions(RuntimeOptions):
    """``[options]`` of a GGUF model manifest."""

    n_ctx: int = Field(
        default=2048,
        ge=0,
        le=1 << 20,
        description="Context window in tokens; 0 means the model's own, capped to its training "
        "context either way.",
    )
    n_batch: int = Field(default=512, ge=1, le=1 << 16, description="Prompt batch size.")
    n_gpu_layers: int = Field(
        default=0, ge=-1, le=10_000, description="Layers offloaded to a GPU (-1: all)."
    )
    chat_format: str | None = Field(
        default=None,
        description="Chat format name (e.g. 'chatml', 'llama-2') for models whose GGUF has no "
        "chat template; default: the template in the file, else llama-cpp-python's guess.",
    )
    embeddings: bool = Field(default=True, description="Offer /v1/embeddings for this model.")
    use_mmap: bool = True
    seed: int | None = Field(default=None, description="Default sampling seed.")


class GgufRuntime(Runtime):
    """A llama.cpp model: chat, completions, embeddings."""

    kind: ClassVar[str] = "gguf"
    options_model: ClassVar[type[RuntimeOptions]] = GgufOptions
    # One llama.cpp context decodes one sequence at a time here.
    max_parallel: ClassVar[int | None] = 1

    _llama: Any = None
    _embedder: Any = None
    _formatter: Any = None

    @property
    def _opts(self) -> GgufOptions:
        assert isinstance(self.options, GgufOptions)
        return self.options

    def load_blocking(self) -> None:
        import llama_cpp

        opts = self._opts
        try:
            self._llama = self._open(embedding=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {self.path.name}: {exc}") from exc
        self._formatter = self._chat_formatter(llama_cpp)
        log.info(
            "model %s: context %d tokens, chat format %s",
            self.name,
            self._llama.n_ctx(),
            "template from file" if self._llama.metadata.get("tokenizer.chat_template")
            else (opts.chat_format or self._llama.chat_format),
        )

    def _open(self, *, embedding: bool, n_ctx: int | None = None) -> Any:
        import llama_cpp

        opts = self._opts
        n_ctx = n_ctx or opts.n_ctx
        kwargs: dict[str, Any] = {
            "model_path": str(self.path),
            "n_ctx": n_ctx,
            "n_batch": min(opts.n_batch, n_ctx) if n_ctx else opts.n_batch,
            "n_gpu_layers": opts.n_gpu_layers,
            "use_mmap": opts.use_mmap,
            "verbose": False,
            "embedding": embedding,
        }
        if opts.threads:
            kwargs["n_threads"] = opts.threads
            kwargs["n_threads_batch"] = opts.threads
        if opts.seed is not None:
            kwargs["seed"] = opts.seed
        if embedding:
            kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            kwargs["n_ubatch"] = kwargs["n_batch"] = n_ctx
        llama = llama_cpp.Llama(**kwargs)
        trained = _trained_context(llama)
        if trained and llama.n_ctx() > trained:
            # A context beyond what the model was trained on only produces garbage; reopen
            # at the trained size rather than wasting KV-cache memory on it.
            llama.close()
            return self._open(embedding=embedding, n_ctx=trained)
        return llama

    def _chat_formatter(self, llama_cpp: Any) -> Any:
        from llama_cpp import llama_chat_format

        llama = self._llama
        template = llama.metadata.get("tokenizer.chat_template")
        if template and not self._opts.chat_format:
            eos, bos = llama.token_eos(), llama.token_bos()
            return llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos] if eos != -1 else None,
            )
        name = self._opts.chat_format or llama.chat_format or "llama-2"
        formatter = getattr(llama_chat_format, "format_" + name.replace("-", "").replace("_", ""),
                            None)
        if formatter is None:
            raise ModelLoadError(f"unknown chat_format {name!r}")
        return formatter

    def close_blocking(self) -> None:
        for llama in (self._llama, self._embedder):
            if llama is not None:
                llama.close()
        self._llama = self._embedder = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        caps = {Capability.GENERATE}
        if self._opts.embeddings:
            caps.add(Capability.EMBED)
        return frozenset(caps)

    @property
    def context_length(self) -> int | None:
        return int(self._llama.n_ctx()) if self._llama is not None else None

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    # -- generation -------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        return self._stream(request)

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancelled.set()

        def produce() -> None:
            try:
                for chunk in self._generate_blocking(request, cancelled):
                    emit(chunk)
                    if cancelled.is_set():
                        break
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit(exc)
            finally:
                emit(_END)

        worker = loop.run_in_executor(self.executor, produce)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await _until_done(worker)

    def _generate_blocking(
        self, request: GenerateRequest, cancelled: threading.Event
    ) -> Iterator[TokenChunk]:
        llama = self._llama
        params = request.params
        stop = list(params.stop)
        stopping = None
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                rendered = self._formatter(messages=messages)
            except Exception as exc:  # a template may raise anything, e.g. on role order
                raise RequestError(f"the model's chat template rejected the messages: {exc}",
                                   param="messages") from None
            tokens = llama.tokenize(
                rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
            )
            if rendered.stop:
                stop += [rendered.stop] if isinstance(rendered.stop, str) else rendered.stop
            stopping = rendered.stopping_criteria
        else:
            tokens = llama.tokenize((request.prompt or "").encode("utf-8"), add_bos=True,
                                    special=False)
        if len(tokens) >= llama.n_ctx():
            raise RequestError(
                f"the prompt is {len(tokens)} tokens, longer than the model's context length "
                f"{llama.n_ctx()}",
                param="messages" if request.messages is not None else "prompt",
            )
        for token in params.logit_bias or {}:
            if token >= llama.n_vocab():
                raise RequestError(
                    f"logit_bias names token {token} but the vocabulary has {llama.n_vocab()}",
                    param="logit_bias",
                )
        from llama_cpp import LogitsProcessorList

        grammar = _grammar(params)
        # llama.cpp samples once per generated token; counting samples (rather than
        # re-tokenising the text) gives exact usage.
        samples = 0

        # The bias is applied here too: llama-cpp-python drops every logits processor, its
        # own logit_bias one included, when both are given (LogitsProcessorList.extend
        # returns None), which would silently ignore logit_bias and zero the usage.
        bias = sorted((params.logit_bias or {}).items())
        bias_ids = [token for token, _ in bias]
        bias_values = [value for _, value in bias]

        def count_sample(input_ids: Any, scores: Any) -> Any:
            nonlocal samples
            samples += 1
            if bias_ids:
                scores[bias_ids] += bias_values
            return scores

        pieces = llama.create_completion(
            prompt=tokens,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repeat_penalty=params.repeat_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            stop=stop,
            seed=params.seed if params.seed is not None else self._opts.seed,
            stream=True,
            grammar=grammar,
            stopping_criteria=stopping,
            logits_processor=LogitsProcessorList([count_sample]),
        )
        finish = "stop"
        try:
            for piece in pieces:
                if cancelled.is_set():
                    return
                choice = piece["choices"][0]
                if choice["text"]:
                    yield TokenChunk(text=choice["text"])
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        finally:
            pieces.close()
        # A generation that stopped on its own sampled one more token (end of text, or the
        # one that completed a stop sequence) than the text it returns.
        completion = max(0, samples - 1) if finish == "stop" else samples
        yield TokenChunk(
            text="", finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=completion
        )

    # -- embeddings -------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        return await self.run_blocking(self._embed_blocking, list(texts))

    def _embed_blocking(self, texts: list[str]) -> EmbeddingResult:
        if self._embedder is None:
            self._embedder = self._open(embedding=True, n_ctx=self._llama.n_ctx())
        vectors, count = self._embedder.embed(texts, normalize=True, return_count=True)
        return EmbeddingResult(vectors=[list(map(float, v)) for v in vectors],
                               prompt_tokens=int(count))


async def _until_done(worker: asyncio.Future[None]) -> None:
    """Wait for the generation thread, even through repeated cancellation.

    The model is free for the next request only once the thread has stopped; it stops
    within one token of the cancel flag, so this wait is short.
    """
    interrupted = False
    while not worker.done():
        try:
            await asyncio.shield(worker)
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError


def _grammar(params: SamplingParams) -> Any:
    if params.json_schema is None and not params.json_object:
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if params.json_schema is not None:
            return LlamaGrammar.from_json_schema(json.dumps(params.json_schema), verbose=False)
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    except Exception as exc:  # the converter raises several unrelated types
        raise RequestError(f"cannot use this JSON schema: {exc}", param="response_format") from None


def _trained_context(llama: Any) -> int | None:
    """The training context from the GGUF metadata, if the file states it."""
    arch = llama.metadata.get("general.architecture", "")
    try:
        trained = int(llama.metadata.get(f"{arch}.context_length", 0))
    except ValueError:
        return None
    return trained if trained > 0 else None
