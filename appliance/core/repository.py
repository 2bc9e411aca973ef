"""The model repository: manifests on disk, turned into validated model specs.

Layout: ``<dir>/<name>/manifest.toml`` naming a model file in the same directory. Files
served directly (``--model path.gguf``) need no manifest. A broken manifest becomes a
failed model with its reason, never a crash, and model files can never resolve outside
their model's directory.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.runtimes import KINDS, SUFFIXES, runtime_class
from appliance.runtimes.base import RuntimeOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

MANIFEST = "manifest.toml"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)


class Manifest(BaseModel):
    """One model's ``manifest.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="Model name clients use.")
    runtime: str = Field(description=f"One of: {', '.join(KINDS)}.")
    file: str = Field(min_length=1, description="Model file, relative to the manifest.")
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    description: str = Field(default="", max_length=500)
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A model the daemon should serve; ``problem`` is set when it cannot be."""

    name: str
    version: str
    runtime: str
    path: Path
    sha256: str | None
    description: str
    options: RuntimeOptions
    source: Path  # the manifest, or the model file itself
    problem: str | None = None
    # The file's modification time (whole seconds) and size when the repository was read,
    # 0 when it cannot be read: stated on the scan's thread, never on the event loop.
    # Not compared: a hot swap goes by what the manifest says, as before.
    created: int = field(default=0, compare=False)
    size: int = field(default=0, compare=False)


def valid_name(name: str) -> bool:
    """Whether ``name`` is a legal model name (so it can never be a path)."""
    # fullmatch: with match, "$" would also accept a name ending in a newline.
    return bool(_NAME_RE.fullmatch(name))


def model_ref(reference: str) -> tuple[str, str | None]:
    """``name`` or ``name:version`` (as the OpenAI ``model`` field may say) → both parts.

    Model names cannot hold ``:``, so the split is never ambiguous.
    """
    name, sep, version = reference.rpartition(":")
    if not sep:
        return reference, None
    return name, version or None


def scan(directory: Path) -> list[ModelSpec]:
    """Every model version under ``directory``, broken ones included with their problem.

    ``<dir>/<name>/manifest.toml`` is one model with one version (the manifest's). Versions
    live in sub-directories named after them: ``<dir>/<name>/<version>/manifest.toml``;
    each manifest's ``version``, when given, must match its directory's name.
    """
    if not directory.is_dir():
        log.warning("model directory %s does not exist", directory)
        return []
    specs = []
    for child in sorted(directory.iterdir()):
        if not child.is_dir():
            continue
        manifest = child / MANIFEST
        if manifest.is_file():
            specs.append(read_manifest(manifest))
            continue
        for sub in sorted(child.iterdir()):
            if sub.is_dir() and (sub / MANIFEST).is_file():
                specs.append(read_manifest(sub / MANIFEST, version_dir=sub.name))
    return specs


def read_manifest(path: Path, *, version_dir: str | None = None) -> ModelSpec:
    """Parse and check one manifest. Never raises for a bad manifest.

    ``version_dir``: the manifest sits in a version directory of that name (the versioned
    layout), which is its version.
    """
    fallback_name = path.parent.name if version_dir is None else path.parent.parent.name
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if version_dir is not None:
            stated = data.setdefault("version", version_dir)
            if stated != version_dir:
                return _broken(
                    fallback_name,
                    path,
                    f"version {stated!r} does not match its directory {version_dir!r}",
                )
        manifest = Manifest.model_validate(data)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return _broken(fallback_name, path, f"cannot read manifest: {exc}")
    except ValidationError as exc:
        return _broken(fallback_name, path, f"invalid manifest: {_first_error(exc)}")
    if manifest.runtime not in KINDS:
        return _broken(
            manifest.name,
            path,
            f"unknown runtime {manifest.runtime!r}; allowed: {', '.join(KINDS)}",
        )
    base = path.parent.resolve()
    model_path = (base / manifest.file).resolve()
    if not model_path.is_relative_to(base):
        return _broken(
            manifest.name, path, f"file {manifest.file!r} points outside the model's directory"
        )
    try:
        options = runtime_class(manifest.runtime).options_model.model_validate(manifest.options)
    except ValidationError as exc:
        return _broken(manifest.name, path, f"invalid options: {_first_error(exc)}")
    return ModelSpec(
        name=manifest.name,
        version=manifest.version,
        runtime=manifest.runtime,
        path=model_path,
        sha256=manifest.sha256.lower() if manifest.sha256 else None,
        description=manifest.description,
        options=options,
        source=path,
    )


def spec_for_file(path: Path) -> ModelSpec:
    """A model served directly from a file, named after it (like ``llama-server -m``)."""
    name = path.stem
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        return _broken(
            name, path, f"unknown model file type {path.suffix!r}; use one of {sorted(SUFFIXES)}"
        )
    if not valid_name(name):
        return _broken(name, path, f"file name {name!r} is not a valid model name")
    return ModelSpec(
        name=name,
        version="1",
        runtime=kind,
        path=path.resolve(),
        sha256=None,
        description=f"{kind.upper()} model served from {path.name}",
        options=runtime_class(kind).options_model(),
        source=path,
    )


def collect(directory: Path | None, files: Iterable[Path]) -> list[ModelSpec]:
    """All specs from a repository directory and direct files; duplicates become failures."""
    specs = scan(directory) if directory is not None else []
    specs.extend(spec_for_file(f) for f in files)
    taken = {spec.name for spec in specs}
    seen: dict[tuple[str, str], ModelSpec] = {}
    result = []
    for spec in specs:
        if (spec.name, spec.version) in seen:
            # The failure needs a name of its own: models are looked up by name, and
            # sharing one would replace the model that serves with the failed duplicate.
            name = _free_name(spec.name, taken)
            taken.add(name)
            other = seen[(spec.name, spec.version)].source
            spec = _replace_problem(
                spec, f"model name {spec.name!r} is already used by {other}", name=name
            )
        seen[(spec.name, spec.version)] = spec
        result.append(_with_file_facts(spec))
    return result


def _with_file_facts(spec: ModelSpec) -> ModelSpec:
    try:
        stat = spec.path.stat()
    except OSError:
        return spec
    return replace(spec, created=int(stat.st_mtime), size=stat.st_size)


def _free_name(base: str, taken: set[str]) -> str:
    """A valid model name derived from ``base`` that is not in ``taken``."""
    n = 1
    while f"{base[:48]}.duplicate-{n}" in taken:
        n += 1
    return f"{base[:48]}.duplicate-{n}"


def verify_file(spec: ModelSpec) -> None:
    """Check the model file exists and matches the manifest's checksum. Raises OSError/ValueError.

    Blocking: reads the whole file; call it off the event loop.
    """
    if not spec.path.is_file():
        raise FileNotFoundError(f"model file {spec.path} does not exist")
    if spec.sha256 is None:
        return
    digest = hashlib.sha256()
    with spec.path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise ValueError(
            f"checksum mismatch for {spec.path.name}: manifest says {spec.sha256}, "
            f"file is {digest.hexdigest()}"
        )


def _broken(name: str, source: Path, problem: str) -> ModelSpec:
    if not valid_name(name):
        name = "invalid-" + hashlib.sha256(str(source).encode()).hexdigest()[:8]
    log.error("model %s (%s): %s", name, source, problem)
    return ModelSpec(
        name=name,
        version="1",
        runtime="unknown",
        path=source,
        sha256=None,
        description="",
        options=RuntimeOptions(),
        source=source,
        problem=problem,
    )


def _replace_problem(spec: ModelSpec, problem: str, *, name: str) -> ModelSpec:
    log.error("model %s (%s): %s", name, spec.source, problem)
    return ModelSpec(**{**spec.__dict__, "name": name, "problem": problem})


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{key} = {err.get('input')!r}: {err['msg']}"
