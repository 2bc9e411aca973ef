"""The project's own default model, ``models/sensor-anomaly``, against its build script.

The committed ``model.onnx`` must be what ``models/build_sensor_anomaly.py`` builds, its
manifest must name it by hash, and it must really detect anomalies on data it has never
seen.  ``models/`` is not a package, so the script is loaded by path for its generator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "models" / "build_sensor_anomaly.py"
MODEL_DIR = ROOT / "models" / "sensor-anomaly"
MODEL = MODEL_DIR / "model.onnx"
MANIFEST = MODEL_DIR / "manifest.toml"
# Not one of the script's own seeds (train 1001, calibration 2002, eval 3003, check
# 4004), so these devices are new to the model.
HELD_OUT_SEED = 90210
CHANNELS = 3
WINDOW = 32


@pytest.fixture(scope="module")
def build_script() -> ModuleType:
    """``models/build_sensor_anomaly.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("_build_sensor_anomaly", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def committed() -> ort.InferenceSession:
    return _session(MODEL)


def _run(session: ort.InferenceSession, windows: np.ndarray[Any, Any]) -> tuple[Any, Any]:
    score, flag = session.run(["score", "is_anomaly"], {"window": windows})
    return score, flag


def _build(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_manifest_names_the_committed_model_by_hash() -> None:
    manifest = tomllib.loads(MANIFEST.read_text(encoding="utf-8"))
    # Exactly these keys: the daemon's manifest schema forbids unknown ones.
    assert sorted(manifest) == [
        "description",
        "file",
        "name",
        "options",
        "runtime",
        "sha256",
        "version",
    ]
    assert manifest["name"] == "sensor-anomaly"
    assert manifest["runtime"] == "onnx"
    assert manifest["file"] == "model.onnx"
    assert manifest["options"] == {"threads": 1}
    assert manifest["sha256"] == hashlib.sha256(MODEL.read_bytes()).hexdigest()


def test_committed_model_declares_its_interface() -> None:
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    # IR 9 / opset 17 load on onnxruntime releases much older than the one developed on.
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    props = {p.key: p.value for p in model.metadata_props}
    assert {"producer", "training_data", "threshold", "channels"} <= set(props)
    assert "temperature" in props["channels"]
    assert "g RMS" in props["channels"]


def test_build_script_reproduces_committed_model(
    tmp_path: Path, build_script: ModuleType, committed: ort.InferenceSession
) -> None:
    result = _build(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "precision" in result.stdout
    assert "recall" in result.stdout
    rebuilt = tmp_path / "model.onnx"
    manifest = tomllib.loads((tmp_path / "manifest.toml").read_text(encoding="utf-8"))
    assert manifest["sha256"] == hashlib.sha256(rebuilt.read_bytes()).hexdigest()

    data = build_script.generate_dataset(
        HELD_OUT_SEED + 1, n_devices=4, days=1.0, anomaly_fraction=0.2
    )
    old_score, old_flag = _run(committed, data.windows)
    new_score, new_flag = _run(_session(rebuilt), data.windows)
    np.testing.assert_allclose(new_score, old_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(new_flag, old_flag)


def test_check_mode_accepts_committed_files_and_rejects_a_stale_manifest(
    tmp_path: Path,
) -> None:
    shutil.copytree(MODEL_DIR, tmp_path, dirs_exist_ok=True)
    ok = _build(tmp_path, "--check")
    assert ok.returncode == 0, ok.stderr

    manifest = tmp_path / "manifest.toml"
    text = manifest.read_text(encoding="utf-8")
    sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    manifest.write_text(text.replace(sha, "0" * 64), encoding="utf-8")
    stale = _build(tmp_path, "--check")
    assert stale.returncode != 0
    assert "sha256" in stale.stderr


def test_detects_anomalies_on_held_out_devices(
    build_script: ModuleType, committed: ort.InferenceSession
) -> None:
    data = build_script.generate_dataset(
        HELD_OUT_SEED, n_devices=16, days=2.0, anomaly_fraction=0.2
    )
    _, flags = _run(committed, data.windows)
    metrics = build_script.report(data, flags)
    # Over 40 such sets the worst precision seen was 0.968 and the worst recall 0.993.
    assert metrics["precision"] >= 0.95, metrics
    assert metrics["recall"] >= 0.95, metrics
    for kind in build_script.ANOMALY_KINDS:
        assert metrics[f"recall_{kind}"] >= 0.9, (kind, metrics)
    assert metrics["false_alarm_rate"] <= 0.01, metrics


def test_normal_windows_score_below_threshold(committed: ort.InferenceSession) -> None:
    # Written by hand rather than by the simulator: a quiet room warming slowly, humidity
    # easing off, and a machine that switches on a third of the way through.
    rng = np.random.default_rng(7)
    t = np.arange(WINDOW)
    vib_level = np.where(t < 12, 0.02, 0.6)
    window = np.stack(
        [
            21.0 + 0.01 * t + rng.normal(0.0, 0.05, WINDOW),
            45.0 - 0.03 * t + rng.normal(0.0, 0.15, WINDOW),
            vib_level * np.exp(rng.normal(0.0, 0.05, WINDOW)),
        ],
        axis=-1,
    ).astype(np.float32)
    score, flag = _run(committed, window[None])
    assert score[0] < 1.0
    assert not flag[0]

    stuck = window.copy()
    stuck[8:, 0] = stuck[8, 0]
    score, flag = _run(committed, stuck[None])
    assert score[0] > 1.0
    assert flag[0]


def test_batch_dimension_is_dynamic(
    build_script: ModuleType, committed: ort.InferenceSession
) -> None:
    (window_input,) = committed.get_inputs()
    assert window_input.name == "window"
    assert window_input.type == "tensor(float)"
    assert window_input.shape == ["batch", WINDOW, CHANNELS]
    assert [(o.name, o.type) for o in committed.get_outputs()] == [
        ("score", "tensor(float)"),
        ("is_anomaly", "tensor(bool)"),
    ]

    windows = build_script.generate_dataset(HELD_OUT_SEED + 2, n_devices=1, days=0.2).windows
    one_score, one_flag = _run(committed, windows[:1])
    seven_score, seven_flag = _run(committed, windows[:7])
    assert one_score.shape == one_flag.shape == (1,)
    assert seven_score.shape == seven_flag.shape == (7,)
    assert one_score.dtype == np.float32
    assert seven_flag.dtype == np.bool_
    # Windows are scored independently of what else is in the batch.
    np.testing.assert_allclose(seven_score[:1], one_score, rtol=1e-5)


def test_non_finite_readings_are_flagged(
    build_script: ModuleType, committed: ort.InferenceSession
) -> None:
    windows = build_script.generate_dataset(HELD_OUT_SEED + 3, n_devices=1, days=0.2).windows[:3]
    windows[1, 5, 0] = np.nan
    windows[2, 9, 2] = np.inf
    score, flag = _run(committed, windows)
    assert np.isfinite(score[0])
    assert np.isposinf(score[1:]).all()
    assert flag[1:].all()
