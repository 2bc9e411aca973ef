"""Chat formatting and file details of a GGUF model, read from its metadata.

A model's chat prompts are rendered with its own template (``tokenizer.chat_template`` in
the GGUF metadata, through llama-cpp-python's sandboxed Jinja formatter) or, for models
without one, a named format (``chat_format``, else llama-cpp-python's guess, else llama-2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from appliance.errors import ModelLoadError


def chat_template(metadata: Mapping[str, str], chat_format: str | None) -> str | None:
    """The file's Jinja chat template, unless a named ``chat_format`` replaces it."""
    if chat_format:
        return None
    return metadata.get("tokenizer.chat_template") or None


def format_name(metadata: Mapping[str, str], chat_format: str | None) -> str:
    from llama_cpp import llama_chat_format

    guessed = llama_chat_format.guess_chat_format_from_gguf_metadata(dict(metadata))
    return chat_format or guessed or "llama-2"


def chat_formatter(
    model: Any, metadata: Mapping[str, str], chat_format: str | None
) -> tuple[Any, frozenset[int]]:
    """The formatter for ``model`` and the token ids that end a templated answer."""
    from llama_cpp import llama_chat_format

    template = chat_template(metadata, chat_format)
    if template:
        eos, bos = model.token_eos(), model.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos] if eos != -1 else None,
        )
        return formatter, frozenset([eos] if eos != -1 else [])
    name = format_name(metadata, chat_format)
    found = getattr(llama_chat_format, "format_" + name.replace("-", "").replace("_", ""), None)
    if found is None:
        raise ModelLoadError(f"unknown chat_format {name!r}")
    return found, frozenset()


def file_details(metadata: Mapping[str, str], desc: str, n_params: int) -> dict[str, str]:
    """Family, size and quantization as Ollama lists them (``/api/show``, ``/api/tags``).

    The quantization is the file type's name (``general.file_type``: ``Q8_0``, ``Q4_K_M``,
    ``F32``); the size is the parameter count in Ollama's style (``205.8K``, ``7.6B``).
    """
    import llama_cpp

    size = ""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n_params >= scale:
            size = f"{n_params / scale:.1f}{unit}"
            break
    names = {
        getattr(llama_cpp, k): k.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix(
            "LLAMA_FTYPE_ALL_"
        )
        for k in dir(llama_cpp)
        if k.startswith("LLAMA_FTYPE_") and k != "LLAMA_FTYPE_GUESSED"
    }
    raw = metadata.get("general.file_type", "")
    words = desc.split()
    level = names.get(int(raw), "") if raw.isdigit() else ""
    if not level and len(words) >= 2:
        level = words[-1]  # llama.cpp's description ends in the type's name
    return {
        "family": metadata.get("general.architecture", ""),
        "parameter_size": size,
        "quantization_level": level,
    }
