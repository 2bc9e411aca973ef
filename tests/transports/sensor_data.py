"""Realistic input for the default ``sensor-anomaly`` model, from its own build script.

The windows come from the simulation the model was trained on, normal and anomalous mixed,
so a test that compares answers also sees both kinds of answer.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import numpy as np

from tests.conftest import DEFAULT_MODELS

MODEL_FILE = DEFAULT_MODELS / "sensor-anomaly" / "model.onnx"
_BUILD_SCRIPT = DEFAULT_MODELS / "build_sensor_anomaly.py"


def _build_script() -> ModuleType:
    name = "_appliance_build_sensor_anomaly"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def sensor_windows(count: int, seed: int = 77) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``count`` windows [count, 32, 3] of temperature, humidity and vibration readings."""
    days = max(0.5, count / 150)
    data = _build_script().generate_dataset(seed, n_devices=2, days=days, anomaly_fraction=0.3)
    windows = np.ascontiguousarray(data.windows[:count], dtype=np.float32)
    assert windows.shape == (count, 32, 3), windows.shape
    return windows
