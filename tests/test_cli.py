"""The ``appliance`` command as a person types it: consistent flags, output that can be
used as it is (TOML to paste, sizes to judge), messages that name the right command."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.hub.conftest import hub_env
from tests.test_daemon_process import appliance, clean_env

pytestmark = pytest.mark.timeout(120)


def test_models_lists_sizes_and_files() -> None:
    result = appliance("models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "RUNTIME", "VERSION", "SIZE", "FILE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    onnx = ROOT / "models" / "sensor-anomaly" / "model.onnx"
    assert str(onnx) in rows["sensor-anomaly"]
    assert f"{onnx.stat().st_size / 1024:.1f} KiB" in rows["sensor-anomaly"]
    assert "home-intent-q8_0.gguf" in rows["home-intent"] and "KiB" in rows["home-intent"]
    listed = json.loads(appliance("models", "--json").stdout)
    assert {m["name"]: m["size_bytes"] for m in listed}["sensor-anomaly"] == onnx.stat().st_size


@pytest.mark.parametrize("command", [["models"], ["config"]])
def test_commands_that_bind_nothing_take_no_host_or_port(command: list[str]) -> None:
    for flag in (["--host", "0.0.0.0"], ["--port", "9000"]):
        result = appliance(*command, *flag)
        assert result.returncode == 2, result.stdout
        assert "--host" not in appliance(*command, "--help").stdout
        assert "--port" not in appliance(*command, "--help").stdout


def test_config_toml_is_a_file_that_loads_to_the_same_configuration(tmp_path: Path) -> None:
    env = clean_env(APPLIANCE_HTTP__PORT="9000", APPLIANCE_MQTT__BASE_TOPIC="site/box-1")
    printed = appliance("config", "--toml", env=env)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("# appliance.toml")
    assert '[http]\nhost = "0.0.0.0"\nport = 9000\n' in printed.stdout
    file = tmp_path / "appliance.toml"
    file.write_text(printed.stdout, encoding="utf-8")
    again = appliance("config", "--config", str(file))
    assert again.returncode == 0, again.stderr
    as_json = json.loads(appliance("config", env=env).stdout)
    assert json.loads(again.stdout) == as_json
    assert as_json["mqtt"]["base_topic"] == "site/box-1"


def test_quantize_takes_json_like_models_and_the_old_spelling_still_works(tmp_path: Path) -> None:
    helped = appliance("models", "quantize", "--help").stdout
    assert "--json" in helped and "--as-json" not in helped
    source = ROOT / "models" / "home-intent" / "home-intent-q8_0.gguf"
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    for flag in ("--json", "--as-json"):
        result = appliance(
            "models",
            "quantize",
            str(source),
            str(tmp_path / f"q{flag}.gguf"),
            "--type",
            "q4_0",
            "--threads",
            "1",
            "--no-cpu-repack",
            flag,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["kind"] == "gguf-q4_0"
        assert "[   1/" not in result.stderr  # llama.cpp's per-tensor lines stay away


def test_quantize_on_a_terminal_draws_a_bar_then_the_report(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    source = ROOT / "models" / "home-intent" / "home-intent-q8_0.gguf"
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance",
            "models",
            "quantize",
            str(source),
            str(tmp_path / "q4.gguf"),
            "--type",
            "q4_0",
            "--threads",
            "1",
            "--no-cpu-repack",
        ],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ROOT,
        env=clean_env(),
    )
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        seen += data
    os.close(primary)
    assert proc.wait(timeout=30) == 0
    text = seen.decode("utf-8", "replace")
    # The bar ends full: N/N, N the model's tensor count.
    assert "\rquantizing to q4_0 [" in text, text[-2000:]
    assert re.search(r"\b(\d+)/\1 tensors", text), text[-2000:]
    assert "converting to" not in text and "llama_model_loader" not in text, text[-2000:]
    report = text[text.rindex("measuring before and after...") :]
    assert "gguf-q4_0:" in report and "size" in report and "perplexity" in report


def test_hub_key_warning_names_the_hubs_own_command(tmp_path: Path) -> None:
    env = hub_env(
        f"sqlite:///{tmp_path / 'hub.db'}",
        APPLIANCE_HUB_SECURITY__AUTH="on",
        STATE_DIRECTORY=str(tmp_path),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "hub", "run", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        log = "".join(lines)
        assert "'appliance hub keys create NAME'" in log, log
        assert str(tmp_path / "hub-api-key") in log
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "hub",
            "keys",
            "create",
            "dashboard",
            "--scope",
            "read",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    assert created.stdout.startswith("apk_")
    assert "in hub.toml:" in created.stderr and 'scopes = ["read"]' in created.stderr
