"""Build the default ``sensor-anomaly`` ONNX model from synthetic sensor data.

The appliance ships one small model of its own so that MQTT stream rules work out of
the box: a detector for windows of 32 readings (one a minute) from a three-channel
environment/machine sensor -- temperature (degC), relative humidity (%RH) and vibration
(g RMS).  Everything is generated here, seeded, so anyone can rebuild the exact file:

1. A physical-ish simulator produces normal behaviour: a daily temperature cycle,
   weather wander, a machine that switches on and off (vibration level, plus a little
   heat), humidity that follows temperature through the saturation vapour pressure,
   and sensor noise.  Labelled anomalies of five kinds are injected into copies of
   normal windows: spikes, stuck sensors, fast drift, vibration bursts and readings
   out of range (sensor error codes / saturation).
2. Each window is reduced to 18 features (per channel: level, trend, noise, step
   size, residual after a trend + one-step fit, second-largest jump), computed inside
   the graph.  A PCA model (the optimal linear autoencoder) is fitted with numpy on
   the standardised features of normal windows only.  The anomaly index combines
   Hotelling's T^2 inside the principal subspace with the squared reconstruction
   error Q outside it (the "combined index" of Yue & Qin, 2001).  The threshold is a
   high quantile of that index on a separate calibration set of normal windows; the
   exported score is index / threshold plus a term for readings outside the range
   seen in training, so ``score > 1.0`` means anomalous.
3. The graph is written with ``onnx.helper`` (opset 17, IR version 9, so older
   onnxruntime builds on a Pi load it), checked, compared with the numpy scorer and
   evaluated with onnxruntime on held-out devices, then saved with ``manifest.toml``.

Usage::

    python models/build_sensor_anomaly.py [--out DIR] [--check]

``--check`` rebuilds into a temporary directory and verifies that the model in DIR
gives the same outputs and that its manifest matches the file (sha256) and the format.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]

MODEL_NAME: Final = "sensor-anomaly"
MODEL_VERSION: Final = "1"
WINDOW: Final = 32
CHANNELS: Final = ("temperature", "humidity", "vibration")
UNITS: Final = ("degC", "%RH", "g RMS")
SAMPLE_PERIOD_S: Final = 60
ANOMALY_KINDS: Final = ("spike", "stuck", "drift", "burst", "out_of_range")
OPSET: Final = 17
IR_VERSION: Final = 9

# Device counts matter more than days: the spread between devices (rooms, machines) is
# what a threshold from too few of them underestimates.
TRAIN_DEVICES: Final = 128
CALIB_DEVICES: Final = 128
EVAL_DEVICES: Final = 32
DAYS: Final = 2.0
# Distinct seeds so that fitting, threshold calibration and evaluation never share data.
TRAIN_SEED: Final = 1001
CALIB_SEED: Final = 2002
EVAL_SEED: Final = 3003
CHECK_SEED: Final = 4004

# Vibration RMS is roughly log-normal (multiplicative load and sensor noise), so the
# model sees log(v + VIB_LOG_OFFSET); the offset keeps a dead sensor's 0 g finite.
VIB_LOG_OFFSET: Final = 0.005
# Sensor noise (std) per channel, drawn per device between these bounds: temperature
# degC, humidity %RH, vibration relative (log domain).
NOISE_MIN: Final = (0.02, 0.05, 0.03)
NOISE_MAX: Final = (0.1, 0.3, 0.12)
# Floors inside the log features, a hundredth of the quietest sensor's noise: a
# stuck channel (zero differences) lands far below any normal one, yet stays finite.
LOG_EPS: Final = (0.0002, 0.0005, 0.0003)
MEDIAN_RANK: Final = (WINDOW - 1) // 2
RESID_DOF: Final = WINDOW - 4  # constant, two trend terms and one step are fitted
# 8 of the 18 standardised features' components (~78 % of their variance): the
# correlated part (levels and trends moving together) goes to T^2, the rest to Q.
N_COMPONENTS: Final = 8
MIN_DWELL: Final = 30  # samples (minutes) the simulated machine stays on or off at least
# 1 in 500 normal windows is flagged; at the anomaly rates seen in practice this keeps
# precision high while every injected kind is still caught (see models/README.md).
THRESHOLD_QUANTILE: Final = 0.998
# Weight of the range term, which is added to the already normalised score: going 10 %
# of a channel's training span past the widened range is enough on its own.
RANGE_GAIN_PER_SPAN: Final = 10.0
RANGE_MARGIN: Final = 0.1
QUALITY_FLOOR: Final = 0.95  # the build fails below this held-out precision or recall


@dataclass(frozen=True)
class Dataset:
    """Windows ``[n, 32, 3]`` (float32), anomaly labels and the injected kind ("" = normal)."""

    windows: F32
    labels: NDArray[np.bool_]
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class ModelParams:
    """Everything the ONNX graph needs; float64 here, float32 once exported."""

    feat_mean: F64
    feat_inv_std: F64
    components: F64  # [n_features, k], orthonormal columns
    t2_weights: F64  # [k]: 1 / (eigenvalue * T2 limit)
    q_scale: float  # 1 / Q limit
    range_lo: F64  # [3]
    range_hi: F64  # [3]
    range_gain: F64  # [3]: RANGE_GAIN_PER_SPAN / span
    threshold: float  # raw index value that maps to score 1.0


# --------------------------------------------------------------------------- data


def _saturation_vapour_pressure(temp_c: F64) -> F64:
    """Magnus formula (hPa); ties relative humidity to temperature at fixed moisture."""
    return 6.112 * np.exp(17.62 * temp_c / (243.12 + temp_c))


def _ar1(rng: np.random.Generator, shape: tuple[int, int], tau: float, sd: float) -> F64:
    """Stationary AR(1) noise along axis 1 with time constant ``tau`` samples."""
    rho = float(np.exp(-1.0 / tau))
    innov = rng.normal(0.0, sd * np.sqrt(1.0 - rho * rho), shape)
    out = np.empty(shape)
    out[:, 0] = rng.normal(0.0, sd, shape[0])
    for i in range(1, shape[1]):
        out[:, i] = rho * out[:, i - 1] + innov[:, i]
    return out


def simulate_series(rng: np.random.Generator, n_devices: int, n_samples: int) -> F64:
    """Normal readings ``[n_devices, n_samples, 3]`` sampled once a minute."""
    shape = (n_devices, n_samples)
    col = (n_devices, 1)
    day = np.arange(n_samples) * SAMPLE_PERIOD_S / 86400.0
    base_temp = rng.uniform(16.0, 28.0, col)
    daily_amp = rng.uniform(1.5, 5.0, col)
    phase = rng.uniform(0.0, 2.0 * np.pi, col)
    heat_gain = rng.uniform(0.5, 2.0, col)
    base_rh = rng.uniform(30.0, 65.0, col)
    vib_on = rng.uniform(0.3, 1.2, col)
    vib_off = rng.uniform(0.01, 0.03, col)
    # The machine runs for 1-6 h stretches and rests for 2-8 h (per-minute switch odds
    # after a minimum dwell: motors and compressors have anti-short-cycle protection).
    p_stop = 1.0 / rng.uniform(60.0, 360.0, n_devices)
    p_start = 1.0 / rng.uniform(120.0, 480.0, n_devices)

    switch = rng.random(shape)
    on = np.empty(shape, dtype=bool)
    heat = np.empty(shape)
    state = rng.random(n_devices) < 0.4
    dwell = rng.integers(0, 2 * MIN_DWELL, n_devices)
    h = heat_gain[:, 0] * state
    heat_alpha = 1.0 - np.exp(-1.0 / 45.0)  # machine warms its surroundings with tau=45 min
    for i in range(n_samples):
        flip = (dwell >= MIN_DWELL) & (switch[:, i] < np.where(state, p_stop, p_start))
        state = state ^ flip
        dwell = np.where(flip, 0, dwell + 1)
        h = h + (heat_gain[:, 0] * state - h) * heat_alpha
        on[:, i] = state
        heat[:, i] = h

    weather = _ar1(rng, shape, tau=600.0, sd=0.7)
    temp = base_temp + daily_amp * np.sin(2.0 * np.pi * day + phase) + weather + heat
    # Absolute moisture wanders slowly; RH then falls as the air warms, as it does indoors.
    moisture = np.exp(_ar1(rng, shape, tau=900.0, sd=0.06))
    rh = base_rh * moisture * _saturation_vapour_pressure(base_temp)
    rh = np.clip(rh / _saturation_vapour_pressure(temp), 1.0, 99.0)
    load = np.exp(_ar1(rng, shape, tau=30.0, sd=0.1))
    # Sensor noise differs between units and models, so it is drawn per device
    # (log-uniform); vibration noise is relative, as for an RMS over a short interval.
    noise = np.exp(rng.uniform(np.log(NOISE_MIN), np.log(NOISE_MAX), (n_devices, 1, 3)))
    vib = np.where(on, vib_on * load, vib_off) * np.exp(noise[:, :, 2] * rng.normal(size=shape))
    temp = temp + noise[:, :, 0] * rng.normal(size=shape)
    rh = np.clip(rh + noise[:, :, 1] * rng.normal(size=shape), 0.0, 100.0)
    return np.stack([temp, rh, vib], axis=-1)


def cut_windows(series: F64, stride: int = WINDOW // 2) -> F64:
    """Half-overlapping windows ``[n, 32, 3]`` from every device's series."""
    starts = range(0, series.shape[1] - WINDOW + 1, stride)
    return np.concatenate([series[:, s : s + WINDOW] for s in starts], axis=0)


def inject_anomaly(rng: np.random.Generator, window: F64, kind: str) -> F64:
    """Return a copy of a normal ``[32, 3]`` window with one anomaly of ``kind``."""
    w: F64 = np.array(window, dtype=np.float64)
    c = int(rng.integers(3))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "spike":
        width = int(rng.integers(1, 3))
        pos = int(rng.integers(1, WINDOW - width))
        jump = (
            sign * rng.uniform(3.0, 10.0),
            sign * rng.uniform(8.0, 25.0),
            rng.uniform(1.0, 4.0),  # vibration impacts only ever add energy
        )[c]
        w[pos : pos + width, c] += jump
    elif kind == "stuck":
        start = int(rng.integers(0, 12))
        w[start:, c] = w[start, c]  # the sensor repeats its last good value
    elif kind == "drift":
        # A failing sensor or a runaway process: several times the fastest normal change.
        start = int(rng.integers(0, 10))
        ramp = np.linspace(0.0, 1.0, WINDOW - start)
        if c == 0:
            w[start:, 0] += sign * rng.uniform(4.0, 10.0) * ramp
        elif c == 1:
            w[start:, 1] += sign * rng.uniform(12.0, 30.0) * ramp
        else:
            gain = 1.0 + (rng.uniform(2.0, 4.0) - 1.0) * ramp
            w[start:, 2] = w[start:, 2] * gain + rng.uniform(0.3, 1.0) * ramp
    elif kind == "burst":
        c = 2
        # Starts and ends inside the window: a burst that runs past the end looks,
        # within this window, exactly like the machine switching on.
        length = int(rng.integers(3, 11))
        start = int(rng.integers(1, WINDOW - length))
        seg = slice(start, start + length)
        w[seg, 2] = w[seg, 2] * rng.uniform(2.5, 6.0) + rng.uniform(0.2, 1.0)
    elif kind == "out_of_range":
        start = int(rng.integers(0, WINDOW - 4))
        # Typical error codes / saturation: DS18B20 power-on 85 degC, DHT -40 degC,
        # RH 0 or 100 %, a +-16 g or +-8 g accelerometer pinned at full scale.
        codes = ((85.0, -40.0), (0.0, 100.0), (16.0, 8.0))[c]
        w[start:, c] = codes[int(rng.integers(2))]
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {ANOMALY_KINDS}")
    if c == 1:
        w[:, 1] = np.clip(w[:, 1], 0.0, 100.0)
    w[:, 2] = np.maximum(w[:, 2], 0.0)
    return w


def generate_dataset(
    seed: int, *, n_devices: int = 16, days: float = 2.0, anomaly_fraction: float = 0.0
) -> Dataset:
    """Deterministic windows from ``n_devices`` simulated devices over ``days`` days.

    ``anomaly_fraction`` of the windows (chosen at random) are replaced by anomalous
    copies, the kinds cycling evenly through ``ANOMALY_KINDS``.
    """
    rng = np.random.default_rng(seed)
    series = simulate_series(rng, n_devices, int(days * 86400 / SAMPLE_PERIOD_S))
    windows = cut_windows(series)
    n = windows.shape[0]
    labels = np.zeros(n, dtype=bool)
    kinds = [""] * n
    picked = rng.permutation(n)[: round(anomaly_fraction * n)]
    for j, idx in enumerate(np.sort(picked)):
        kind = ANOMALY_KINDS[j % len(ANOMALY_KINDS)]
        windows[idx] = inject_anomaly(rng, windows[idx], kind)
        labels[idx] = True
        kinds[idx] = kind
    return Dataset(windows.astype(np.float32), labels, tuple(kinds))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class FitBases:
    """Constant matrices of the per-channel curve fit (columns have length 32).

    Each channel is fitted with a constant, a linear and a quadratic trend (daily cycle,
    a machine warming the room) and at most one step (a machine switching on or off).
    Normal windows are explained by that; spikes, bursts, kinks and dropouts are not.
    """

    poly: F64  # [32, 2] orthonormal linear and quadratic trend, orthogonal to 1
    steps: F64  # [32, 31] step at sample s (column s-1), trends projected out, unit norm
    # Linear-trend coefficient with step s in the fit is (y.poly0) - (y.steps_s) * k_s;
    # both are scaled by ``rise`` so the feature reads as change over the window.
    slope_corr: F64  # [31]: k_s * rise
    rise: float


def fit_bases() -> FitBases:
    """Build the constant fit bases (deterministic: signs pinned after QR)."""
    t = np.linspace(-1.0, 1.0, WINDOW)
    basis, _ = np.linalg.qr(np.stack([np.ones(WINDOW), t, t * t], axis=1))
    # QR's signs depend on LAPACK; pin them so the exported bytes are reproducible.
    basis = basis * np.sign(basis[-1])
    raw_steps = (np.arange(WINDOW)[:, None] >= np.arange(1, WINDOW)[None, :]).astype(np.float64)
    steps = raw_steps - basis @ (basis.T @ raw_steps)
    norms = np.linalg.norm(steps, axis=0)
    poly = basis[:, 1:]
    rise = float(poly[-1, 0] - poly[0, 0])
    return FitBases(poly, steps / norms, (poly[:, 0] @ raw_steps) / norms * rise, rise)


def window_features(windows: NDArray[np.floating[Any]]) -> F64:
    """Numpy twin of the graph's feature block: ``[n, 32, 3]`` -> ``[n, 18]``.

    Six features per channel, vibration taken in the log domain, in this order (each
    block holds the three channels):

    - level: the window mean;
    - trend: linear change over the window from the trend + best single-step fit;
    - roughness: log median |first difference|, which collapses on a stuck sensor;
    - step: log size of that best step (large only for vibration, normally);
    - residual: log residual std after the fit (spikes, bursts, kinks);
    - jump2: log second-largest |first difference| (one jump is a switch, two are not).
    """
    x = np.asarray(windows, dtype=np.float64)
    y = np.concatenate([x[:, :, :2], np.log(np.maximum(x[:, :, 2:], 0.0) + VIB_LOG_OFFSET)], 2)
    eps = np.asarray(LOG_EPS)
    level = y.mean(axis=1)
    # Median of 31 values is the 16th largest, which is what TopK yields in the graph.
    sorted_abs = np.sort(np.abs(np.diff(y, axis=1)), axis=1)
    rough = np.log(sorted_abs[:, MEDIAN_RANK] + eps)
    jump2 = np.log(sorted_abs[:, -2] + eps)

    bases = fit_bases()
    yc = np.swapaxes(y - level[:, None, :], 1, 2)  # [n, 3, 32]
    poly_coef = yc @ bases.poly  # [n, 3, 2]
    step_coef = yc @ bases.steps  # [n, 3, 31]
    best = np.argmax(step_coef * step_coef, axis=2)[..., None]
    best_coef = np.take_along_axis(step_coef, best, axis=2)[..., 0]
    trend = poly_coef[..., 0] * bases.rise - best_coef * bases.slope_corr[best[..., 0]]
    step_energy = best_coef * best_coef
    # The residual is formed explicitly, not as |y|^2 - |fit|^2: in float32 that
    # difference loses everything once a channel jumps to an error code.
    fit = poly_coef @ bases.poly.T + best_coef[..., None] * bases.steps.T[best[..., 0]]
    rss = ((yc - fit) ** 2).sum(axis=2)
    resid = 0.5 * np.log(rss / RESID_DOF + eps * eps)
    step = 0.5 * np.log(step_energy + eps * eps)
    return np.concatenate([level, trend, rough, step, resid, jump2], axis=1)


def combined_index(params: ModelParams, windows: NDArray[np.floating[Any]]) -> F64:
    """T^2 + Q of the standardised features, each scaled by its training limit."""
    z = (window_features(windows) - params.feat_mean) * params.feat_inv_std
    t = z @ params.components
    resid = z - t @ params.components.T
    return np.asarray((t * t) @ params.t2_weights + (resid * resid).sum(axis=1) * params.q_scale)


def range_term(params: ModelParams, windows: NDArray[np.floating[Any]]) -> F64:
    """Largest excursion beyond the (widened) training range, weighted per channel."""
    x = np.asarray(windows, dtype=np.float64)
    excess = np.maximum(x - params.range_hi, 0.0) + np.maximum(params.range_lo - x, 0.0)
    return np.asarray((excess * params.range_gain).max(axis=(1, 2)))


def score_windows(params: ModelParams, windows: NDArray[np.floating[Any]]) -> F64:
    """Numpy reference for the graph's ``score`` output (finite inputs only)."""
    return combined_index(params, windows) / params.threshold + range_term(params, windows)


def fit(train: Dataset, calib: Dataset) -> ModelParams:
    """Fit PCA on normal training windows; calibrate the threshold on other normal ones."""
    feats = window_features(train.windows[~train.labels])
    mean = feats.mean(axis=0)
    std = np.maximum(feats.std(axis=0), 1e-6)
    z = (feats - mean) / std
    eigval, eigvec = np.linalg.eigh(np.cov(z, rowvar=False))
    order = np.argsort(eigval)[::-1][:N_COMPONENTS]
    lam, comps = eigval[order], eigvec[:, order]
    # Eigenvectors are defined up to sign; pin it so the exported bytes are reproducible.
    flip = np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(comps.shape[1])])
    comps = comps * flip

    t = z @ comps
    t2 = ((t * t) / lam).sum(axis=1)
    resid = z - t @ comps.T
    q = (resid * resid).sum(axis=1)
    # Each statistic is scaled by its own 99th percentile so neither dominates the sum.
    t2_lim = float(np.quantile(t2, 0.99))
    q_lim = float(np.quantile(q, 0.99))

    raw_vals = train.windows[~train.labels].astype(np.float64)
    lo = raw_vals.min(axis=(0, 1))
    hi = raw_vals.max(axis=(0, 1))
    span = hi - lo
    params = ModelParams(
        feat_mean=mean,
        feat_inv_std=1.0 / std,
        components=comps,
        t2_weights=1.0 / (lam * t2_lim),
        q_scale=1.0 / q_lim,
        range_lo=lo - RANGE_MARGIN * span,
        range_hi=hi + RANGE_MARGIN * span,
        range_gain=RANGE_GAIN_PER_SPAN / span,
        threshold=1.0,
    )
    calib_index = combined_index(params, calib.windows[~calib.labels])
    threshold = float(np.quantile(calib_index, THRESHOLD_QUANTILE))
    return replace(params, threshold=threshold)


# --------------------------------------------------------------------------- ONNX


def build_onnx(params: ModelParams) -> onnx.ModelProto:
    """Express ``score_windows`` as an ONNX graph with a dynamic batch dimension."""
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: Any, dtype: type = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def i64(name: str, value: list[int]) -> str:
        return const(name, value, np.int64)

    bases = fit_bases()
    eps = np.asarray(LOG_EPS)
    n = helper.make_node
    nodes = [
        # Non-finite readings cannot be scored; report them as maximally anomalous.
        n("IsNaN", ["window"], ["nan"]),
        n("IsInf", ["window"], ["inf"]),
        n("Or", ["nan", "inf"], ["nonfinite"]),
        n("Cast", ["nonfinite"], ["nonfinite_f"], to=TensorProto.FLOAT),
        n("ReduceMax", ["nonfinite_f"], ["bad_f"], axes=[1, 2], keepdims=0),
        n("Cast", ["bad_f"], ["bad"], to=TensorProto.BOOL),
        # Temperature and humidity as read, vibration in the log domain.
        n("Slice", ["window", i64("c0", [0]), i64("c2", [2]), i64("axis2", [2])], ["th"]),
        n("Slice", ["window", "c2", i64("c3", [3]), "axis2"], ["vib"]),
        n("Max", ["vib", const("zero", 0.0)], ["vib_pos"]),
        n("Add", ["vib_pos", const("vib_offset", VIB_LOG_OFFSET)], ["vib_shift"]),
        n("Log", ["vib_shift"], ["vib_log"]),
        n("Concat", ["th", "vib_log"], ["y"], axis=2),
        # level
        n("ReduceMean", ["y"], ["level3"], axes=[1], keepdims=1),
        n("Flatten", ["level3"], ["level"], axis=1),
        # roughness and jump2 from the sorted |first differences| (TopK, descending)
        n("Slice", ["y", i64("s1", [1]), i64("s_end", [WINDOW]), i64("axis1", [1])], ["later"]),
        n("Slice", ["y", i64("s0", [0]), i64("s_last", [WINDOW - 1]), "axis1"], ["earlier"]),
        n("Sub", ["later", "earlier"], ["diff"]),
        n("Abs", ["diff"], ["abs_diff"]),
        n("TopK", ["abs_diff", i64("k_median", [MEDIAN_RANK + 1])], ["top", "top_idx"], axis=1),
        n(
            "Slice",
            ["top", i64("r_med", [MEDIAN_RANK]), i64("r_med1", [MEDIAN_RANK + 1]), "axis1"],
            ["median3"],
        ),
        n("Flatten", ["median3"], ["median"], axis=1),
        n("Add", ["median", const("eps", eps)], ["median_eps"]),
        n("Log", ["median_eps"], ["rough"]),
        n("Slice", ["top", "s1", i64("r2", [2]), "axis1"], ["second3"]),
        n("Flatten", ["second3"], ["second"], axis=1),
        n("Add", ["second", "eps"], ["second_eps"]),
        n("Log", ["second_eps"], ["jump2"]),
        # trend + best single step fit, per channel: [batch, 3, 32] @ bases
        n("Sub", ["y", "level3"], ["yc"]),
        n("Transpose", ["yc"], ["yct"], perm=[0, 2, 1]),
        n("MatMul", ["yct", const("poly", bases.poly)], ["poly_coef"]),
        n("MatMul", ["yct", const("steps", bases.steps)], ["step_coef"]),
        n("Mul", ["step_coef", "step_coef"], ["step_sq"]),
        n("ArgMax", ["step_sq"], ["best"], axis=2, keepdims=1),
        n("GatherElements", ["step_coef", "best"], ["best_coef"], axis=2),
        n("Gather", [const("slope_corr", bases.slope_corr), "best"], ["corr"], axis=0),
        n("Slice", ["poly_coef", "s0", "s1", "axis2"], ["lin_coef"]),
        n("Mul", ["lin_coef", const("rise", bases.rise)], ["lin_rise"]),
        n("Mul", ["best_coef", "corr"], ["lin_corr"]),
        n("Sub", ["lin_rise", "lin_corr"], ["trend3"]),
        n("Flatten", ["trend3"], ["trend"], axis=1),
        n("Mul", ["best_coef", "best_coef"], ["step_energy"]),
        # Explicit residual (float32 cannot afford |y|^2 - |fit|^2 after a big jump).
        n("MatMul", ["poly_coef", const("poly_t", bases.poly.T)], ["poly_fit"]),
        n("Gather", [const("steps_t", bases.steps.T), "best"], ["best_step4"], axis=0),
        n("Squeeze", ["best_step4", "axis2"], ["best_step"]),
        n("Mul", ["best_coef", "best_step"], ["step_fit"]),
        n("Sub", ["yct", "poly_fit"], ["after_poly"]),
        n("Sub", ["after_poly", "step_fit"], ["fit_resid"]),
        n("Mul", ["fit_resid", "fit_resid"], ["fit_resid_sq"]),
        n("ReduceSum", ["fit_resid_sq", "axis2"], ["rss"], keepdims=1),
        n("Mul", ["rss", const("inv_dof", 1.0 / RESID_DOF)], ["rss_mean"]),
        n("Add", ["rss_mean", const("eps_sq", (eps * eps)[:, None])], ["rss_eps"]),
        n("Log", ["rss_eps"], ["log_rss"]),
        n("Mul", ["log_rss", const("half", 0.5)], ["resid3"]),
        n("Flatten", ["resid3"], ["resid_std"], axis=1),
        n("Add", ["step_energy", "eps_sq"], ["step_eps"]),
        n("Log", ["step_eps"], ["log_step"]),
        n("Mul", ["log_step", "half"], ["step3"]),
        n("Flatten", ["step3"], ["step"], axis=1),
        n("Concat", ["level", "trend", "rough", "step", "resid_std", "jump2"], ["feat"], axis=1),
        # PCA: project, measure T^2 inside the subspace and Q outside it.
        n("Sub", ["feat", const("feat_mean", params.feat_mean)], ["feat_c"]),
        n("Mul", ["feat_c", const("feat_inv_std", params.feat_inv_std)], ["z"]),
        n("MatMul", ["z", const("components", params.components)], ["t"]),
        n("Mul", ["t", "t"], ["t_sq"]),
        n("MatMul", ["t_sq", const("t2_weights", params.t2_weights[:, None])], ["t2"]),
        n("Gemm", ["t", "components"], ["recon"], transB=1),
        n("Sub", ["z", "recon"], ["pca_resid"]),
        n("Mul", ["pca_resid", "pca_resid"], ["pca_resid_sq"]),
        n("ReduceSum", ["pca_resid_sq", "axis1"], ["q_raw"], keepdims=1),
        n("Mul", ["q_raw", const("q_scale", params.q_scale)], ["q"]),
        n("Add", ["t2", "q"], ["combined2d"]),
        n("Squeeze", ["combined2d", "axis1"], ["combined"]),
        # Range term on the raw readings.
        n("Sub", ["window", const("range_hi", params.range_hi)], ["over"]),
        n("Sub", [const("range_lo", params.range_lo), "window"], ["under"]),
        n("Relu", ["over"], ["over_p"]),
        n("Relu", ["under"], ["under_p"]),
        n("Add", ["over_p", "under_p"], ["excess"]),
        n("Mul", ["excess", const("range_gain", params.range_gain)], ["excess_w"]),
        n("ReduceMax", ["excess_w"], ["range_term"], axes=[1, 2], keepdims=0),
        n("Mul", ["combined", const("inv_threshold", 1.0 / params.threshold)], ["scaled"]),
        n("Add", ["scaled", "range_term"], ["finite_score"]),
        n("Where", ["bad", const("inf_score", np.inf), "finite_score"], ["score"]),
        n("Greater", ["score", const("one", 1.0)], ["is_anomaly"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sensor_anomaly",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["batch", WINDOW, 3])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["batch"]),
        ],
        initializer=inits,
    )
    graph.input[0].doc_string = (
        "32 consecutive readings, one a minute, channels [temperature degC, "
        "humidity %RH, vibration g RMS]"
    )
    graph.output[0].doc_string = "anomaly score, higher is more anomalous; 1.0 is the threshold"
    graph.output[1].doc_string = "score > 1.0 (also true for windows with NaN or inf)"
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="appliance models/build_sensor_anomaly.py",
        producer_version=MODEL_VERSION,
        doc_string=(
            "Anomaly detector for 32-sample windows of temperature, humidity and "
            "vibration: PCA combined T^2/Q index plus a range term, trained on "
            "synthetic data. is_anomaly = score > 1.0."
        ),
    )
    # Pin the IR version: make_model writes the newest one, which old runtimes refuse.
    model.ir_version = IR_VERSION
    channels = [{"name": c, "unit": u} for c, u in zip(CHANNELS, UNITS, strict=True)]
    helper.set_model_props(
        model,
        {
            "producer": "appliance models/build_sensor_anomaly.py",
            "name": MODEL_NAME,
            "version": MODEL_VERSION,
            "training_data": (
                f"synthetic, generated by the build script: {TRAIN_DEVICES} simulated "
                f"devices x {DAYS:g} days at {SAMPLE_PERIOD_S} s sampling (daily "
                "temperature cycle, weather, machine on/off vibration and heat, humidity "
                "from temperature via saturation vapour pressure, sensor noise), "
                "half-overlapping windows, normal only (seed "
                f"{TRAIN_SEED}); threshold calibrated on {CALIB_DEVICES} other devices "
                f"(seed {CALIB_SEED})"
            ),
            "channels": json.dumps(channels),
            "window_length": str(WINDOW),
            "sample_period_s": str(SAMPLE_PERIOD_S),
            "threshold": "1.0",
            "raw_threshold": f"{params.threshold:.6g}",
            "threshold_quantile": repr(THRESHOLD_QUANTILE),
            "anomaly_kinds": ",".join(ANOMALY_KINDS),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------- build


def run_model(model: Path | bytes, windows: F32) -> tuple[F32, NDArray[np.bool_]]:
    """Score ``windows`` with onnxruntime (imported lazily: only build/check need it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    score, flag = sess.run(["score", "is_anomaly"], {"window": windows})
    return np.asarray(score, dtype=np.float32), np.asarray(flag, dtype=bool)


def report(data: Dataset, flags: NDArray[np.bool_]) -> dict[str, float]:
    """Precision/recall/F1 overall, recall per anomaly kind, and the false-alarm rate."""
    tp = int((flags & data.labels).sum())
    fp = int((flags & ~data.labels).sum())
    fn = int((~flags & data.labels).sum())
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    out = {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
        "false_alarm_rate": fp / max(int((~data.labels).sum()), 1),
    }
    kinds = np.asarray(data.kinds)
    for kind in ANOMALY_KINDS:
        mask = kinds == kind
        out[f"recall_{kind}"] = float(flags[mask].mean()) if mask.any() else float("nan")
    return out


def manifest_text(sha256: str) -> str:
    """The manifest, formatted by hand: its keys are fixed and tomllib only reads."""
    return (
        f'name = "{MODEL_NAME}"\n'
        'runtime = "onnx"\n'
        'file = "model.onnx"\n'
        f'version = "{MODEL_VERSION}"\n'
        f'sha256 = "{sha256}"\n'
        'description = "Anomaly score for 32-sample windows of temperature (degC), '
        'humidity (%RH) and vibration (g RMS); score > 1.0 is anomalous"\n'
        "\n"
        "[options]\n"
        "threads = 1\n"
    )


def manifest_sha256(text: str) -> str | None:
    """The ``sha256`` value of a manifest, or None if it has none."""
    value = tomllib.loads(text).get("sha256")
    return value if isinstance(value, str) else None


def eval_dataset() -> Dataset:
    """Held-out evaluation windows: devices never seen in training, 20 % anomalies."""
    return generate_dataset(EVAL_SEED, n_devices=EVAL_DEVICES, days=DAYS, anomaly_fraction=0.2)


def build(out_dir: Path, *, verbose: bool = True) -> dict[str, float]:
    """Train, export, verify and evaluate; write model + manifest only if all is well."""
    train = generate_dataset(TRAIN_SEED, n_devices=TRAIN_DEVICES, days=DAYS)
    calib = generate_dataset(CALIB_SEED, n_devices=CALIB_DEVICES, days=DAYS)
    params = fit(train, calib)
    payload = build_onnx(params).SerializeToString(deterministic=True)

    evaluation = eval_dataset()
    score, flags = run_model(payload, evaluation.windows)
    reference = score_windows(params, evaluation.windows)
    # The graph computes in float32; a mismatch beyond that means the export is wrong.
    if not np.allclose(score, reference, rtol=1e-3, atol=1e-3):
        worst = float(np.max(np.abs(score - reference)))
        raise RuntimeError(f"ONNX graph disagrees with the numpy scorer (max diff {worst:.3g})")
    metrics = report(evaluation, flags)
    if verbose:
        print(
            f"windows: train {len(train.windows)}, calibration {len(calib.windows)}, "
            f"held-out eval {len(evaluation.windows)} ({int(evaluation.labels.sum())} anomalous)"
        )
        print(f"raw threshold {params.threshold:.4f} (calibration {THRESHOLD_QUANTILE} quantile)")
        for key, value in metrics.items():
            print(f"{key:>22}: {value:.4f}")
    # Refuse to ship a detector that got worse (a simulator or feature change gone wrong).
    if min(metrics["precision"], metrics["recall"]) < QUALITY_FLOOR:
        raise RuntimeError(f"held-out precision/recall below {QUALITY_FLOOR}: {metrics}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    model_path.write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    (out_dir / "manifest.toml").write_text(manifest_text(sha), encoding="utf-8")
    if verbose:
        print(f"wrote {model_path} ({len(payload)} bytes, sha256 {sha})")
    return metrics


def check(model_dir: Path) -> list[str]:
    """Problems with the model in ``model_dir`` against a fresh rebuild (empty: none)."""
    model_path = model_dir / "model.onnx"
    manifest_path = model_dir / "manifest.toml"
    if not model_path.is_file() or not manifest_path.is_file():
        return [f"{model_dir} must hold model.onnx and manifest.toml"]
    problems: list[str] = []
    committed = model_path.read_bytes()
    manifest = manifest_path.read_text(encoding="utf-8")
    actual = hashlib.sha256(committed).hexdigest()
    if manifest_sha256(manifest) != actual:
        problems.append(
            f"{manifest_path}: sha256 {manifest_sha256(manifest)} does not match "
            f"model.onnx ({actual})"
        )
    elif manifest != manifest_text(actual):
        problems.append(f"{manifest_path}: differs from what the build writes")

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), verbose=False)
        fresh = (Path(tmp) / "model.onnx").read_bytes()
    if fresh != committed:
        # Another numpy/BLAS build may move the last bits; the outputs decide below.
        print("note: the rebuilt model.onnx is not byte-identical", file=sys.stderr)
    data = generate_dataset(CHECK_SEED, n_devices=8, days=1.0, anomaly_fraction=0.2)
    old_score, old_flag = run_model(committed, data.windows)
    new_score, new_flag = run_model(fresh, data.windows)
    if not np.allclose(old_score, new_score, rtol=1e-4, atol=1e-5):
        worst = float(np.max(np.abs(old_score - new_score)))
        problems.append(f"scores differ from a fresh rebuild (max abs diff {worst:.3g})")
    # Flags may only differ where the score sits on the threshold itself.
    clear = np.abs(new_score - 1.0) > 1e-4
    if np.any((old_flag != new_flag) & clear):
        problems.append("is_anomaly differs from a fresh rebuild")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line: build (default) or ``--check``; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Build (or verify) the default sensor-anomaly ONNX model."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / MODEL_NAME,
        help="model directory (default: sensor-anomaly/ next to this script)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="verify the model and manifest in --out against a fresh build; write nothing",
    )
    args = parser.parse_args(argv)
    if not args.check:
        build(args.out)
        return 0
    problems = check(args.out)
    for problem in problems:
        print(f"check failed: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.out}: model and manifest match a fresh build")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
