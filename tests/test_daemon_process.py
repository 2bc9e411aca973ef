"""``python -m appliance`` as a real process: start-up, graceful SIGTERM, bad configuration.

The daemon runs as a subprocess exactly as systemd would start it; the tests talk to it
over real sockets with the standard library only, so nothing of the daemon is in-process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT, daemon

MAX_TOKENS = 1000
EOS = 2


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any APPLIANCE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(extra)
    return env


def appliance(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


WINDOW = {"name": "window", "datatype": "FP32", "shape": [1, 32, 3], "data": [0.5] * 96}


# ------------------------------------------------------------------------------ serving


def test_run_without_a_config_file_serves_the_default_models() -> None:
    with daemon() as proc:  # no --config, no APPLIANCE_* variables
        status, health = get(proc.url + "/health")
        assert status == 200
        assert health["status"] == "ok"
        assert health["models"]["sensor-anomaly"]["state"] == "ready"
        status, models = get(proc.url + "/v1/models")
        assert status == 200
        assert "sensor-anomaly" in [m["id"] for m in models["data"]]
        status, ready = get(proc.url + "/v2/models/sensor-anomaly/ready")
        assert (status, ready["ready"]) == (200, True)
        status, answer = post(proc.url + "/v2/models/sensor-anomaly/infer", {"inputs": [WINDOW]})
        assert status == 200
        assert [o["name"] for o in answer["outputs"]] == ["score", "is_anomaly"]
        assert proc.stop() == 0


def test_a_llama_cpp_that_cannot_load_fails_its_models_not_the_daemon(tmp_path: Path) -> None:
    """llama-cpp-python whose libraries cannot load (here a stand-in package raising what
    a missing libgomp raises; the real one loads on this machine): the GGUF model is
    reported failed with the reason, and everything else serves."""
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise RuntimeError(\"Failed to load shared library 'libllama.so': libgomp.so.1: "
        'cannot open shared object file")\n'
    )
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    with daemon(env=env) as proc:
        status, health = get(proc.url + "/health")
        assert status == 200 and health["status"] == "degraded"
        assert health["models"]["sensor-anomaly"]["state"] == "ready"
        intent = health["models"]["home-intent"]
        assert intent["state"] == "failed" and "libgomp" in intent["error"]
        assert proc.stop() == 0


def test_model_files_are_served_under_their_stem(
    tmp_path: Path, stories_gguf: Path, default_models: Path
) -> None:
    story = tmp_path / "bedtime-tales.gguf"
    story.symlink_to(stories_gguf)
    sensor = tmp_path / "vibration-check.onnx"
    sensor.symlink_to(default_models / "sensor-anomaly" / "model.onnx")
    with daemon("--model", str(story), "--model", str(sensor)) as proc:
        status, models = get(proc.url + "/v1/models")
        assert status == 200
        # Only the files: --model replaces the default model directory.
        assert sorted(m["id"] for m in models["data"]) == ["bedtime-tales", "vibration-check"]
        status, completion = post(
            proc.url + "/v1/completions",
            {
                "model": "bedtime-tales",
                "prompt": "Once upon a time",
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        assert status == 200
        assert completion["choices"][0]["text"].startswith(", there was a little girl named")
        status, answer = post(proc.url + "/v2/models/vibration-check/infer", {"inputs": [WINDOW]})
        assert status == 200
        assert answer["model_name"] == "vibration-check"
        status, meta = get(proc.url + "/v2/models/bedtime-tales")
        assert (status, meta["platform"]) == (200, "llama_cpp_gguf")
        status, error = get(proc.url + "/v2/models/sensor-anomaly")
        assert status == 404
        assert "not found" in error["error"]


# ------------------------------------------------------------------------- graceful stop


class StreamReader(threading.Thread):
    """Reads one SSE completion to its end, noting when each event arrived."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(name="sse-reader", daemon=True)
        parts = urlsplit(url)
        assert parts.hostname is not None
        assert parts.port is not None
        self._conn = HTTPConnection(parts.hostname, parts.port, timeout=60)
        self._conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = self._conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        self._response = response
        self.events: list[tuple[float, str]] = []
        self.first_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for raw in self._response:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    self.events.append((time.monotonic(), line[6:]))
                    self.first_event.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            self.first_event.set()
            self._conn.close()


def refused(url: str) -> bool:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_finishes_the_stream_in_flight_and_refuses_new_connections(
    stories_gguf: Path,
) -> None:
    body = {
        "model": "stories260K",
        "prompt": "Once upon a time",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": {str(EOS): -100},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # A generous shutdown timeout: this box may be slow, and the stream must not be cut.
    env = {"APPLIANCE_HTTP__SHUTDOWN_TIMEOUT": "120"}
    with daemon("--model", str(stories_gguf), env=env) as proc:
        reader = StreamReader(proc.url, body)
        reader.start()
        assert reader.first_event.wait(30)
        assert reader.error is None
        proc.proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 30
        while not refused(proc.url):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.01)
        refused_at = time.monotonic()

        reader.join(120)
        assert not reader.is_alive()
        assert reader.error is None, reader.error
        returncode = proc.proc.wait(60)

    assert returncode == 0, "\n".join(proc.log)
    finished_at, last = reader.events[-1]
    assert last == "[DONE]"
    # The listener was closed while the stream was still being generated and sent.
    assert refused_at < finished_at
    chunks = [json.loads(data) for _, data in reader.events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] >= MAX_TOKENS
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) > MAX_TOKENS / 2
    assert any("received SIGTERM" in line for line in proc.log)


# ------------------------------------------------------------------ bad configuration


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@dataclass(frozen=True)
class BadConfig:
    """A bad configuration; ``{file}`` in args, env and expected is the written file."""

    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    file: str | None = None  # appliance.toml text, written to a temporary file
    expected: Sequence[str] = ()  # texts the error message must contain


BAD_CONFIGS = {
    "env-port-not-a-number": BadConfig(
        env={"APPLIANCE_HTTP__PORT": "abc"},
        expected=[
            "http.port",
            "'abc'",
            "environment variable APPLIANCE_HTTP__PORT",
            "allowed: integer (>= 0, <= 65535)",
        ],
    ),
    "env-level-not-allowed": BadConfig(
        env={"APPLIANCE_LOGGING__LEVEL": "loud"},
        expected=[
            "logging.level",
            "'loud'",
            "APPLIANCE_LOGGING__LEVEL",
            "'debug' | 'info' | 'warning' | 'error'",
        ],
    ),
    "env-unknown-key": BadConfig(
        env={"APPLIANCE_HTTP__PROT": "8080"},
        expected=["APPLIANCE_HTTP__PROT", "unknown key 'prot'", "allowed keys: host, port"],
    ),
    "env-unknown-section": BadConfig(
        env={"APPLIANCE_HTPP__PORT": "8080"},
        expected=[
            "APPLIANCE_HTPP__PORT",
            "unknown section 'htpp'",
            "allowed sections: device, http, models, logging",
        ],
    ),
    "file-unknown-key": BadConfig(
        args=["--config", "{file}"],
        file="[http]\nportt = 8080\n",
        expected=[
            "http.portt = 8080",
            "{file}",
            "unknown key",
            "allowed keys: host, port, max_body_bytes, shutdown_timeout",
        ],
    ),
    "file-unknown-section": BadConfig(
        args=["--config", "{file}"],
        file="[htpp]\nport = 8080\n",
        expected=[
            "{file}",
            "unknown section 'htpp'",
            "allowed sections: device, http, models, logging",
        ],
    ),
    "file-bad-value": BadConfig(
        args=["--config", "{file}"],
        file="[models]\nqueue_size = -1\n",
        expected=["models.queue_size = -1", "{file}", ">= 0"],
    ),
    "file-named-by-environment": BadConfig(
        env={"APPLIANCE_CONFIG": "{file}"},
        file="[models]\nqueue_size = -1\n",
        expected=["models.queue_size = -1", "{file}", ">= 0"],
    ),
    "file-not-toml": BadConfig(
        args=["--config", "{file}"],
        file="[http\nport = 1\n",
        expected=["{file}", "is not valid TOML"],
    ),
    "file-missing": BadConfig(
        args=["--config", "{file}.absent"], expected=["cannot read config file", "{file}.absent"]
    ),
    "flag-port-out-of-range": BadConfig(
        args=["--port", "70000"], expected=["http.port = 70000", "command line", "<= 65535"]
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_configuration_exits_2_naming_key_value_and_what_is_allowed(
    tmp_path: Path, case: BadConfig
) -> None:
    file = tmp_path / "appliance.toml"
    if case.file is not None:
        write(file, case.file)
    args = [a.replace("{file}", str(file)) for a in case.args]
    env = clean_env(**{k: v.replace("{file}", str(file)) for k, v in case.env.items()})
    result = appliance("run", "--host", "127.0.0.1", *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("appliance: ")
    for text in case.expected:
        assert text.replace("{file}", str(file)) in result.stderr, result.stderr
    assert "listening on" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------- appliance config


def test_config_prints_the_resolved_configuration_with_the_environment_applied() -> None:
    result = appliance("config", env=clean_env(APPLIANCE_HTTP__PORT="9000"))
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["http"]["port"] == 9000
    assert config["http"]["host"] == "0.0.0.0"
    # Derived values are resolved, not left empty.
    assert re.fullmatch(r"appliance-[0-9a-f]{12}|[a-z0-9][a-z0-9-]{0,62}", config["device"]["id"])
    assert config["device"]["name"]
    assert Path(config["models"]["dir"]) == ROOT / "models"


def test_config_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = write(
        tmp_path / "appliance.toml",
        '[http]\nport = 7000\nhost = "127.0.0.2"\n[models]\nqueue_size = 3\n',
    )
    env = clean_env(APPLIANCE_CONFIG=str(file), APPLIANCE_HTTP__PORT="9000")
    from_env = json.loads(appliance("config", env=env).stdout)
    assert from_env["http"] == {**from_env["http"], "port": 9000, "host": "127.0.0.2"}
    assert from_env["models"]["queue_size"] == 3
    from_flags = json.loads(
        appliance(
            "config", "--log-level", "debug", env={**env, "APPLIANCE_LOGGING__LEVEL": "error"}
        ).stdout
    )
    assert from_flags["logging"]["level"] == "debug"
    assert from_flags["http"]["host"] == "127.0.0.2"
