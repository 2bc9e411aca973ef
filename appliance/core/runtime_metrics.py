"""Metrics the runtimes keep themselves, read when ``/metrics`` is scraped.

Runtimes count their own batches (:class:`~appliance.runtimes.base.RuntimeStats`) without
knowing about Prometheus; this collector turns those counters into
``appliance_batch_size`` (requests per ONNX run, sequences per llama.cpp decode step) and
``appliance_prompt_tokens_cached_total`` (prompt tokens found in a slot's KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.runtimes.base import BATCH_BUCKETS, Runtime


class RuntimeCollector(Collector):
    """Exports the stats of every loaded runtime, by model name."""

    def __init__(self, runtimes: Callable[[], Iterable[tuple[str, Runtime]]]) -> None:
        self._runtimes = runtimes

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        batch, cached = families
        for name, runtime in self._runtimes():
            stats = runtime.stats
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*map(str, BATCH_BUCKETS), "+Inf"), list(stats.batch_buckets), strict=True
            ):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            batch.add_metric([name], buckets, float(stats.batch_sum))
            if stats.cached_prompt_tokens:
                cached.add_metric([name], float(stats.cached_prompt_tokens))
        yield from families

    @staticmethod
    def _families() -> tuple[HistogramMetricFamily, CounterMetricFamily]:
        return (
            HistogramMetricFamily(
                "appliance_batch_size",
                "Requests per model run (ONNX) or sequences per decode step (GGUF).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "appliance_prompt_tokens_cached",
                "Prompt tokens reused from a slot's KV cache instead of decoded (GGUF).",
                labels=["model"],
            ),
        )
