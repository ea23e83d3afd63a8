"""Prometheus metrics for one server: cache and queue state from ``engine.stats()``, plus
latency histograms the engine thread observes.

Each app gets its own CollectorRegistry (never the global one), so several servers can live
in one process, as the tests make them.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds. CPU decoding is slow and GPU decoding fast: the buckets span both.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# name -> (stats key, help); read from the latest stats snapshot at scrape time.
GAUGES = {
    "qkv_kv_blocks_total": ("num_blocks_total", "KV cache blocks in the pool"),
    "qkv_kv_blocks_in_use": ("num_blocks_in_use", "KV blocks referenced by running requests"),
    "qkv_kv_blocks_cached": ("num_blocks_cached", "unreferenced KV blocks kept for prefix reuse"),
    "qkv_kv_blocks_free": ("num_blocks_free", "KV blocks holding nothing"),
    "qkv_prefix_cache_hit_rate": ("prefix_cache_hit_rate",
                                  "prompt tokens served from the prefix cache / prompt tokens"),
    "qkv_requests_running": ("num_running", "sequences being computed"),
    "qkv_requests_waiting": ("num_waiting", "sequences queued for admission"),
}
# Counter families: prometheus appends _total, e.g. qkv_num_preemptions_total.
COUNTERS = {
    "qkv_num_preemptions": ("num_preemptions", "requests preempted because the KV pool ran dry"),
    "qkv_prompt_tokens": ("num_prompt_tokens", "prompt tokens admitted"),
    "qkv_cached_prompt_tokens": ("num_cached_prompt_tokens", "prompt tokens served from the prefix cache"),
    "qkv_generation_tokens": ("num_generated_tokens", "tokens generated"),
}


class _StatsCollector:
    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        for name, (key, help_) in GAUGES.items():
            yield GaugeMetricFamily(name, help_, value=float(s.get(key, 0)))
        for name, (key, help_) in COUNTERS.items():
            yield CounterMetricFamily(name, help_, value=float(s.get(key, 0)))


class ServerMetrics:
    """Owns the registry. ``stats`` returns the latest engine stats dict (any thread)."""

    def __init__(self, stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats))
        self.ttft = Histogram("qkv_time_to_first_token_seconds", "time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("qkv_inter_token_latency_seconds", "time between a sequence's tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("qkv_e2e_request_latency_seconds", "time from arrival to the last token",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.requests = Counter("qkv_requests_finished", "sequences finished, by reason", ["finish_reason"],
                                registry=self.registry)

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(finish_reason=reason).inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
