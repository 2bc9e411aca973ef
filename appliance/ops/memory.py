"""The C heap on small boxes: fewer malloc arenas, and the start-up's freed memory given back.

glibc gives a thread that finds the heap busy an arena of its own, up to eight per core,
and each arena keeps what is freed into it. The daemon's threads (the event loop, the
model workers, llama.cpp's decode thread) allocate little once they run, so
:func:`limit_arenas` caps them at :data:`ARENAS` before any thread starts, as
``MALLOC_ARENA_MAX=2`` would; a ``MALLOC_ARENA_MAX`` in the environment wins, since glibc
reads it itself.

Starting allocates and frees many MiB of temporaries (configuration and request schemas,
model files parsed, onnxruntime's graph optimisation). glibc keeps freed memory for reuse,
so the idle daemon would hold it for nothing; :class:`HeapTrim`, a lifecycle unit, calls
``malloc_trim(0)`` once every model has loaded or failed, which hands the free pages of
every arena back to the kernel. On a C library without these calls (musl) both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

from appliance.ops.units import BackgroundUnit

log = logging.getLogger(__name__)

ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
    except OSError:
        return None


def limit_arenas(env: Mapping[str, str] = os.environ, arenas: int = ARENAS) -> bool:
    """At most ``arenas`` malloc arenas, unless ``MALLOC_ARENA_MAX`` is set; True if set.

    Call before threads start: arenas made before stay.
    """
    libc = _libc()
    if env.get("MALLOC_ARENA_MAX") or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(arenas)))


def release_free_heap() -> bool:
    """``malloc_trim(0)``: free heap pages back to the kernel; True if any went back."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))


class HeapTrim(BackgroundUnit):
    """Lifecycle unit: once ``wait_loaded`` returns, give the freed heap back (off the loop)."""

    name = "appliance-heap-trim"

    def __init__(self, wait_loaded: Callable[[], Awaitable[object]]) -> None:
        self._wait_loaded = wait_loaded

    async def run(self) -> None:
        await self._wait_loaded()
        released = await asyncio.to_thread(release_free_heap)
        log.debug("start-up heap %s", "given back" if released else "had nothing to give back")
