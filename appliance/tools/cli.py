"""``appliance models quantize``: the command-line side of :mod:`appliance.tools.quantize`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    q.add_argument("--scheme", choices=["dynamic", "static"], default="dynamic",
                   help="ONNX: dynamic (weights) or static (activations too; needs "
                   "--calibration)")
    q.add_argument("--calibration", type=Path, metavar="NPZ",
                   help="ONNX: .npz with one array per input, samples first")
    q.add_argument("--eval", type=Path, metavar="NPZ",
                   help="ONNX: evaluation inputs (default: the calibration data)")
    q.add_argument("--per-channel", action="store_true", help="ONNX: per-channel weights")
    q.add_argument("--type", default="q8_0", choices=GGUF_TYPES,
                   help="GGUF: target type (default q8_0)")
    q.add_argument("--text", type=Path, metavar="FILE",
                   help="GGUF: text to measure perplexity on (default: a short story)")
    q.add_argument("--threads", type=int, default=2, help="GGUF: threads")
    q.add_argument("--no-cpu-repack", dest="cpu_repack", action="store_false",
                   help="GGUF: measure without CPU weight repacking (the model option "
                   "cpu_repack = false)")
    q.add_argument("--as-json", action="store_true", help="print the report as JSON")


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
            report = quantize.quantize_onnx(source, args.output, args.scheme,
                                            calibration=calibration, evaluation=evaluation,
                                            per_channel=args.per_channel)
        elif source.suffix.lower() == ".gguf":
            text = args.text.read_text(encoding="utf-8") if args.text else None
            report = quantize.quantize_gguf(source, args.output, args.type, eval_text=text,
                                            threads=args.threads, cpu_repack=args.cpu_repack)
        else:
            print(f"appliance: {source}: only .onnx and .gguf files can be quantized",
                  file=sys.stderr)
            return 2
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    print(quantize.report_json(report) if args.as_json else report.text())
    return 0
