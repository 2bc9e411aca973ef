"""The rollout REST API on a real hub with API keys on: publishing with curl, and every
kind of bad input answered 4xx with JSON naming the problem, never a 500.

Uploads go through the real curl binary, as operators send them (``curl -F``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.security.keys import hash_key
from tests.conftest import DEFAULT_MODELS, DaemonProcess
from tests.hub.conftest import enroll_direct, fresh_database, hub
from tests.hub.rollout_parts import publish, setting

pytestmark = pytest.mark.timeout(120)

ADMIN = "apk_rollout-admin-key-0123456789abcdef0123"
READER = "apk_rollout-read-key-0123456789abcdef01234"
LIMIT = 1 << 20  # rollout.max_upload_bytes for these tests
CURL = shutil.which("curl")
JUNK = "multipart/form-data; boundary=zz"  # a body that is not what it says


@dataclass
class Hub:
    proc: DaemonProcess
    env: dict[str, str]
    tmp: Path
    tokens: dict[str, str]

    @property
    def url(self) -> str:
        return self.proc.url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hub]:
    """One hub per backend for the module, with an admin and a read key."""
    if CURL is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    tmp = tmp_path_factory.mktemp("rollout-api")
    if request.param == "sqlite":
        yield from _running(tmp, None)
        return
    with fresh_database(request.getfixturevalue("postgres_server")) as url:
        yield from _running(tmp, url)


def _running(tmp: Path, storage_url: str | None) -> Iterator[Hub]:
    keys = tmp / "hub-keys"
    keys.write_text(f"ops admin {hash_key(ADMIN)}\nwall read {hash_key(READER)}\n")
    storage, env = setting(tmp, storage_url)
    env.update(
        APPLIANCE_HUB_SECURITY__AUTH="on",
        APPLIANCE_HUB_SECURITY__KEYS_FILE=str(keys),
        APPLIANCE_HUB_ROLLOUT__MAX_UPLOAD_BYTES=str(LIMIT),
    )
    tokens = {d: enroll_direct(storage, d) for d in ("dev-a", "dev-b")}
    with hub(storage, env=env) as proc:
        yield Hub(proc, env, tmp, tokens)


def curl(url: str, *args: str, key: str | None = ADMIN) -> tuple[int, Any]:
    """Run curl; (status, the JSON answer)."""
    assert CURL is not None
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    result = subprocess.run(
        [CURL, "-sS", "-o", "-", "-w", "\n%{http_code}", *auth, *args, url],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), json.loads(body) if body else None


def call(
    url: str, body: Any = None, *, method: str = "POST", key: str | None = ADMIN
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def model_dir(dest: Path, version: str, extra: bytes = b"") -> Path:
    """sensor-anomaly as a model directory of another version (``extra``: a file beside)."""
    shutil.copytree(DEFAULT_MODELS / "sensor-anomaly", dest)
    manifest = dest / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('version = "1"', f'version = "{version}"'))
    if extra:
        (dest / "vocab.bin").write_bytes(extra)
    return dest


def files_of(path: Path) -> list[str]:
    return [arg for p in sorted(path.iterdir()) for arg in ("-F", f"file=@{p}")]


def test_publish_a_directory_with_curl_is_what_the_cli_publishes(running: Hub) -> None:
    v7 = model_dir(running.tmp / "v7", "7", extra=b"tokenizer " * 1000)
    code, artifact = curl(running.url + "/api/v1/artifacts", *files_of(v7))
    assert code == 201, artifact
    assert (artifact["name"], artifact["version"], artifact["kind"]) == (
        "sensor-anomaly",
        "7",
        "model",
    )
    by_path = {f["path"]: f for f in artifact["files"]}
    assert set(by_path) == {"manifest.toml", "model.onnx", "vocab.bin"}
    for name, f in by_path.items():
        data = (v7 / name).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["size"] == len(data)
    assert artifact["size"] == sum(f["size"] for f in artifact["files"])
    # The same directory through `appliance hub publish` is the same artifact, stored once.
    assert publish(running.env, v7) == artifact["id"]
    code, listing = curl(running.url + "/api/v1/artifacts", key=READER)
    assert code == 200 and [a["id"] for a in listing["artifacts"]].count(artifact["id"]) == 1
    # Devices fetch each file by its sha256, as uploaded.
    blob = by_path["vocab.bin"]["sha256"]
    request = urllib.request.Request(
        f"{running.url}/api/v1/artifacts/blobs/{blob}",
        headers={"Authorization": f"Bearer {running.tokens['dev-a']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.read() == (v7 / "vocab.bin").read_bytes()
    # Publishing it again answers the same record; nothing is left in the staging area.
    again = curl(running.url + "/api/v1/artifacts", *files_of(v7))
    assert again[0] == 201 and again[1]["id"] == artifact["id"]
    assert not list((running.tmp / "artifacts" / "uploads").iterdir())


def test_publish_one_model_file_with_curl(running: Hub) -> None:
    model = DEFAULT_MODELS / "sensor-anomaly" / "model.onnx"
    args = ["-F", f"file=@{model}", "-F", "name=sensor-anomaly", "-F", "version=8"]
    code, artifact = curl(running.url + "/api/v1/artifacts", *args)
    assert code == 201, artifact
    assert [f["path"] for f in artifact["files"]] == ["manifest.toml", "model.onnx"]
    cli = subprocess.run(  # the CLI, from the same file: the same artifact
        [*_hub_cmd(), "publish", str(model), "--name", "sensor-anomaly", "--version", "8"],
        capture_output=True,
        text=True,
        env=running.env,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == artifact["id"]


def test_publish_a_configuration_fragment_with_curl(running: Hub) -> None:
    fragment = running.tmp / "fragment.toml"
    fragment.write_text('[logging]\nlevel = "debug"\n\n[alerts]\nlatency_high_threshold = 900\n')
    args = ["-F", f"fragment=@{fragment}", "-F", "name=quiet-logs", "-F", "version=3"]
    code, artifact = curl(running.url + "/api/v1/artifacts", *args)
    assert code == 201, artifact
    assert (artifact["kind"], artifact["name"], artifact["version"]) == (
        "config",
        "quiet-logs",
        "3",
    )
    assert [f["path"] for f in artifact["files"]] == ["fragment.toml"]
    assert artifact["files"][0]["sha256"] == hashlib.sha256(fragment.read_bytes()).hexdigest()
    cli = subprocess.run(  # the CLI, from the same file: the same artifact
        [
            *_hub_cmd(),
            "publish",
            "--fragment",
            str(fragment),
            "--name",
            "quiet-logs",
            "--version",
            "3",
        ],
        capture_output=True,
        text=True,
        env=running.env,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == artifact["id"]
    # What may not change remotely is refused here as on the command line, naming the key.
    fragment.write_text('[hub]\nurl = "http://elsewhere:9000"\n')
    code, answer = curl(running.url + "/api/v1/artifacts", "-F", f"fragment=@{fragment}")
    assert code == 400 and "[hub] may not change remotely" in answer["error"], answer
    assert str(running.tmp) not in answer["error"], "no hub paths in the answer"
    model = DEFAULT_MODELS / "sensor-anomaly" / "model.onnx"
    code, answer = curl(
        running.url + "/api/v1/artifacts", "-F", f"fragment=@{fragment}", "-F", f"file=@{model}"
    )
    assert code == 400 and "alone" in answer["error"], answer
    assert not list((running.tmp / "artifacts" / "uploads").iterdir())


def _hub_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "appliance", "hub"]


def test_a_large_upload_streams_to_disk(tmp_path: Path) -> None:
    """48 MiB sent chunked (no Content-Length): published, and the hub's peak memory grows
    by far less than the upload; past the limit, refused as soon as it is crossed."""
    storage, env = setting(tmp_path)
    big = model_dir(tmp_path / "big", "9", extra=bytes(range(256)) * (48 << 12))
    chunked = ["-H", "Transfer-Encoding: chunked", *files_of(big)]
    with hub(storage, env=env) as proc:
        before = _peak_rss(proc.proc.pid)
        code, artifact = curl(proc.url + "/api/v1/artifacts", *chunked, key=None)
        assert code == 201, artifact
        grown = _peak_rss(proc.proc.pid) - before
        vocab = next(f for f in artifact["files"] if f["path"] == "vocab.bin")
        assert vocab["size"] == 48 << 20
        assert vocab["sha256"] == hashlib.sha256((big / "vocab.bin").read_bytes()).hexdigest()
        assert grown < 16 << 20, f"the hub's peak RSS grew by {grown} bytes"
    env["APPLIANCE_HUB_ROLLOUT__MAX_UPLOAD_BYTES"] = str(8 << 20)
    with hub(storage, env=env) as proc:
        code, answer = curl(proc.url + "/api/v1/artifacts", *chunked, key=None)
        assert code == 413 and "rollout.max_upload_bytes" in answer["error"], answer
        assert proc.proc.poll() is None
    assert not list((tmp_path / "artifacts" / "uploads").iterdir())


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_bad_rollout_requests_are_4xx_naming_the_problem(running: Hub, tmp_path: Path) -> None:
    url = running.url
    v3 = model_dir(tmp_path / "v3", "3")
    code, artifact = curl(url + "/api/v1/artifacts", *files_of(v3))
    assert code == 201, artifact
    art = artifact["id"]
    ok = {"artifact": art, "target": {"devices": ["dev-a"]}}
    # One rollout that finishes at once (its devices never came online: skipped), one that
    # stays running (waiting for them).
    code, done = call(url + "/api/v1/rollouts", {**ok, "target": {"all": True}, "offline": "skip"})
    assert code == 201 and done["state"] == "done", done
    code, live = call(url + "/api/v1/rollouts", ok)
    assert code == 201 and live["state"] == "running", live

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"GGUF and not onnx")
    bad_toml = tmp_path / "bad"
    bad_toml.mkdir()
    (bad_toml / "manifest.toml").write_text("name = [unclosed")
    (bad_toml / "model.onnx").write_bytes((v3 / "model.onnx").read_bytes())
    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(v3 / "manifest.toml", missing / "manifest.toml")
    other = model_dir(tmp_path / "other3", "3", extra=b"different content")
    too_big = tmp_path / "too-big.onnx"
    too_big.write_bytes(b"\x08" + b"\0" * LIMIT)
    rollouts = url + "/api/v1/rollouts"
    posts: list[tuple[str, Any, str | None, int, str]] = [
        (rollouts, b"{not json", ADMIN, 400, "not JSON"),
        (rollouts, b"[1, 2]", ADMIN, 400, "body"),
        (rollouts, {**ok, "artifact": "nope:1"}, ADMIN, 404, "no artifact 'nope:1'"),
        (rollouts, {**ok, "artifact": ""}, ADMIN, 400, "artifact"),
        (rollouts, {**ok, "waves": ["0"]}, ADMIN, 400, "at least one device"),
        (rollouts, {**ok, "waves": ["150%"]}, ADMIN, 400, "'150%'"),
        (rollouts, {**ok, "waves": ["abc"]}, ADMIN, 400, "'abc'"),
        (rollouts, {**ok, "waves": []}, ADMIN, 400, "waves"),
        (rollouts, {**ok, "waves": "1,2"}, ADMIN, 400, "waves"),
        (rollouts, {**ok, "waves": [5]}, ADMIN, 400, "waves.0"),
        (rollouts, {**ok, "soak": -1}, ADMIN, 400, "soak"),
        (rollouts, {**ok, "soak": "abc"}, ADMIN, 400, "soak"),
        (rollouts, {**ok, "soak": 1e12}, ADMIN, 400, "soak"),
        (rollouts, {**ok, "max_failures": -1}, ADMIN, 400, "max_failures"),
        (rollouts, {**ok, "max_failures": 1.5}, ADMIN, 400, "max_failures"),
        (rollouts, {**ok, "max_failures": "two"}, ADMIN, 400, "max_failures"),
        (rollouts, {**ok, "offline": "maybe"}, ADMIN, 400, "offline"),
        (rollouts, {**ok, "target": {"devices": ["ghost"]}}, ADMIN, 400, "ghost"),
        (rollouts, {**ok, "target": {"devices": ["Not An Id"]}}, ADMIN, 400, "not a device id"),
        (rollouts, {**ok, "target": {"tag": "nobody"}}, ADMIN, 400, "no enrolled device"),
        (rollouts, {**ok, "target": {"tag": "UPPER"}}, ADMIN, 400, "target.tag"),
        (rollouts, {**ok, "target": {}}, ADMIN, 400, "exactly one"),
        (rollouts, {**ok, "target": {"all": True, "tag": "x"}}, ADMIN, 400, "exactly one"),
        (rollouts, {**ok, "colour": "red"}, ADMIN, 400, "colour"),
        (rollouts, ok, ADMIN, 400, "already rolling out"),
        (rollouts, ok, READER, 403, "scope"),
        (rollouts, ok, None, 401, "key"),
        (f"{rollouts}/r-nope/halt", b"", ADMIN, 404, "no rollout 'r-nope'"),
        (f"{rollouts}/{live['id']}/explode", b"", ADMIN, 404, "no action 'explode'"),
        (f"{rollouts}/{live['id']}/halt", b"", READER, 403, "scope"),
        (f"{rollouts}/{done['id']}/halt", b"", ADMIN, 400, "is done, not running"),
        (f"{rollouts}/{done['id']}/resume", b"", ADMIN, 400, "only a halt can resume"),
        (f"{rollouts}/{live['id']}", b"", ADMIN, 405, "not allowed"),
        (f"{url}/api/v1/devices/ghost/tags", {"add": ["x"]}, ADMIN, 404, "no device 'ghost'"),
        (f"{url}/api/v1/devices/dev-a/tags", {"add": ["UPPER"]}, ADMIN, 400, "add"),
        (f"{url}/api/v1/devices/dev-a/tags", {"add": "x"}, ADMIN, 400, "add"),
        (f"{url}/api/v1/devices/dev-a/tags", {"paint": []}, ADMIN, 400, "body"),
        (f"{url}/api/v1/devices/dev-a/tags", b"nope", ADMIN, 400, "not JSON"),
        (f"{url}/api/v1/devices/dev-a/tags", {"add": ["x"]}, READER, 403, "scope"),
        (url + "/api/v1/artifacts", {"name": "x"}, ADMIN, 415, "multipart/form-data"),
    ]
    gets: list[tuple[str, str | None, int, str]] = [
        (f"{rollouts}/r-nope", READER, 404, "no rollout 'r-nope'"),
        (rollouts, None, 401, "key"),
        (f"{url}/api/v1/devices/ghost/rollouts", READER, 404, "no device 'ghost'"),
        (f"{url}/api/v1/artifacts/blobs/{'0' * 64}", None, 401, "device token"),
        (f"{url}/api/v1/artifacts/blobs/xyz", running.tokens["dev-a"], 400, "not a sha256"),
        (f"{url}/api/v1/artifacts/blobs/{'0' * 64}", running.tokens["dev-a"], 404, "no blob"),
        (f"{url}/api/v1/backups/ghost", ADMIN, 404, "no device 'ghost'"),
        (f"{url}/api/v1/backups/dev-a", ADMIN, 404, "keeps no backup"),
        (f"{url}/api/v1/backups/dev-a", READER, 403, "scope"),
    ]
    artifacts = url + "/api/v1/artifacts"
    uploads: list[tuple[list[str], str | None, int, str]] = [
        (["-F", f"file=@{text}", "-F", "version=2"], ADMIN, 400, "not a model file"),
        (["-F", f"file=@{fake}", "-F", "version=2"], ADMIN, 400, "not an ONNX model"),
        (["-F", f"file=@{v3 / 'model.onnx'}"], ADMIN, 400, "version"),
        (["-F", f"file=@{v3 / 'model.onnx'}", "-F", "version=a b"], ADMIN, 400, "version 'a b'"),
        (["-F", "version=2"], ADMIN, 400, "no file part"),
        (["-F", f"model=@{v3 / 'model.onnx'}"], ADMIN, 400, "unknown form field 'model'"),
        ([*files_of(bad_toml)], ADMIN, 400, "manifest"),
        ([*files_of(missing)], ADMIN, 400, "not in the upload"),
        (["-F", f"file=@{v3 / 'model.onnx'}", "-F", f"file=@{text}"], ADMIN, 400, "manifest"),
        ([*files_of(other)], ADMIN, 409, "already published with other content"),
        (["-F", f"file=@{too_big}", "-F", "version=2"], ADMIN, 413, "max_upload_bytes"),
        (["--data-binary", "@" + str(text)], ADMIN, 415, "multipart/form-data"),
        (["-H", f"Content-Type: {JUNK}", "--data-binary", "junk"], ADMIN, 400, ""),
        ([*files_of(v3)], READER, 403, "scope"),
        ([*files_of(v3)], None, 401, "key"),
    ]
    results = []
    for where, body, key, status, problem in posts:
        results.append((where, status, problem, *call(where, body, key=key)))
    for where, key, status, problem in gets:
        results.append((where, status, problem, *call(where, method="GET", key=key)))
    for args, key, status, problem in uploads:
        results.append((" ".join(args), status, problem, *curl(artifacts, *args, key=key)))
    wrong = [
        (what, want, got, answer)
        for what, want, problem, got, answer in results
        if got != want or not isinstance(answer, dict) or problem not in answer.get("error", "")
    ]
    assert not wrong, "\n".join(map(repr, wrong))
    # The hub still serves, logged no unhandled error, and changed nothing it refused.
    assert call(url + "/health", method="GET", key=READER)[0] == 200
    code, listing = call(rollouts, method="GET", key=READER)
    assert code == 200 and {r["id"] for r in listing["rollouts"]} == {done["id"], live["id"]}
    assert call(f"{rollouts}/{live['id']}", method="GET", key=READER)[1]["state"] == "running"
    assert not [line for line in running.proc.log if "unhandled" in line or "Traceback" in line]
    assert not list((running.tmp / "artifacts" / "uploads").iterdir())
    # The good calls work after all that.
    code, halted = call(f"{rollouts}/{live['id']}/halt", b"")
    assert code == 200 and halted["state"] == "halted"
    code, tags = call(f"{url}/api/v1/devices/dev-a/tags", {"add": ["north"]})
    assert code == 200 and tags["tags"] == ["north"]
    code, mine = call(f"{url}/api/v1/devices/dev-a/rollouts", method="GET", key=READER)
    assert code == 200 and mine["tags"] == ["north"]
    assert [r["rollout"] for r in mine["rollouts"]] == [live["id"], done["id"]]
    assert mine["rollouts"][0]["version"] == "3" and mine["rollouts"][0]["state"] == "wanted"
