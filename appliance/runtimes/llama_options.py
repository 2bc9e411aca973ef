"""The ``[options]`` of a GGUF model, and the rule that sizes its slots when none are set.

Slots: a GGUF model without a ``parallel`` option (per model or in ``[models]``) gets
:func:`auto_slots` — four per CPU core, at most 16 and at least 2 — then, once the file is
loaded and the size of one slot's KV cache is known, no more slots than fit in a quarter of
the memory available at that moment (:func:`slots_that_fit`, never fewer than one). An
explicit ``parallel`` is taken as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from appliance.runtimes.base import RuntimeOptions

# KV cache element types llama.cpp accepts for type_k / type_v (llama-server's list).
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
KvType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
# Bytes per element of each type (blocks of 32 for the quantized ones).
KV_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}

# Quantized types store blocks of 32 elements: a head's width must be a multiple of 32.
QUANTIZED_KV = frozenset(t for t in KV_TYPES if t[0] in "qi")

SLOTS_PER_CORE = 4
MAX_AUTO_SLOTS = 16
MIN_AUTO_SLOTS = 2
MEMORY_SHARE = 0.25  # of the available memory the automatic slots' KV cache may take


class GgufOptions(RuntimeOptions):
    """``[options]`` of a GGUF model manifest. ``parallel`` is the number of slots."""

    n_ctx: int = Field(
        default=2048,
        ge=0,
        le=1 << 20,
        description="Context window per slot in tokens (the KV cache holds parallel × n_ctx); "
        "0 means the model's own, capped to its training context either way.",
    )
    n_batch: int = Field(
        default=512,
        ge=1,
        le=1 << 16,
        description="Most tokens decoded in one step (prompt chunks of joining requests plus "
        "one token per running stream).",
    )
    n_gpu_layers: int = Field(
        default=0, ge=-1, le=10_000, description="Layers offloaded to a GPU (-1: all)."
    )
    type_k: KvType = Field(
        default="f16",
        description="Element type of the KV cache's keys: f16, or q8_0 / q4_0 ... to fit more "
        "context or slots in the same memory.",
    )
    type_v: KvType = Field(
        default="f16",
        description="Element type of the KV cache's values; a quantized one needs flash "
        "attention (flash_attn 'auto' or 'on').",
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Flash attention: 'auto' lets llama.cpp use it where the backend has it.",
    )
    chat_format: str | None = Field(
        default=None,
        description="Chat format name (e.g. 'chatml', 'llama-2') for models whose GGUF has no "
        "chat template; default: the template in the file, else llama-cpp-python's guess.",
    )
    embeddings: bool = Field(default=True, description="Offer /v1/embeddings for this model.")
    use_mmap: bool = Field(default=True, description="Memory-map the weights (shared, lazy).")
    cpu_repack: bool = Field(
        default=True,
        description="Let llama.cpp repack weights into this CPU's fast layouts (AMX, AVX-512, "
        "ARM dot-product). Off for a model that crashes in decode with them, as tiny Q8_0 "
        "models do on AMX processors with llama-cpp-python 0.3.36.",
    )
    seed: int | None = Field(default=None, description="Default sampling seed.")
    max_tokens: int = Field(
        default=512,
        ge=0,
        le=1_000_000,
        description="Tokens generated for a request that sets no limit (OpenAI max_tokens, "
        "Ollama num_predict, MQTT/WebSocket max_tokens); 0: until the context is full.",
    )
    prompt_cache_mb: int = Field(
        default=512,
        ge=0,
        le=1 << 20,
        description="MiB of the state directory that saved prompt prefixes (KV cache state) "
        "of this model may take, so a long shared system prompt is not decoded again after "
        "a restart; the least recently used go first; 0 turns the cache off.",
    )
    prompt_cache_min_tokens: int = Field(
        default=256,
        ge=1,
        le=1 << 20,
        description="Shortest shared prompt prefix worth saving to the prompt cache.",
    )


def auto_slots(cpus: int | None = None) -> int:
    """Slots of a GGUF model without a ``parallel`` option, before the memory check."""
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(MIN_AUTO_SLOTS, min(MAX_AUTO_SLOTS, SLOTS_PER_CORE * cores))


def kv_bytes_per_token(
    n_layer: int, n_embd_k: int, n_embd_v: int, type_k: str = "f16", type_v: str = "f16"
) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values)."""
    return int(n_layer * (n_embd_k * KV_BYTES[type_k] + n_embd_v * KV_BYTES[type_v]))


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def slots_that_fit(wanted: int, slot_bytes: int, available: int | None) -> int:
    """At most ``wanted`` slots whose KV caches take no more than a share of ``available``."""
    if available is None or slot_bytes <= 0:
        return wanted
    return max(1, min(wanted, int(available * MEMORY_SHARE) // slot_bytes))


def ggml_type(name: str) -> int:
    """llama.cpp's ``GGML_TYPE_*`` number of a KV type name."""
    import llama_cpp

    return int(getattr(llama_cpp, "GGML_TYPE_" + name.upper()))


def flash_attn_type(name: str) -> int:
    import llama_cpp

    return int(
        {
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[name]
    )
