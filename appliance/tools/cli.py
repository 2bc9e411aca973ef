"""``appliance models quantize``: the command-line side of :mod:`appliance.tools.quantize`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from appliance.tools import GGUF_TYPES


def add_quantize(models_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``quantize`` under the ``models`` command."""
    q = models_sub.add_parser(
        "quantize",
        help="quantize a model: ONNX FP32 → INT8, GGUF → Q8_0/Q4_K_M/...; reports size, "
        "speed and accuracy before and after",
    )
    q.add_argument("source", type=Path, help="the .onnx or .gguf file")
    q.add_argument("output", type=Path, help="where the quantized file goes")
    q.add_argument(
        "--scheme",
        choices=["dynamic", "static"],
        default="dynamic",
        help="ONNX: dynamic (weights) or static (activations too; needs --calibration)",
    )
    q.add_argument(
        "--calibration",
        type=Path,
        metavar="NPZ",
        help="ONNX: .npz with one array per input, samples first",
    )
    q.add_argument(
        "--eval",
        type=Path,
        metavar="NPZ",
        help="ONNX: evaluation inputs (default: the calibration data)",
    )
    q.add_argument("--per-channel", action="store_true", help="ONNX: per-channel weights")
    q.add_argument(
        "--type", default="q8_0", choices=GGUF_TYPES, help="GGUF: target type (default q8_0)"
    )
    q.add_argument(
        "--text",
        type=Path,
        metavar="FILE",
        help="GGUF: text to measure perplexity on (default: a short story)",
    )
    q.add_argument("--threads", type=int, default=2, help="GGUF: threads")
    q.add_argument(
        "--no-cpu-repack",
        dest="cpu_repack",
        action="store_false",
        help="GGUF: measure without CPU weight repacking (the model option cpu_repack = false)",
    )
    q.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="print the report as JSON (like `appliance models --json`)",
    )
    # The spelling of earlier releases, still accepted.
    q.add_argument("--as-json", dest="as_json", action="store_true", help=argparse.SUPPRESS)


class ProgressBar:
    """One line redrawn in place on a terminal (``\\r``); silent when ``out`` is no terminal
    (a pipe or a log wants the report, not a hundred redraws)."""

    WIDTH = 30

    def __init__(self, out: TextIO, label: str) -> None:
        self._out = out
        self._label = label
        self._on = out.isatty()
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self._on or total <= 0:
            return
        filled = self.WIDTH * min(done, total) // total
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._out.write(f"\r{self._label} [{bar}] {done}/{total} tensors")
        if done >= total:
            self._out.write("; measuring before and after...")
        self._out.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


def run_quantize(args: argparse.Namespace) -> int:
    from appliance.tools import quantize  # numpy and onnx: only when a model is quantized

    source: Path = args.source
    if not source.is_file():
        print(f"appliance: {source} does not exist", file=sys.stderr)
        return 2
    try:
        if source.suffix.lower() == ".onnx":
            calibration = quantize.load_samples(args.calibration) if args.calibration else None
            evaluation = quantize.load_samples(args.eval) if args.eval else None
            report = quantize.quantize_onnx(
                source,
                args.output,
                args.scheme,
                calibration=calibration,
                evaluation=evaluation,
                per_channel=args.per_channel,
            )
        elif source.suffix.lower() == ".gguf":
            text = args.text.read_text(encoding="utf-8") if args.text else None
            bar = ProgressBar(sys.stderr, f"quantizing to {args.type}")
            try:
                report = quantize.quantize_gguf(
                    source,
                    args.output,
                    args.type,
                    eval_text=text,
                    threads=args.threads,
                    cpu_repack=args.cpu_repack,
                    progress=bar,
                )
            finally:
                bar.close()
        else:
            print(
                f"appliance: {source}: only .onnx and .gguf files can be quantized", file=sys.stderr
            )
            return 2
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(quantize.report_json(report) if args.as_json else report.text())
    return 0
