"""The model repository: manifests, direct model files, and how broken models are reported.

Repositories are built in ``tmp_path`` from copies of the project's default model. Every
kind of broken model must become a failed model whose reason names the problem, while the
good model keeps serving; and no model name taken from a URL may ever reach the filesystem.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from yarl import URL

from appliance.core import repository
from appliance.core.repository import ModelSpec, collect, read_manifest, scan, spec_for_file
from appliance.server import Server
from tests.conftest import DEFAULT_MODELS, ROOT, base_url, make_config, serving

GOOD = "sensor-anomaly"
GOOD_DIR = DEFAULT_MODELS / GOOD
GOOD_FILE = GOOD_DIR / "model.onnx"

Json = dict[str, Any]

# Without llama-cpp-python a GGUF model still fails, for a different (named) reason.
GGUF_REASON = (
    "llama.cpp cannot load" if importlib.util.find_spec("llama_cpp") else "backend is not installed"
)


def manifest(name: str, *, runtime: str = "onnx", file: str = "model.onnx", extra: str = "") -> str:
    return f'name = "{name}"\nruntime = "{runtime}"\nfile = "{file}"\n{extra}'


def junk(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def gguf_with_absurd_counts() -> bytes:
    """A GGUF header (magic, version 3) claiming 2**40 tensors and metadata keys, then junk."""
    return b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40) + junk(2048, 3)


@dataclass(frozen=True)
class Broken:
    """One broken model directory: what to write, and what its failure reason must name."""

    manifest: Callable[[str], str]  # receives the directory name
    files: Callable[[Path], dict[str, bytes | Path]]  # receives the directory; Path = symlink
    reason: tuple[str, ...]


def _no_files(_: Path) -> dict[str, bytes | Path]:
    return {}


def _good_copy(_: Path) -> dict[str, bytes | Path]:
    return {"model.onnx": GOOD_FILE.read_bytes()}


BROKEN: dict[str, Broken] = {
    "missing-file": Broken(manifest, _no_files, ("model.onnx", "does not exist")),
    "bad-checksum": Broken(
        lambda n: manifest(n, extra=f'sha256 = "{"0" * 64}"\n'),
        _good_copy,
        ("checksum mismatch", "model.onnx", "0" * 64),
    ),
    "corrupt-onnx": Broken(
        manifest, lambda _: {"model.onnx": junk(4096, 1)}, ("onnxruntime cannot load", "model.onnx")
    ),
    "empty-onnx": Broken(
        manifest, lambda _: {"model.onnx": b""}, ("onnxruntime cannot load", "model.onnx")
    ),
    "corrupt-gguf": Broken(
        lambda n: manifest(n, runtime="gguf", file="model.gguf"),
        lambda _: {"model.gguf": junk(4096, 2)},
        (GGUF_REASON, "model.gguf"),
    ),
    "absurd-gguf": Broken(
        lambda n: manifest(n, runtime="gguf", file="model.gguf"),
        lambda _: {"model.gguf": gguf_with_absurd_counts()},
        (GGUF_REASON, "model.gguf"),
    ),
    "onnx-as-gguf": Broken(
        lambda n: manifest(n, runtime="gguf"), _good_copy, (GGUF_REASON, "model.onnx")
    ),
    "unknown-key": Broken(
        lambda n: manifest(n, extra='colour = "red"\n'),
        _good_copy,
        ("invalid manifest", "colour"),
    ),
    "bad-name": Broken(
        lambda _: manifest("../../etc"), _good_copy, ("invalid manifest", "name", "../../etc")
    ),
    "unknown-runtime": Broken(
        lambda n: manifest(n, runtime="tflite"),
        _good_copy,
        ("unknown runtime 'tflite'", "onnx", "gguf"),
    ),
    "bad-option": Broken(
        lambda n: manifest(n, extra="[options]\nthreads = 0\n"),
        _good_copy,
        ("invalid options", "threads", "0"),
    ),
    "unknown-option": Broken(
        lambda n: manifest(n, extra="[options]\nturbo = true\n"),
        _good_copy,
        ("invalid options", "turbo"),
    ),
    "bad-toml": Broken(
        lambda n: f'name = "{n}"\nruntime = \n', _good_copy, ("cannot read manifest",)
    ),
    "dotdot-file": Broken(
        lambda n: manifest(n, file=f"../{GOOD}/model.onnx"),
        _no_files,
        ("points outside", f"../{GOOD}/model.onnx"),
    ),
    "dotdot-outside-repo": Broken(
        lambda n: manifest(n, file="../../outside.onnx"),
        _no_files,
        ("points outside", "../../outside.onnx"),
    ),
    "absolute-file": Broken(
        lambda n: manifest(n, file="@OUTSIDE@"), _no_files, ("points outside", "outside.onnx")
    ),
    "symlink-outside": Broken(
        manifest,
        lambda d: {"model.onnx": d.parent.parent / "outside.onnx"},
        ("points outside", "model.onnx"),
    ),
}


def build_repo(root: Path, broken: list[str]) -> Path:
    """``root/models`` with the good model and the named broken ones; ``root/outside.onnx``
    is a valid model outside the repository that no manifest may reach."""
    outside = root / "outside.onnx"
    shutil.copyfile(GOOD_FILE, outside)
    repo = root / "models"
    shutil.copytree(GOOD_DIR, repo / GOOD)
    for name in broken:
        case = BROKEN[name]
        directory = repo / name
        directory.mkdir()
        text = case.manifest(name).replace("@OUTSIDE@", str(outside))
        (directory / "manifest.toml").write_text(text, encoding="utf-8")
        for filename, content in case.files(directory).items():
            if isinstance(content, Path):
                (directory / filename).symlink_to(content)
            else:
                (directory / filename).write_bytes(content)
    return repo


def windows(count: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Plausible readings: 21 degC, 45 %RH, 0.2 g, with a little noise."""
    rng = np.random.default_rng(count)
    base = np.array([21.0, 45.0, 0.2], dtype=np.float32)
    noise = rng.normal(0.0, [0.05, 0.2, 0.01], size=(count, 32, 3))
    return (base + noise).astype(np.float32)


async def infer_ok(http: aiohttp.ClientSession, url: str, model: str = GOOD) -> Json:
    data = windows(2)
    body = {
        "inputs": [
            {"name": "window", "datatype": "FP32", "shape": list(data.shape), "data": data.tolist()}
        ]
    }
    async with http.post(f"{url}/v2/models/{model}/infer", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer: Json = await resp.json()
    assert [o["name"] for o in answer["outputs"]] == ["score", "is_anomaly"]
    return answer


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, Json]:
    async with http.get(url + "/health") as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------- reading, no server


def test_default_model_manifest_is_valid() -> None:
    spec = read_manifest(GOOD_DIR / "manifest.toml")
    assert spec.problem is None
    assert spec.name == GOOD
    assert spec.runtime == "onnx"
    assert spec.path == GOOD_FILE.resolve()
    assert spec.sha256 is not None
    repository.verify_file(spec)  # the shipped checksum matches the shipped file


def test_scan_ignores_directories_without_manifest(tmp_path: Path) -> None:
    repo = build_repo(tmp_path, [])
    (repo / "notes").mkdir()
    (repo / "notes" / "README.md").write_text("not a model\n", encoding="utf-8")
    (repo / "stray.onnx").write_bytes(GOOD_FILE.read_bytes())
    assert [s.name for s in scan(repo)] == [GOOD]


def test_scan_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert scan(tmp_path / "nowhere") == []


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifests_are_reported_not_raised(tmp_path: Path, case: str) -> None:
    """Problems found by reading alone are reported by ``collect``; the rest load-time."""
    repo = build_repo(tmp_path, [case])
    specs = {s.name: s for s in collect(repo, [])}
    assert specs[GOOD].problem is None
    assert set(specs) == {GOOD, case}
    spec = specs[case]
    if spec.problem is None:
        # Found only when loading: the spec must at least point inside its directory.
        assert spec.path.is_relative_to((repo / case).resolve())
    else:
        for fragment in BROKEN[case].reason:
            assert fragment in spec.problem


def test_checksum_is_compared_case_insensitively(tmp_path: Path) -> None:
    repo = build_repo(tmp_path, [])
    spec = read_manifest(repo / GOOD / "manifest.toml")
    assert spec.sha256 is not None
    text = (repo / GOOD / "manifest.toml").read_text(encoding="utf-8")
    (repo / GOOD / "manifest.toml").write_text(
        text.replace(spec.sha256, spec.sha256.upper()), encoding="utf-8"
    )
    repository.verify_file(read_manifest(repo / GOOD / "manifest.toml"))


def test_symlink_inside_the_directory_is_allowed(tmp_path: Path) -> None:
    repo = build_repo(tmp_path, [])
    directory = repo / "linked"
    directory.mkdir()
    shutil.copyfile(GOOD_FILE, directory / "weights-v1.onnx")
    (directory / "model.onnx").symlink_to("weights-v1.onnx")
    (directory / "manifest.toml").write_text(manifest("linked"), encoding="utf-8")
    spec = read_manifest(directory / "manifest.toml")
    assert spec.problem is None
    assert spec.path == (directory / "weights-v1.onnx").resolve()


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("sensor-anomaly", True),
        ("Qwen2.5-0.5B_q4", True),
        ("a", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("..", False),
        (".hidden", False),
        ("../etc", False),
        ("a/b", False),
        ("a\\b", False),
        ("a b", False),
        ("-flag", False),
        ("a\0b", False),
        ("é", False),
        ("a\n", False),
    ],
)
def test_valid_names_can_never_be_paths(name: str, valid: bool) -> None:
    assert repository.valid_name(name) is valid


def test_spec_for_file_is_named_after_the_stem(tmp_path: Path) -> None:
    path = tmp_path / "Greenhouse_Sensor.v2.onnx"
    shutil.copyfile(GOOD_FILE, path)
    spec = spec_for_file(path)
    assert spec.problem is None
    assert (spec.name, spec.runtime, spec.version) == ("Greenhouse_Sensor.v2", "onnx", "1")
    assert spec_for_file(tmp_path / "story.GGUF").runtime == "gguf"


@pytest.mark.parametrize(
    ("filename", "fragment"),
    [
        ("model.tflite", "unknown model file type '.tflite'"),
        ("my model.onnx", "'my model'"),
        ("-x.onnx", "not a valid model name"),
        (".onnx", "unknown model file type ''"),
    ],
)
def test_spec_for_a_bad_file_is_a_problem(tmp_path: Path, filename: str, fragment: str) -> None:
    spec = spec_for_file(tmp_path / filename)
    assert spec.problem is not None
    assert fragment in spec.problem
    assert repository.valid_name(spec.name)  # even the failure gets a routable name


def test_duplicate_names_fail_the_later_one(tmp_path: Path) -> None:
    repo = build_repo(tmp_path, [])
    for directory in ("a-first", "b-second"):
        (repo / directory).mkdir()
        shutil.copyfile(GOOD_FILE, repo / directory / "model.onnx")
        (repo / directory / "manifest.toml").write_text(manifest("twin"), encoding="utf-8")
    specs = {s.source.parent.name: s for s in collect(repo, [])}
    assert specs["a-first"].problem is None
    assert specs["a-first"].name == "twin"
    problem = specs["b-second"].problem
    assert problem is not None
    assert "'twin' is already used by" in problem
    assert "a-first" in problem
    names = [s.name for s in specs.values()]
    assert len(set(names)) == len(names), "every model needs a name of its own"
    assert all(repository.valid_name(n) for n in names)


def test_the_same_file_given_three_times(tmp_path: Path) -> None:
    path = tmp_path / "probe.onnx"
    shutil.copyfile(GOOD_FILE, path)
    taken = tmp_path / "probe.duplicate-1.onnx"  # a real model already using a likely name
    shutil.copyfile(GOOD_FILE, taken)
    specs = collect(None, [path, path, taken, path])
    names = [s.name for s in specs]
    assert names[0] == "probe"
    assert names[2] == "probe.duplicate-1"
    assert specs[0].problem is None
    assert specs[2].problem is None
    assert len(set(names)) == 4
    for spec in (specs[1], specs[3]):
        assert spec.problem is not None
        assert "'probe' is already used by" in spec.problem
        assert repository.valid_name(spec.name)


# ---------------------------------------------------------------------- served repos


@pytest.fixture
async def broken_repo(tmp_path: Path) -> AsyncIterator[tuple[Server, Path]]:
    repo = build_repo(tmp_path, sorted(BROKEN))
    async with serving(make_config(models={"dir": repo})) as server:
        yield server, repo


async def test_good_model_serves_beside_broken_ones(
    broken_repo: tuple[Server, Path], http: aiohttp.ClientSession
) -> None:
    server, _ = broken_repo
    url = base_url(server)
    status, body = await health(http, url)
    assert status == 200
    assert body["status"] == "degraded"
    assert body["models"][GOOD] == {"state": "ready", "runtime": "onnx", "version": "1"}
    assert set(body["models"]) == {GOOD, *BROKEN}
    assert all(m["state"] == "failed" for name, m in body["models"].items() if name != GOOD)
    await infer_ok(http, url)
    async with http.get(url + "/v2/health/ready") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_each_broken_model_is_failed_with_its_reason(
    broken_repo: tuple[Server, Path], http: aiohttp.ClientSession, case: str
) -> None:
    server, _ = broken_repo
    url = base_url(server)
    _, body = await health(http, url)
    entry = body["models"][case]
    assert entry["state"] == "failed"
    for fragment in BROKEN[case].reason:
        assert fragment in entry["error"]

    async with http.get(f"{url}/v2/models/{case}/ready") as resp:
        assert resp.status == 400  # not ready: 4xx, as Triton answers
        ready = await resp.json()
    assert entry["error"] in ready["error"]

    async with http.get(f"{url}/v2/models/{case}") as resp:
        assert resp.status == 200
        meta = await resp.json()
    # Never loaded, so nothing about the file it pointed at is known.
    assert (meta["state"], meta["inputs"], meta["outputs"]) == ("failed", [], [])
    assert meta["error"] == entry["error"]

    async with http.post(
        f"{url}/v2/models/{case}/infer",
        json={
            "inputs": [
                {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": [0.0] * 96}
            ]
        },
    ) as resp:
        assert resp.status == 503
    await infer_ok(http, url)


async def test_failed_models_are_not_listed_as_openai_models(
    broken_repo: tuple[Server, Path], http: aiohttp.ClientSession
) -> None:
    server, _ = broken_repo
    async with http.get(base_url(server) + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert [m["id"] for m in body["data"]] == [GOOD]


async def test_only_broken_models_is_unavailable(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    repo = build_repo(tmp_path, ["missing-file", "bad-checksum"])
    shutil.rmtree(repo / GOOD)
    async with serving(make_config(models={"dir": repo})) as server:
        url = base_url(server)
        status, body = await health(http, url)
        assert status == 503
        assert body["status"] == "unavailable"
        assert set(body["models"]) == {"missing-file", "bad-checksum"}
        async with http.get(url + "/v2/health/ready") as resp:
            assert resp.status == 503
            assert "no model is ready" in (await resp.json())["error"]


async def test_duplicate_names_keep_the_first_serving(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    repo = build_repo(tmp_path, [])
    for directory in ("a-first", "b-second"):
        (repo / directory).mkdir()
        shutil.copyfile(GOOD_FILE, repo / directory / "model.onnx")
        (repo / directory / "manifest.toml").write_text(manifest("twin"), encoding="utf-8")
    async with serving(make_config(models={"dir": repo})) as server:
        url = base_url(server)
        status, body = await health(http, url)
        assert status == 200
        assert body["status"] == "degraded"
        assert body["models"]["twin"]["state"] == "ready"
        failed = [m for m in body["models"].values() if m["state"] == "failed"]
        assert len(failed) == 1
        assert "'twin' is already used by" in failed[0]["error"]
        assert "a-first" in failed[0]["error"]
        await infer_ok(http, url, "twin")
        await infer_ok(http, url)


# -------------------------------------------------------------------- direct files


async def test_model_files_are_served_under_their_stem(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    served = tmp_path / "greenhouse-3.onnx"
    shutil.copyfile(GOOD_FILE, served)
    config = make_config(models={"files": [served]})
    assert config.models.dir is None  # files alone: no repository, not even the default
    async with serving(config) as server:
        url = base_url(server)
        status, body = await health(http, url)
        assert (status, body["status"]) == (200, "ok")
        assert set(body["models"]) == {"greenhouse-3"}
        async with http.get(url + "/v2/models/greenhouse-3") as resp:
            meta = await resp.json()
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["versions"] == ["1"]
        assert meta["inputs"][0]["name"] == "window"
        await infer_ok(http, url, "greenhouse-3")


async def test_bad_model_files_fail_beside_a_repository(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    repo = build_repo(tmp_path, [])
    files = tmp_path / "files"
    files.mkdir()
    shutil.copyfile(GOOD_FILE, files / f"{GOOD}.onnx")  # clashes with the repository's model
    shutil.copyfile(GOOD_FILE, files / "weights.tflite")
    (files / "garbage.onnx").write_bytes(junk(1000, 4))
    config = make_config(
        models={
            "dir": repo,
            "files": [
                files / f"{GOOD}.onnx",
                files / "weights.tflite",
                files / "garbage.onnx",
                files / "absent.onnx",
            ],
        }
    )
    async with serving(config) as server:
        url = base_url(server)
        _, body = await health(http, url)
        models = body["models"]
        assert models[GOOD]["state"] == "ready"
        assert models["garbage"]["state"] == "failed"
        assert "onnxruntime cannot load garbage.onnx" in models["garbage"]["error"]
        assert models["absent"]["state"] == "failed"
        assert "does not exist" in models["absent"]["error"]
        errors = [m.get("error", "") for m in models.values()]
        assert any("unknown model file type '.tflite'" in e for e in errors)
        assert any(f"'{GOOD}' is already used by" in e for e in errors)
        await infer_ok(http, url)


def test_cli_models_lists_a_model_file(tmp_path: Path) -> None:
    served = tmp_path / "greenhouse-3.onnx"
    shutil.copyfile(GOOD_FILE, served)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "models",
            "--json",
            "--model",
            str(served),
            "--model",
            str(tmp_path / "notes.txt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    rows = json.loads(result.stdout)
    assert result.returncode == 1, "a listed problem makes the command fail"
    assert rows[0]["name"] == "greenhouse-3"
    assert rows[0]["runtime"] == "onnx"
    assert rows[0]["problem"] is None
    assert "unknown model file type '.txt'" in rows[1]["problem"]


# --------------------------------------------------------- URLs never reach the disk

TRAVERSALS = [
    "..%2F..%2Fetc%2Fpasswd",
    "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    f"..%2F{GOOD}",
    f"{GOOD}%2F..%2F{GOOD}",
    f"{GOOD}%2Fmodel.onnx",
    "%2Fetc%2Fpasswd",
    "%2e%2e",
    "..",
    "outside",
    "outside.onnx",
    "model.onnx",
]


@pytest.fixture
async def repo_server(tmp_path: Path) -> AsyncIterator[str]:
    repo = build_repo(tmp_path, [])
    async with serving(make_config(models={"dir": repo})) as server:
        yield base_url(server)


@pytest.mark.parametrize("name", TRAVERSALS)
async def test_model_names_from_urls_never_reach_the_filesystem(
    repo_server: str, http: aiohttp.ClientSession, name: str
) -> None:
    url = repo_server
    for method, path in [
        ("GET", f"/v2/models/{name}"),
        ("GET", f"/v2/models/{name}/ready"),
        ("GET", f"/v2/models/{name}/versions/1"),
        ("POST", f"/v2/models/{name}/infer"),
        ("GET", f"/v1/models/{name}"),
    ]:
        async with http.request(method, URL(url + path, encoded=True), json={"inputs": []}) as resp:
            raw = await resp.read()
            assert resp.status == 404, (method, path, raw)
            assert resp.content_type == "application/json"
        assert b"root:" not in raw
    await infer_ok(http, url)


async def test_raw_dot_segments_do_not_escape_the_routes(
    repo_server: str, http: aiohttp.ClientSession
) -> None:
    for path in [
        "/v2/models/../../etc/passwd",
        f"/v2/models/{GOOD}/../../../etc/passwd",
        f"/v2/models/{GOOD}/model.onnx",
        "/models/sensor-anomaly/model.onnx",
    ]:
        async with http.get(URL(repo_server + path, encoded=True)) as resp:
            raw = await resp.read()
            assert resp.status == 404, (path, raw)
        assert b"root:" not in raw
        assert raw != GOOD_FILE.read_bytes()


def test_spec_names_are_valid_for_every_broken_case(tmp_path: Path) -> None:
    repo = build_repo(tmp_path, sorted(BROKEN))
    specs: list[ModelSpec] = collect(repo, [])
    assert all(repository.valid_name(s.name) for s in specs)
