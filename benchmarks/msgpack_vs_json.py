"""MessagePack against JSON (and Triton's binary extension) for one realistic tensor.

The tensor is what a gateway sends the default ``sensor-anomaly`` model: a batch of windows
of 32 readings x 3 channels (temperature, humidity, vibration), FP32. For each batch size
and encoding it measures the body size, the client's encode time, the appliance's decode
time (the same decoder functions the daemon runs) and the full HTTP round trip against a
real daemon on loopback (encode, POST /v2/models/sensor-anomaly/infer, run the model,
decode the answer), and prints a Markdown table of absolute figures and ratios to JSON.
Results are also saved to ``benchmarks/results/msgpack_vs_json.json``.

    python benchmarks/msgpack_vs_json.py [--batches 1 64 1024] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np

from appliance import config as config_mod
from appliance.protocol import oip, oip_msgpack
from appliance.server import Server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "sensor-anomaly"
HEADER = "Inference-Header-Content-Length"


def tensor(batch: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    rng = np.random.default_rng(batch)
    base = np.array([21.5, 45.0, 0.02], dtype=np.float32)
    return (base + rng.normal(0, [0.4, 1.5, 0.01], (batch, 32, 3))).astype(np.float32)


# ----------------------------------------------------------------------- encodings
# Each: values -> (body, headers); and the server-side decode of that body.


def json_encode(values: np.ndarray[Any, Any]) -> tuple[bytes, dict[str, str]]:
    body = {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(values.shape),
                "data": values.reshape(-1).tolist(),
            }
        ]
    }
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def json_decode(body: bytes, headers: dict[str, str]) -> oip.DecodedRequest:
    return oip.decode_request(json.loads(body))


def binary_encode(values: np.ndarray[Any, Any]) -> tuple[bytes, dict[str, str]]:
    raw = values.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "window",
                    "datatype": "FP32",
                    "shape": list(values.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + raw, {"Content-Type": "application/octet-stream", HEADER: str(len(header))}


def binary_decode(body: bytes, headers: dict[str, str]) -> oip.DecodedRequest:
    split = int(headers[HEADER])
    return oip.decode_request(json.loads(body[:split]), body[split:])


def msgpack_encode(values: np.ndarray[Any, Any]) -> tuple[bytes, dict[str, str]]:
    body = {
        "inputs": [
            {
                "name": "window",
                "datatype": "FP32",
                "shape": list(values.shape),
                "data": values.astype("<f4").tobytes(),
            }
        ]
    }
    return msgpack.packb(body), {"Content-Type": oip_msgpack.CONTENT_TYPE}


def msgpack_decode(body: bytes, headers: dict[str, str]) -> oip.DecodedRequest:
    return oip_msgpack.decode_request(oip_msgpack.unpack(body))


ENCODINGS: dict[
    str,
    tuple[
        Callable[..., tuple[bytes, dict[str, str]]],
        Callable[[bytes, dict[str, str]], oip.DecodedRequest],
    ],
] = {
    "JSON": (json_encode, json_decode),
    "JSON + binary extension": (binary_encode, binary_decode),
    "MessagePack": (msgpack_encode, msgpack_decode),
}


def read_answer(name: str, raw: bytes, headers: Any) -> np.ndarray[Any, Any]:
    """The ``score`` output from an answer in ``name``'s encoding, as the client sees it."""
    if name == "MessagePack":
        outputs = msgpack.unpackb(raw)["outputs"]
        return np.frombuffer(outputs[0]["data"], "<f4")
    if name == "JSON":
        return np.asarray(json.loads(raw)["outputs"][0]["data"], dtype=np.float32)
    split = int(headers[HEADER])
    outputs = json.loads(raw[:split])["outputs"]
    return np.frombuffer(raw[split : split + outputs[0]["parameters"]["binary_data_size"]], "<f4")


def best_of(fn: Callable[[], object], rounds: int) -> float:
    """Median seconds of ``fn`` over ``rounds`` runs (after a warm-up run)."""
    fn()
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def round_trips(url: str, name: str, values: np.ndarray[Any, Any], rounds: int) -> float:
    encode, _ = ENCODINGS[name]
    samples = []
    async with aiohttp.ClientSession() as session:
        for i in range(rounds + 3):
            started = time.perf_counter()
            body, headers = encode(values)
            async with session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
                assert response.status == 200, raw[:200]
                score = read_answer(name, raw, response.headers)
            if i >= 3:  # warm-up
                samples.append(time.perf_counter() - started)
            assert score.shape == (values.shape[0],)
    return statistics.median(samples)


async def measure(batches: list[int], rounds: int) -> list[dict[str, Any]]:
    config = config_mod.load(
        env={},
        overrides={
            "http": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 256 * 1024 * 1024},
            "models": {"dir": str(ROOT / "models")},
            "mqtt": {"enabled": False},
            "mdns": {"enabled": False},
        },
    )
    server = Server(config)
    await server.startup()
    rows = []
    try:
        assert server.core is not None
        await server.core.models.wait_loaded()
        url = f"http://127.0.0.1:{server.port}/v2/models/{MODEL}/infer"
        for batch in batches:
            values = tensor(batch)
            n = max(5, rounds // max(1, batch // 64))
            for name, (encode, decode) in ENCODINGS.items():
                body, headers = encode(values)
                rows.append(
                    {
                        "batch": batch,
                        "shape": list(values.shape),
                        "raw_bytes": values.nbytes,
                        "encoding": name,
                        "body_bytes": len(body),
                        "encode_s": best_of(functools.partial(encode, values), n),
                        "decode_s": best_of(functools.partial(decode, body, headers), n),
                        "round_trip_s": await round_trips(url, name, values, n),
                    }
                )
    finally:
        await server.shutdown()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| windows [n,32,3] FP32 | encoding | body | × JSON | encode | × JSON | decode "
        "| × JSON | HTTP round trip | × JSON |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def x(value: float, ref: float) -> str:
        return f"{value / ref:.2g}"

    for row in rows:
        ref = next(r for r in rows if r["batch"] == row["batch"] and r["encoding"] == "JSON")
        lines.append(
            f"| {row['batch']} ({row['raw_bytes']:,} B raw) | {row['encoding']} "
            f"| {row['body_bytes']:,} B | {x(row['body_bytes'], ref['body_bytes'])} "
            f"| {row['encode_s'] * 1e6:,.1f} µs | {x(row['encode_s'], ref['encode_s'])} "
            f"| {row['decode_s'] * 1e6:,.1f} µs | {x(row['decode_s'], ref['decode_s'])} "
            f"| {row['round_trip_s'] * 1e3:,.2f} ms "
            f"| {x(row['round_trip_s'], ref['round_trip_s'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.batches, args.rounds))
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "msgpack_vs_json.json"
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "processor": platform.processor() or platform.machine(),
                },
                "rows": rows,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    print(f"\nsaved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
