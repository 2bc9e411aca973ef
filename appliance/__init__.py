"""Appliance: an edge AI appliance runtime.

One asyncio daemon serves quantized models (ONNX through onnxruntime, GGUF through
llama-cpp-python) to LAN clients over HTTP. See README.md for the shape of the package.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
