"""Parts of the rollout tests: model versions built from the real sensor-anomaly and
home-intent (GGUF) models, a hub with its own artifact directory and signing key, devices
as real daemons, steady inference or chat traffic for their canaries, and the CLI calls
that publish, start and watch.

The usual set-up, once::

    storage, env = setting(tmp_path)
    with hub_and_fleet(tmp_path, storage, env, ["dev-a", "dev-b"]) as (proc, devices):
        ...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, DaemonProcess, daemon, start_daemon
from tests.gguf_templates import with_chat_template
from tests.hub.conftest import hub, hub_env

MODEL = ROOT / "models" / "sensor-anomaly"
NORMAL = [21.0, 45.0, 0.6] * 32
LOUD = [21.0, 45.0, 5000.0] * 32  # the "bad" version answers NaN for this
INTENT = ROOT / "models" / "home-intent"
INTENT_FILE = "home-intent-q8_0.gguf"
# A GGUF version that loads and refuses every conversation (its template raises).
REFUSING = "{{ raise_exception('this version refuses every conversation') }}"
CHAT = {
    "model": "home-intent",
    "max_tokens": 6,
    "temperature": 0,
    "messages": [{"role": "user", "content": "turn on the kitchen lights"}],
}


def build_version(
    dest: Path, version: str, *, nan_above: float | None = None, padding: int = 0
) -> Path:
    """A new version of sensor-anomaly in ``dest``: the real graph with its score passed
    through one more node (a different file), or, with ``nan_above``, NaN scores for windows
    holding a reading above it: a version that loads and answers wrong."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(MODEL / "model.onnx"))
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if "score" in n.output)
    graph.node[index].output[0] = "score_raw"

    def const(name: str, value: float) -> Any:
        graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
        return name

    if nan_above is None:
        extra = [helper.make_node("Add", ["score_raw", const("v_zero", 0.0)], ["score"])]
    else:
        extra = [
            helper.make_node("ReduceMax", ["window"], ["v_max"], axes=[1, 2], keepdims=0),
            helper.make_node("Greater", ["v_max", const("v_limit", nan_above)], ["v_big"]),
            helper.make_node(
                "Where", ["v_big", const("v_nan", float("nan")), "score_raw"], ["score"]
            ),
        ]
    for offset, node in enumerate(extra, 1):
        graph.node.insert(index + offset, node)
    onnx.checker.check_model(model)
    dest.mkdir(parents=True)
    onnx.save(model, str(dest / "model.onnx"))
    if padding:  # a larger artifact (a file beside the model, as a tokenizer would be)
        (dest / "padding.bin").write_bytes(os.urandom(padding))
    (dest / "manifest.toml").write_text(
        f'name = "sensor-anomaly"\nruntime = "onnx"\nfile = "model.onnx"\n'
        f'version = "{version}"\n\n[options]\nthreads = 1\n'
    )
    return dest


def repository(root: Path) -> Path:
    """A model repository holding sensor-anomaly version 1 in the versioned layout."""
    shutil.copytree(MODEL, root / "sensor-anomaly" / "1", dirs_exist_ok=True)
    return root


def intent_manifest(version: str) -> str:
    """home-intent's manifest for ``version``, small for two shared cores: one thread, one
    slot of 256 tokens (a command and a few tokens of answer fit)."""
    return (
        f'name = "home-intent"\nruntime = "gguf"\nfile = "{INTENT_FILE}"\n'
        f'version = "{version}"\n\n[options]\nthreads = 1\nn_ctx = 256\nparallel = 1\n'
        "cpu_repack = false\n"  # as models/home-intent/manifest.toml says why
    )


def intent_repository(root: Path) -> Path:
    """A model repository holding home-intent version 1 (the project's file) in the
    versioned layout."""
    folder = root / "home-intent" / "1"
    folder.mkdir(parents=True)
    shutil.copyfile(INTENT / INTENT_FILE, folder / INTENT_FILE)
    (folder / "manifest.toml").write_text(intent_manifest("1"))
    return root


def build_intent_version(dest: Path, version: str, *, template: str | None = None) -> Path:
    """A new version of home-intent in ``dest``: the real GGUF rewritten with the ``gguf``
    package, its chat template followed by a Jinja comment naming the version (a different
    file that answers the same), or with ``template`` instead (say ``REFUSING``)."""
    import gguf

    if template is None:
        reader = gguf.GGUFReader(INTENT / INTENT_FILE)
        original = reader.fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE].contents()
        template = f"{original}{{# home-intent version {version} #}}"
    dest.mkdir(parents=True)
    with_chat_template(INTENT / INTENT_FILE, dest / INTENT_FILE, template)
    (dest / "manifest.toml").write_text(intent_manifest(version))
    return dest


LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "sensor-anomaly": repository,
    "home-intent": intent_repository,
}


def hub_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "hub", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def rollout_hub_env(storage_url: str, state: Path) -> dict[str, str]:
    return hub_env(
        storage_url,
        APPLIANCE_HUB_ROLLOUT__DIR=str(state / "artifacts"),
        APPLIANCE_HUB_ROLLOUT__SIGNING_KEY_FILE=str(state / "hub-signing-key"),
        APPLIANCE_HUB_ROLLOUT__INTERVAL="0.2",
        APPLIANCE_HUB_FLEET__OFFLINE_AFTER="3",
        APPLIANCE_HUB_FLEET__CHECK_INTERVAL="0.5",
    )


def setting(tmp: Path, storage: str | None = None) -> tuple[str, dict[str, str]]:
    """(storage URL, hub environment): SQLite in ``tmp`` unless ``storage`` is given."""
    storage = storage or f"sqlite:///{tmp / 'hub.db'}"
    return storage, rollout_hub_env(storage, tmp)


def status(env: dict[str, str], rollout: str) -> dict[str, Any]:
    """`appliance hub rollout status ID --json`."""
    result = hub_cli(env, "rollout", "status", rollout, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def publish(env: dict[str, str], path: Path) -> str:
    """`appliance hub publish PATH`; the artifact id."""
    result = hub_cli(env, "publish", str(path))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def start(env: dict[str, str], artifact: str, *args: str) -> str:
    """`appliance hub rollout start ARTIFACT --all ...`; the rollout id."""
    result = hub_cli(env, "rollout", "start", artifact, "--all", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def ended(env: dict[str, str], rollout: str, state: str, timeout: float = 90) -> dict[str, Any]:
    """The rollout's status once it is in ``state``."""
    doc: dict[str, Any] = poll(
        f"rollout {state}",
        lambda: (s := status(env, rollout))["state"] == state and s,
        timeout=timeout,
    )
    return doc


def enroll(env: dict[str, str], device: str) -> tuple[str, str]:
    """(token, public key) as `appliance hub enroll` prints them."""
    result = hub_cli(env, "enroll", device)
    assert result.returncode == 0, result.stderr
    key = result.stderr.split("hub.public_key = '")[1].split("'")[0]
    return result.stdout.strip(), key


def call(
    url: str, body: Any = None, method: str | None = None, token: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Device:
    id: str
    models: Path
    state: Path
    token: str
    proc: DaemonProcess | None = None
    model: str = "sensor-anomaly"  # the one model its repository holds
    loud: bool = False  # traffic with readings the bad version answers NaN for
    answered: list[int] = field(default_factory=list)

    def env(self, hub_url: str, public_key: str, **extra: str) -> dict[str, str]:
        env = {
            "STATE_DIRECTORY": str(self.state),
            "APPLIANCE_DEVICE__ID": self.id,
            "APPLIANCE_HUB__URL": hub_url,
            "APPLIANCE_HUB__TOKEN": self.token,
            "APPLIANCE_HUB__PUBLIC_KEY": public_key,
            "APPLIANCE_HUB__OUTBOX_PATH": str(self.state / "outbox.db"),
            "APPLIANCE_HUB__HEARTBEAT_INTERVAL": "0.2",
            "APPLIANCE_HUB__BACKOFF_INITIAL": "0.1",
            "APPLIANCE_HUB__BACKOFF_MAX": "0.5",
            "APPLIANCE_HUB__UPDATE_MARGIN_BYTES": "0",
            "APPLIANCE_HEALTH__INTERVAL": "0.2",
            "APPLIANCE_CANARY__ENABLED": "true",
            "APPLIANCE_CANARY__SHARE": "0.5",
            "APPLIANCE_CANARY__WINDOW": "2",
            "APPLIANCE_CANARY__MIN_REQUESTS": "5",
            # Timing on two shared cores is noisy; these tests judge by errors.
            "APPLIANCE_CANARY__MAX_LATENCY_RATIO": "1000",
        }
        env.update(extra)
        return env

    def lifecycle(self) -> dict[str, Any]:
        assert self.proc is not None
        try:
            with urllib.request.urlopen(self.proc.url + "/health", timeout=5) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        result: dict[str, Any] = body["units"]["lifecycle"]
        return result

    def serving(self) -> str | None:
        stable = self.lifecycle()["stable"].get(self.model)
        return str(stable) if stable is not None else None

    def on_disk(self) -> list[str]:
        return sorted(p.name for p in (self.models / self.model).iterdir())


def infer(device: Device, url: str) -> int:
    """One sensor-anomaly inference (OIP); the HTTP status."""
    window = LOUD if device.loud else NORMAL
    body = {"inputs": [{"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": window}]}
    status, _ = call(url + "/v2/models/sensor-anomaly/infer", body)
    return status


def chat(device: Device, url: str) -> int:
    """One home-intent chat completion (OpenAI); the HTTP status, or -1 for a 200 that
    holds no answer (tests check every status is 200)."""
    status, body = call(url + "/v1/chat/completions", CHAT)
    if status == 200 and not body["choices"][0]["message"]["content"]:
        return -1
    return status


REQUESTS: dict[str, Callable[[Device, str], int]] = {"sensor-anomaly": infer, "home-intent": chat}


@contextmanager
def traffic(devices: list[Device], stop_on: threading.Event | None = None) -> Iterator[None]:
    """Steady requests to every device, of the kind its model takes (its canary needs them
    to judge)."""
    stop = threading.Event()

    def run(device: Device) -> None:
        send = REQUESTS[device.model]
        while not stop.is_set():
            proc = device.proc
            if proc is None or not proc.url or proc.proc.poll() is not None:
                time.sleep(0.1)
                continue
            with suppress(OSError):
                device.answered.append(send(device, proc.url))
            time.sleep(0.05)

    threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


@contextmanager
def fleet(
    tmp: Path,
    env: dict[str, str],
    hub_url: str,
    names: list[str],
    *,
    public_key: str | None = None,
    models_fs_bytes: int = 0,
    model: str = "sensor-anomaly",
    **extra: str,
) -> Iterator[list[Device]]:
    """Enrolled devices, each a real daemon with a state directory of its own, serving
    version 1 of ``model`` (a key of ``LAYOUTS``); ``models_fs_bytes``: their model
    repositories on a tmpfs of that size."""
    devices: list[Device] = []
    key = ""
    mounted: list[Path] = []
    for name in names:
        token, key = enroll(env, name)
        root = tmp / name
        (root / "models").mkdir(parents=True)
        if models_fs_bytes:
            mount = ["mount", "-t", "tmpfs", "-o", f"size={models_fs_bytes}", "tmpfs"]
            subprocess.run([*mount, str(root / "models")], check=True, capture_output=True)
            mounted.append(root / "models")
        models = LAYOUTS[model](root / "models")
        devices.append(Device(name, models, root / "state", token, model=model))
        (root / "state").mkdir()
    key = public_key or key
    with ExitStack() as stack:
        for path in mounted:
            stack.callback(subprocess.run, ["umount", "-l", str(path)], check=False)
        for d in devices:
            d.proc = stack.enter_context(
                daemon("--models-dir", str(d.models), env=d.env(hub_url, key, **extra))
            )
        try:
            yield devices
        finally:
            for d in devices:  # restarted ones too
                if d.proc is not None:
                    d.proc.stop()


@contextmanager
def hub_and_fleet(
    tmp: Path, storage: str, env: dict[str, str], names: list[str], **options: Any
) -> Iterator[tuple[DaemonProcess, list[Device]]]:
    """A running hub and its enrolled devices (``fleet``'s options); all stopped on exit."""
    with hub(storage, env=env) as proc, fleet(tmp, env, proc.url, names, **options) as devices:
        yield proc, devices


def poll(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached in time (last: {last!r})")


def restart(device: Device, hub_url: str, public_key: str, **extra: str) -> None:
    """Start the device's daemon again (same state, models and token)."""
    proc = start_daemon(
        "--models-dir", str(device.models), env=device.env(hub_url, public_key, **extra)
    )
    device.proc = proc
    proc.wait_listening(60)
