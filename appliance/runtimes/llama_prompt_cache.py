"""A prompt cache on disk: the KV state of shared prompt prefixes, kept across restarts.

When a request's prompt shares at least ``prompt_cache_min_tokens`` with what a slot already
holds (a second request with the same system prompt), that shared prefix's KV state is
written to ``<state directory>/prompt-cache/`` (llama.cpp's per-sequence state, written by
a background thread). A later request whose prompt starts with a saved prefix, after a
restart too, loads that state into its slot instead of decoding the prefix again.

Each file holds a header — the model file's SHA-256, the KV cache types, the prefix's tokens,
the payload's length and SHA-256 — and the payload. A file whose header cannot be read, that
belongs to another model or settings, or whose payload does not match its checksum is
skipped (and removed when it names this model); a payload llama.cpp refuses is dropped too.
The files of one model take at most ``prompt_cache_mb``; the least recently used go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"APPLIANCE-KV1\n"
_LENGTH = struct.Struct("<I")
_MEMO = "models.json"


@dataclass
class Entry:
    path: Path
    tokens: tuple[int, ...]
    size: int  # bytes of the whole file
    digest: str  # of the payload
    used: float  # mtime: the last save or load


class PromptCache:
    """The saved prefixes of one model; methods are called from its decode thread."""

    def __init__(self, directory: Path, identity: str, limit_bytes: int, min_tokens: int):
        self.directory = directory
        self.identity = identity  # model SHA-256 + KV types: which states fit this context
        self.limit_bytes = limit_bytes
        self.min_tokens = min_tokens
        self._entries: dict[Path, Entry] = {}
        self._lock = threading.Lock()
        self._writers: list[threading.Thread] = []
        directory.mkdir(parents=True, exist_ok=True)
        for path in directory.glob("*.kv"):
            entry = self._read_header(path)
            if entry is not None:
                self._entries[path] = entry

    def _read_header(self, path: Path) -> Entry | None:
        try:
            with path.open("rb") as file:
                if file.read(len(MAGIC)) != MAGIC:
                    raise ValueError("not a prompt-cache file")
                (length,) = _LENGTH.unpack(file.read(_LENGTH.size))
                header = json.loads(file.read(length))
                if header["identity"] != self.identity:
                    return None  # another model's, or other KV settings: left alone
                tokens = tuple(int(t) for t in header["tokens"])
                digest = str(header["sha256"])
                stat = path.stat()
                expected = len(MAGIC) + _LENGTH.size + length + int(header["bytes"])
                if stat.st_size != expected or not tokens:
                    raise ValueError("truncated")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("prompt cache: ignoring %s: %s", path.name, exc)
            _remove(path)
            return None
        return Entry(path, tokens, stat.st_size, digest, stat.st_mtime)

    def __len__(self) -> int:
        return len(self._entries)

    def has(self, tokens: Sequence[int]) -> bool:
        return self._path(tokens) in self._entries

    def best(self, prompt: Sequence[int], better_than: int) -> Entry | None:
        """The longest saved prefix of ``prompt`` (shorter than it) beyond ``better_than``."""
        found: Entry | None = None
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            n = len(entry.tokens)
            longer = found is None or n > len(found.tokens)
            if better_than < n < len(prompt) and longer and tuple(prompt[:n]) == entry.tokens:
                found = entry
        return found

    def read(self, entry: Entry) -> bytearray | None:
        """The payload of ``entry``, or None (and the entry dropped) if it is damaged."""
        try:
            with entry.path.open("rb") as file:
                file.seek(len(MAGIC))
                (length,) = _LENGTH.unpack(file.read(_LENGTH.size))
                file.seek(length, os.SEEK_CUR)
                payload = bytearray(entry.size - len(MAGIC) - _LENGTH.size - length)
                if file.readinto(payload) != len(payload) or not payload:
                    raise ValueError("truncated")
            if hashlib.sha256(payload).hexdigest() != entry.digest:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, struct.error) as exc:
            log.warning("prompt cache: ignoring %s: %s", entry.path.name, exc)
            self.drop(entry)
            return None
        with contextlib.suppress(OSError):
            os.utime(entry.path)
        entry.used = _now(entry.path, entry.used)
        return payload

    def drop(self, entry: Entry) -> None:
        with self._lock:
            self._entries.pop(entry.path, None)
        _remove(entry.path)

    def save(self, tokens: Sequence[int], payload: memoryview) -> None:
        """Write ``payload`` (the KV state of ``tokens``) in the background."""
        thread = threading.Thread(
            target=self._write, args=(tuple(tokens), payload), name="appliance-prompt-cache"
        )
        self._writers = [t for t in self._writers if t.is_alive()]
        self._writers.append(thread)
        thread.start()

    def wait(self) -> None:
        """Until every save has been written (the model is closing)."""
        for thread in self._writers:
            thread.join()
        self._writers.clear()

    def _path(self, tokens: Sequence[int]) -> Path:
        key = hashlib.sha256(self.identity.encode())
        key.update(struct.pack(f"<{len(tokens)}i", *tokens))
        return self.directory / f"{key.hexdigest()[:32]}.kv"

    def _write(self, tokens: tuple[int, ...], payload: memoryview) -> None:
        path = self._path(tokens)
        digest = hashlib.sha256(payload).hexdigest()
        header = json.dumps(
            {
                "identity": self.identity,
                "tokens": list(tokens),
                "bytes": len(payload),
                "sha256": digest,
            }
        ).encode()
        size = len(MAGIC) + _LENGTH.size + len(header) + len(payload)
        if size > self.limit_bytes:
            return
        temporary = path.with_suffix(".tmp")
        try:
            with temporary.open("wb") as file:
                file.write(MAGIC + _LENGTH.pack(len(header)) + header)
                file.write(payload)
            temporary.replace(path)
        except OSError as exc:
            log.warning("prompt cache: cannot write %s: %s", path, exc)
            _remove(temporary)
            return
        with self._lock:
            self._entries[path] = Entry(path, tokens, size, digest, _now(path, 0.0))
            self._evict()

    def _evict(self) -> None:
        """Remove the least recently used files beyond the limit (holding the lock)."""
        total = sum(entry.size for entry in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda e: e.used):
            if total <= self.limit_bytes:
                break
            total -= entry.size
            del self._entries[entry.path]
            _remove(entry.path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _now(path: Path, fallback: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return fallback


def model_digest(path: Path, directory: Path) -> str:
    """SHA-256 of the model file, remembered in ``directory`` by the file's size and mtime."""
    stat = path.stat()
    memo_path = directory / _MEMO
    stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        memo = dict(json.loads(memo_path.read_text()))
    known = memo.get(stamp)
    if isinstance(known, str) and len(known) == 64:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    memo[stamp] = digest.hexdigest()
    with contextlib.suppress(OSError):
        temporary = memo_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(memo))
        temporary.replace(memo_path)
    return digest.hexdigest()


def open_prompt_cache(name: str, path: Path, options: Any) -> PromptCache | None:
    """The prompt cache of a GGUF model with ``options``, or None where it is off."""
    if options.prompt_cache_mb <= 0:
        return None
    from appliance.ops.instance import state_directory

    directory = state_directory(os.environ) / "prompt-cache"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sha = model_digest(path, directory)
        identity = f"{sha}:{options.type_k}:{options.type_v}"
        return PromptCache(
            directory, identity, options.prompt_cache_mb << 20, options.prompt_cache_min_tokens
        )
    except OSError as exc:
        log.warning("model %s: no prompt cache (%s): %s", name, directory, exc)
        return None
