"""The opt-in result cache: identical tensor requests answered without running the model.

Keys are ``model / version / blake2b(inputs, requested outputs)``, so a new model version
never answers from an old one's results. Two backends:

- ``memory``: an LRU in this process, bounded by entries and bytes, each entry with a TTL;
- ``redis``: shared by several processes (or boxes), entries expire through Redis' own TTL.
  Results travel as msgpack (never pickle: whoever can write to Redis must not be able to
  run code here). A Redis that is slow or away is a miss, logged once, never an error.

Hits and misses are counted per model in ``appliance_cache_hits_total`` and
``appliance_cache_misses_total``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from appliance.config import CacheConfig
from appliance.core.types import Array, InferResult

log = logging.getLogger(__name__)


def request_key(model: str, version: str, inputs: Mapping[str, Array],
                outputs: Sequence[str]) -> str:
    """The cache key of one tensor request."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(inputs):
        value = inputs[name]
        digest.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        if value.dtype == np.object_:
            for item in value.reshape(-1):
                raw = item if isinstance(item, bytes) else str(item).encode()
                digest.update(len(raw).to_bytes(8, "little") + raw)
        else:
            digest.update(np.ascontiguousarray(value).tobytes())
    digest.update(b"\0outputs\0" + "\0".join(outputs).encode())
    return f"{model}/{version}/{digest.hexdigest()}"


def _size(result: InferResult) -> int:
    return sum(int(v.nbytes) for v in result.outputs.values())


class Backend(Protocol):
    async def get(self, key: str) -> InferResult | None: ...

    async def put(self, key: str, result: InferResult, ttl: float) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """LRU with a TTL per entry, bounded by entries and bytes."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[float, int, InferResult]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> InferResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, size, result = entry
        if time.monotonic() >= expires:
            del self._entries[key]
            self._bytes -= size
            return None
        self._entries.move_to_end(key)
        return result

    async def put(self, key: str, result: InferResult, ttl: float) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        size = _size(result)
        # Read-only copies: a transport that changed a result in place would poison the cache.
        frozen = {}
        for name, value in result.outputs.items():
            copy = np.array(value, copy=True)
            copy.flags.writeable = False
            frozen[name] = copy
        self._entries[key] = (time.monotonic() + ttl, size, InferResult(outputs=frozen))
        self._bytes += size
        while self._entries and (len(self._entries) > self._max_entries
                                 or self._bytes > self._max_bytes):
            _, (_, dropped, _) = self._entries.popitem(last=False)
            self._bytes -= dropped

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisBackend:
    """Entries in Redis under ``prefix + key``, expiring through Redis' own TTL."""

    def __init__(self, url: str, *, prefix: str, timeout: float) -> None:
        import redis.asyncio as aioredis  # optional: only with backend = "redis"

        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._prefix = prefix
        self._timeout = timeout
        self._failing = False

    async def get(self, key: str) -> InferResult | None:
        raw = await self._call(self._client.get(self._prefix + key))
        return _decode(raw) if isinstance(raw, bytes) else None

    async def put(self, key: str, result: InferResult, ttl: float) -> None:
        await self._call(self._client.set(self._prefix + key, _encode(result),
                                          px=max(1, int(ttl * 1000))))

    async def _call(self, call: Any) -> Any:
        try:
            value = await asyncio.wait_for(call, self._timeout)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            self._report(exc)
            return None
        except Exception as exc:  # redis.RedisError and its many subclasses
            self._report(exc)
            return None
        if self._failing:
            log.info("result cache: Redis answers again")
            self._failing = False
        return value

    def _report(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning("result cache: Redis unavailable (%s); serving without the cache",
                        exc or type(exc).__name__)
            self._failing = True

    async def close(self) -> None:
        await self._client.aclose()


def _encode(result: InferResult) -> bytes:
    import msgpack

    outputs = {}
    for name, value in result.outputs.items():
        if value.dtype == np.object_:
            items = [v if isinstance(v, bytes) else str(v).encode() for v in value.reshape(-1)]
            outputs[name] = ["O", list(value.shape), items]
        else:
            outputs[name] = [value.dtype.str, list(value.shape),
                             np.ascontiguousarray(value).tobytes()]
    return bytes(msgpack.packb(outputs, use_bin_type=True))


def _decode(raw: bytes) -> InferResult | None:
    import msgpack

    try:
        data = msgpack.unpackb(raw, raw=False)
        outputs: dict[str, Array] = {}
        for name, (dtype, shape, payload) in data.items():
            if dtype == "O":
                array = np.empty(len(payload), dtype=object)
                array[:] = payload
                outputs[name] = array.reshape(shape)
            else:
                outputs[name] = np.frombuffer(payload, dtype=np.dtype(dtype)).reshape(shape)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        log.warning("result cache: ignoring an unreadable entry (%s)", exc)
        return None
    return InferResult(outputs=outputs)


class ResultCache:
    """Which models are cached, and their entries (a lifecycle unit: close it)."""

    def __init__(self, config: CacheConfig, backend: Backend | None = None) -> None:
        self.config = config
        self._models = frozenset(config.models)
        if backend is not None:
            self.backend = backend
        elif config.backend == "redis":
            self.backend = RedisBackend(config.redis_url, prefix=config.redis_prefix,
                                        timeout=config.redis_timeout)
        else:
            self.backend = MemoryBackend(max_entries=config.max_entries,
                                         max_bytes=config.max_bytes)

    def enabled(self, name: str, option: bool) -> bool:
        """Whether results of model ``name`` (whose ``cache`` option is ``option``) are cached."""
        return option or name in self._models

    def ttl(self, option: float | None) -> float:
        return option if option is not None else self.config.ttl

    async def get(self, key: str) -> InferResult | None:
        return await self.backend.get(key)

    async def put(self, key: str, result: InferResult, ttl: float) -> None:
        if _size(result) <= self.config.max_entry_bytes:
            await self.backend.put(key, result, ttl)

    async def close(self) -> None:
        await self.backend.close()


__all__ = ["MemoryBackend", "RedisBackend", "ResultCache", "request_key"]
