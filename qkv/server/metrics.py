"""Prometheus metrics for one server: cache and queue state from ``engine.stats()``, plus
latency histograms the engine thread observes.

Every family exists twice: qkv's own ``qkv_*`` names (unlabelled), and vLLM's ``vllm:*``
names with a ``model_name`` label, so dashboards and autoscalers written for vLLM find them
(VLLM_GAUGES / VLLM_COUNTERS below, and the histograms).

Each app gets its own CollectorRegistry (never the global one), so several servers can live
in one process, as the tests make them. Under ``--api-server-count N`` each front end is a
process of its own: the supervisor gives them one fresh ``PROMETHEUS_MULTIPROC_DIR``, each
front end's histograms and counters are written there (prometheus_client's multiprocess
mode), and a scrape of any front end sums them all; the engine's gauges and token counters
come from the stats every front end receives, so they are the same whichever answers.
"""

from __future__ import annotations

import functools
import os
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

# vLLM's names (v1 engine), labelled model_name. A callable reads a derived value.
VLLM_GAUGES = {
    "vllm:num_requests_running": ("num_running", "sequences being computed"),
    "vllm:num_requests_waiting": ("num_waiting", "sequences queued for admission"),
    "vllm:kv_cache_usage_perc": (lambda s: _usage(s), "KV cache usage: 1 means every block is in use"),
    "vllm:gpu_cache_usage_perc": (lambda s: _usage(s), "KV cache usage (vLLM's older name)"),
}
VLLM_COUNTERS = {
    "vllm:num_preemptions": ("num_preemptions", "requests preempted because the KV pool ran dry"),
    "vllm:prompt_tokens": ("num_prompt_tokens", "prompt tokens admitted"),
    "vllm:generation_tokens": ("num_generated_tokens", "tokens generated"),
    "vllm:prefix_cache_queries": ("num_prompt_tokens", "prompt tokens looked up in the prefix cache"),
    "vllm:prefix_cache_hits": ("num_cached_prompt_tokens", "prompt tokens served from the prefix cache"),
}


def _usage(s: dict) -> float:
    total = s.get("num_blocks_total", 0)
    return s.get("num_blocks_in_use", 0) / total if total else 0.0


def _value(s: dict, key) -> float:
    return float(key(s) if callable(key) else s.get(key, 0))


class _StatsCollector:
    def __init__(self, stats: Callable[[], dict], model_name: str):
        self._stats = stats
        self._model = model_name

    def collect(self):
        s = self._stats()
        for name, (key, help_) in GAUGES.items():
            yield GaugeMetricFamily(name, help_, value=float(s.get(key, 0)))
        for name, (key, help_) in COUNTERS.items():
            yield CounterMetricFamily(name, help_, value=float(s.get(key, 0)))
        for name, (key, help_) in VLLM_GAUGES.items():
            g = GaugeMetricFamily(name, help_, labels=["model_name"])
            g.add_metric([self._model], _value(s, key))
            yield g
        for name, (key, help_) in VLLM_COUNTERS.items():
            c = CounterMetricFamily(name, help_, labels=["model_name"])
            c.add_metric([self._model], _value(s, key))
            yield c


class _Both:
    """One observation, recorded in qkv's family and in vLLM's (labelled) one."""

    def __init__(self, *metrics):
        self._metrics = metrics

    def observe(self, value: float) -> None:
        for m in self._metrics:
            m.observe(value)

    def labels(self, **labels) -> "_Both":
        """qkv's ``finish_reason`` label is vLLM's ``finished_reason``."""
        ours, theirs = self._metrics  # theirs: vLLM's labels() with model_name bound
        return _Both(ours.labels(**labels), theirs(finished_reason=labels["finish_reason"]))

    def inc(self, amount: float = 1) -> None:
        for m in self._metrics:
            m.inc(amount)


class ServerMetrics:
    """Owns the registry. ``stats`` returns the latest engine stats dict (any thread)."""

    def __init__(self, stats: Callable[[], dict], model_name: str = "qkv"):
        self.registry = r = CollectorRegistry()
        r.register(_StatsCollector(stats, model_name))

        def both(kind, name: str, help_: str, **kw):
            theirs = kind(f"vllm:{name}", help_, ["model_name"], registry=r, **kw).labels(model_name=model_name)
            return _Both(kind(f"qkv_{name}", help_, registry=r, **kw), theirs)

        self.ttft = both(Histogram, "time_to_first_token_seconds", "time from arrival to the first token",
                         buckets=TTFT_BUCKETS)
        # vLLM's v1 name; its older time_per_output_token_seconds measured the same gaps
        self.itl = both(Histogram, "inter_token_latency_seconds", "time between a sequence's tokens",
                        buckets=ITL_BUCKETS)
        self.e2e = both(Histogram, "e2e_request_latency_seconds", "time from arrival to the last token",
                        buckets=E2E_BUCKETS)
        theirs = Counter("vllm:request_success", "sequences finished, by reason", ["model_name", "finished_reason"],
                         registry=r)
        self.requests = _Both(
            Counter("qkv_requests_finished", "sequences finished, by reason", ["finish_reason"], registry=r),
            functools.partial(theirs.labels, model_name=model_name))

        self._view = r  # what a scrape renders
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:  # one of several front-end processes: every front end's observations, summed
            from prometheus_client import multiprocess

            self._view = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._view, path=shared)
            self._view.register(_StatsCollector(stats, model_name))

    def finished(self, reason: str, seconds: float) -> None:
        self.requests.labels(finish_reason=reason).inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self._view)
