"""The backup archive: a tar file that says what it holds and proves it is whole.

Layout, in this order::

    appliance-backup.json   header: format name and version, the key derivation's
                            parameters and a key check value (nothing secret)
    manifest.json           what the archive holds: every member's name, size, SHA-256
                            and whether it is encrypted, plus facts about the source
    manifest.hmac           HMAC-SHA256 of manifest.json under a key from the secret
    <members>               the files; secret ones as nonce ‖ AES-256-GCM ciphertext

The secret is a passphrase (scrypt, n=2^15, r=8, p=1: about 32 MiB and a fraction of a
second on a Pi) or a key file (HKDF-SHA256 over its bytes). Three keys are derived from
it with HKDF: one encrypts, one authenticates the manifest, one checks the secret, so a
wrong passphrase is told apart from an altered archive. Every encrypted member is bound
to its name and to this archive's id (the GCM associated data), so members cannot be
swapped between archives or names unnoticed. All of it is ``cryptography``'s primitives.

:func:`open_archive` checks everything (complete tar, known format version, the secret,
the manifest's HMAC, every member's size, SHA-256 and tag) before anyone writes anything;
each failure is a :class:`BackupError` whose message names the problem.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from appliance.backup.secret import BackupError, Secret, check_value, derive, kdf_params

FORMAT = "appliance-backup"
VERSION = 1
HEADER = "appliance-backup.json"
MANIFEST = "manifest.json"
MAC = "manifest.hmac"
_NONCE = 12
_MAX_META = 4 * 1024 * 1024  # header and manifest sizes
_CHUNK = 1024 * 1024


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Member:
    """One file for the archive: ``data`` in memory, or a plain file streamed from ``path``.

    ``meta`` (role, original path, ...) goes into the manifest beside name, size and hash.
    """

    name: str
    data: bytes | None = None
    path: Path | None = None
    encrypted: bool = True
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    path: Path
    size: int
    sha256: str
    members: int


def write_archive(
    out: Path, members: Sequence[Member], facts: Mapping[str, Any], secret: Secret
) -> Written:
    """Write the archive to ``out`` (through a temporary file and a rename)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kdf = kdf_params(secret)
    keys = derive(secret, kdf)
    archive_id = secrets.token_hex(16)
    aead = AESGCM(keys.encrypt)
    entries: list[dict[str, Any]] = []
    sealed: dict[str, bytes] = {}
    for member in members:
        _check_name(member.name)
        if member.encrypted:
            if member.data is None:
                raise ValueError(f"encrypted member {member.name} needs its data in memory")
            nonce = os.urandom(_NONCE)
            blob = nonce + aead.encrypt(nonce, member.data, _aad(archive_id, member.name))
            sealed[member.name] = blob
            size, digest = len(blob), hashlib.sha256(blob).hexdigest()
        elif member.data is not None:
            size, digest = len(member.data), hashlib.sha256(member.data).hexdigest()
        else:
            assert member.path is not None
            size, digest = _hash_file(member.path)
        entries.append(
            {
                "name": member.name,
                "size": size,
                "sha256": digest,
                "encrypted": member.encrypted,
                **member.meta,
            }
        )
    header = {"format": FORMAT, "version": VERSION, "kdf": kdf, "key_check": check_value(keys)}
    manifest = {"archive_id": archive_id, "created": time.time(), **facts, "members": entries}
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
    mac = hmac.new(keys.mac, manifest_bytes, hashlib.sha256).hexdigest().encode("ascii")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, HEADER, json.dumps(header, indent=1).encode("utf-8"))
            _add_bytes(tar, MANIFEST, manifest_bytes)
            _add_bytes(tar, MAC, mac)
            for member in members:
                if member.name in sealed:
                    _add_bytes(tar, member.name, sealed[member.name])
                elif member.data is not None:
                    _add_bytes(tar, member.name, member.data)
                else:
                    assert member.path is not None
                    with member.path.open("rb") as source:
                        info = tarfile.TarInfo(member.name)
                        info.size = os.fstat(source.fileno()).st_size
                        info.mtime = int(time.time())
                        tar.addfile(info, source)
        with tmp.open("rb+") as done:
            os.fsync(done.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size, digest = _hash_file(out)
    return Written(out, size, digest, len(members))


def _aad(archive_id: str, name: str) -> bytes:
    return f"{FORMAT}:{archive_id}:{name}".encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise BackupError(f"archive member name {name!r} is not a plain relative path")


# ---------------------------------------------------------------------------- reading


def read_facts(source: IO[bytes]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and manifest of an archive, checked as far as no secret is needed: every
    member the manifest lists is there, whole, with its SHA-256 (the manifest's own HMAC
    and the secret members' contents need the secret). What the hub checks of a device's
    upload. Raises :class:`BackupError` for anything that is not a complete archive."""
    try:
        with tarfile.open(fileobj=source, mode="r:") as tar:
            header = _json_member(tar, HEADER)
            _check_header(header)
            manifest = _json_member(tar, MANIFEST)
            members = manifest.get("members")
            if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
                raise BackupError("the archive's manifest lists no members")
            expected = {str(m.get("name")): m for m in members}
            for info in tar:
                entry = expected.pop(info.name, None)
                if info.name in (HEADER, MANIFEST, MAC):
                    continue
                reader = tar.extractfile(info) if info.isfile() else None
                if entry is None or reader is None:
                    raise BackupError(f"the archive holds {info.name!r}, which its manifest lacks")
                size, digest, _ = _read_member(reader, keep=False)
                if size != entry.get("size") or digest != entry.get("sha256"):
                    raise BackupError(f"member {info.name} is truncated or altered")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"not a complete backup archive (truncated or damaged): {exc}") from None
    if expected:
        raise BackupError(
            f"the archive is truncated: members missing: {', '.join(sorted(expected))}"
        )
    return header, manifest


class Archive:
    """An archive :func:`open_archive` has verified; members are read from it by name."""

    def __init__(self, path: Path, manifest: dict[str, Any], plain: dict[str, bytes]) -> None:
        self.path = path
        self.manifest = manifest
        self._plain = plain  # decrypted secret members and small plain ones

    @property
    def entries(self) -> list[dict[str, Any]]:
        members: list[dict[str, Any]] = self.manifest["members"]
        return members

    def entry(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.entries if e["name"] == name), None)

    def data(self, name: str) -> bytes:
        """A member's content (decrypted), for members kept in memory."""
        return self._plain[name]

    def in_memory(self, name: str) -> bool:
        return name in self._plain

    def stream(self) -> Iterator[tuple[dict[str, Any], IO[bytes]]]:
        """The large plain members (model files), each with a reader on its bytes."""
        with tarfile.open(self.path, "r:") as tar:
            for info in tar:
                entry = self.entry(info.name)
                if entry is None or info.name in self._plain:
                    continue
                reader = tar.extractfile(info)
                assert reader is not None
                yield entry, reader


_IN_MEMORY = 64 * 1024 * 1024  # plain members up to this size are held for the restore


def open_archive(path: Path, secret: Secret) -> Archive:
    """Verify every part of the archive at ``path`` and decrypt its secret members."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        with tarfile.open(path, "r:") as tar:
            header = _json_member(tar, HEADER)
            _check_header(header)
            keys = derive(secret, header.get("kdf") or {})
            if not hmac.compare_digest(check_value(keys), str(header.get("key_check", ""))):
                raise BackupError("wrong passphrase or key file for this backup")
            manifest_bytes = _member_bytes(tar, MANIFEST)
            mac = _member_bytes(tar, MAC).decode("ascii", "replace").strip()
            expected = hmac.new(keys.mac, manifest_bytes, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, mac):
                raise BackupError("the backup's manifest was altered (its HMAC does not match)")
            manifest = json.loads(manifest_bytes)
            entries = {e["name"]: e for e in manifest["members"]}
            aead = AESGCM(keys.encrypt)
            plain: dict[str, bytes] = {}
            seen: set[str] = set()
            for info in tar:
                if info.name in (HEADER, MANIFEST, MAC):
                    continue
                entry = entries.get(info.name)
                if entry is None or not info.isfile():
                    raise BackupError(f"the archive holds {info.name!r}, which its manifest lacks")
                _check_name(info.name)
                reader = tar.extractfile(info)
                assert reader is not None
                keep = entry["encrypted"] or entry["size"] <= _IN_MEMORY
                size, digest, data = _read_member(reader, keep=keep)
                if size != entry["size"]:
                    raise BackupError(
                        f"member {info.name} is truncated: {size} of {entry['size']} bytes"
                    )
                if digest != entry["sha256"]:
                    raise BackupError(f"member {info.name} was altered (its SHA-256 differs)")
                if entry["encrypted"]:
                    assert data is not None
                    try:
                        data = aead.decrypt(
                            data[:_NONCE], data[_NONCE:], _aad(manifest["archive_id"], info.name)
                        )
                    except (InvalidTag, ValueError):
                        raise BackupError(f"member {info.name} does not decrypt") from None
                if data is not None:
                    plain[info.name] = data
                seen.add(info.name)
    except (tarfile.TarError, EOFError) as exc:
        raise BackupError(f"{path} is not a complete backup archive (truncated?): {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"the backup's manifest is malformed: {exc}") from None
    missing = sorted(set(entries) - seen)
    if missing:
        raise BackupError(f"{path} is truncated: members missing: {', '.join(missing)}")
    return Archive(path, manifest, plain)


def _read_member(reader: IO[bytes], *, keep: bool) -> tuple[int, str, bytes | None]:
    digest, size, parts = hashlib.sha256(), 0, []
    while chunk := reader.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if keep:
            parts.append(chunk)
    return size, digest.hexdigest(), b"".join(parts) if keep else None


def _member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        info = tar.getmember(name)
    except KeyError:
        raise BackupError(f"not an appliance backup: it has no {name}") from None
    if not info.isfile() or info.size > _MAX_META:
        raise BackupError(f"not an appliance backup: {name} is not a small file")
    reader = tar.extractfile(info)
    assert reader is not None
    data = reader.read()
    if len(data) != info.size:
        raise BackupError(f"the archive is truncated inside {name}")
    return data


def _json_member(tar: tarfile.TarFile, name: str) -> dict[str, Any]:
    try:
        value = json.loads(_member_bytes(tar, name))
    except ValueError:
        raise BackupError(f"not an appliance backup: {name} is not JSON") from None
    if not isinstance(value, dict):
        raise BackupError(f"not an appliance backup: {name} is not a JSON object")
    return value


def _check_header(header: Mapping[str, Any]) -> None:
    if header.get("format") != FORMAT:
        raise BackupError(f"not an appliance backup (format {header.get('format')!r})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BackupError(f"the backup's format version {version!r} is not valid")
    if version > VERSION:
        raise BackupError(
            f"the backup has format version {version}, newer than this appliance reads "
            f"(version {VERSION}); restore it with a newer appliance"
        )


__all__ = [
    "FORMAT",
    "VERSION",
    "Archive",
    "BackupError",
    "Member",
    "Secret",
    "Written",
    "open_archive",
    "read_facts",
    "write_archive",
]
