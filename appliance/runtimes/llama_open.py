"""Opening ``llama_cpp.Llama`` with model parameters its constructor does not take."""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()


def open_llama(*, cpu_repack: bool = True, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(**kwargs)``, without CPU weight repacking when ``cpu_repack`` is off.

    ``Llama`` builds its model parameters from llama.cpp's defaults and offers no argument
    for ``use_extra_bufts`` (the repacked AMX / AVX-512 / ARM weight layouts), so the
    default-parameter function is swapped for the duration of one construction. The lock
    keeps two constructions from seeing each other's swap.
    """
    from llama_cpp import Llama
    from llama_cpp import llama_cpp as lib

    if cpu_repack:
        return Llama(**kwargs)
    with _lock:
        original = lib.llama_model_default_params

        def without_repack() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_repack
        try:
            return Llama(**kwargs)
        finally:
            lib.llama_model_default_params = original
