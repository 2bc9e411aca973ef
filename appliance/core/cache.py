"""The opt-in result cache: identical tensor requests answered without running the model.

Keys are ``model / version / blake2b(inputs, requested outputs)``, so a new model version
never answers from an old one's results. Two backends:

- ``memory``: an LRU in this process, bounded by entries and bytes, each entry with a TTL;
- ``redis``: shared by several processes (or boxes), entries expire through Redis' own TTL.
  Results travel as msgpack (never pickle: whoever can write to Redis must not be able to
  run code here). A Redis that is slow or away is a miss, logged once, never an error.
  With a data key (``security.data_key_file``), every value is sealed with AES-256-GCM,
  bound to the entry it belongs to, and stored under a keyed hash of its key: Redis then
  holds neither results nor anything that identifies a request, and a value that does not
  open under the key (another key, altered, moved, or written in plain text by whoever else
  can write to Redis) is a miss, never an answer and never an error.

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
from appliance.security.crypto import DecryptionError, FieldCipher

log = logging.getLogger(__name__)


def request_key(
    model: str, version: str, inputs: Mapping[str, Array], outputs: Sequence[str]
) -> str:
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
        while self._entries and (
            len(self._entries) > self._max_entries or self._bytes > self._max_bytes
        ):
            _, (_, dropped, _) = self._entries.popitem(last=False)
            self._bytes -= dropped

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


_SEALED = b"enc1:"  # a sealed value: the mark, then nonce ‖ ciphertext ‖ tag


class RedisBackend:
    """Entries in Redis under ``prefix + key``, expiring through Redis' own TTL; with a
    ``cipher``, sealed and under ``prefix + "e:" + keyed hash of key`` (module docstring)."""

    def __init__(
        self, url: str, *, prefix: str, timeout: float, cipher: FieldCipher | None = None
    ) -> None:
        import redis.asyncio as aioredis  # optional: only with backend = "redis"

        self._client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._prefix = prefix
        self._timeout = timeout
        self._cipher = cipher
        self._failing = False
        self.rejected = 0  # values that did not open under the data key

    def _name(self, key: str) -> str:
        if self._cipher is None:
            return self._prefix + key
        return f"{self._prefix}e:{self._cipher.pseudonym(key)}"

    async def get(self, key: str) -> InferResult | None:
        raw = await self._call(self._client.get(self._name(key)))
        if not isinstance(raw, bytes):
            return None
        if self._cipher is not None:
            opened = self._open(raw, key)
            return _decode(opened) if opened is not None else None
        if raw.startswith(_SEALED):
            return None  # sealed by a box with a data key: unreadable here, quietly a miss
        return _decode(raw)

    async def put(self, key: str, result: InferResult, ttl: float) -> None:
        value = _encode(result)
        if self._cipher is not None:
            # Bound to its key: a value copied under another request's name does not open.
            value = _SEALED + self._cipher.seal(value, self._prefix + key)
        await self._call(self._client.set(self._name(key), value, px=max(1, int(ttl * 1000))))

    def _open(self, raw: bytes, key: str) -> bytes | None:
        assert self._cipher is not None
        try:
            if not raw.startswith(_SEALED):
                raise DecryptionError("the value is not sealed")
            return self._cipher.open(raw[len(_SEALED) :], self._prefix + key)
        except DecryptionError as exc:
            self.rejected += 1
            # Once at warning (another key, or someone writing to Redis), then quietly.
            level = logging.WARNING if self.rejected == 1 else logging.DEBUG
            log.log(
                level,
                "result cache: ignoring a Redis entry that does not open under "
                "the data key (%s); it counts as a miss",
                exc,
            )
            return None

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
            log.warning(
                "result cache: Redis unavailable (%s); serving without the cache",
                exc or type(exc).__name__,
            )
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
            outputs[name] = [
                value.dtype.str,
                list(value.shape),
                np.ascontiguousarray(value).tobytes(),
            ]
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

    def __init__(
        self,
        config: CacheConfig,
        backend: Backend | None = None,
        *,
        cipher: FieldCipher | None = None,
    ) -> None:
        self.config = config
        self._models = frozenset(config.models)
        if backend is not None:
            self.backend = backend
        elif config.backend == "redis":
            self.backend = RedisBackend(
                config.redis_url,
                prefix=config.redis_prefix,
                timeout=config.redis_timeout,
                cipher=cipher,
            )
        else:
            self.backend = MemoryBackend(max_entries=config.max_entries, max_bytes=config.max_bytes)

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
