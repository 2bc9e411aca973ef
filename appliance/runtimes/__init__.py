"""Model runtimes: one module per backend behind :class:`~appliance.runtimes.base.Runtime`.

Backends are found lazily so a box without llama-cpp-python still serves ONNX models.
"""

from __future__ import annotations

import importlib
import importlib.util

from appliance.runtimes.base import Runtime

# runtime kind -> (module, class, the import that must be installed for it)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "onnx": ("appliance.runtimes.onnx", "OnnxRuntime", "onnxruntime"),
    "gguf": ("appliance.runtimes.gguf", "GgufRuntime", "llama_cpp"),
}

# File suffix of a model served directly with ``--model`` -> runtime kind.
SUFFIXES: dict[str, str] = {".onnx": "onnx", ".gguf": "gguf"}

KINDS: tuple[str, ...] = tuple(_BACKENDS)


def runtime_class(kind: str) -> type[Runtime]:
    """The runtime class for ``kind``; importing it does not import the heavy backend."""
    module_name, class_name, _ = _BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(cls, type)
    assert issubclass(cls, Runtime)
    return cls


def backend_installed(kind: str) -> bool:
    """Whether the backend library for ``kind`` can be imported, without importing it."""
    return importlib.util.find_spec(_BACKENDS[kind][2]) is not None


__all__ = ["KINDS", "SUFFIXES", "Runtime", "backend_installed", "runtime_class"]
