"""Engine benchmarks: offline throughput and the prefix cache's payoff.

    bench_throughput(llm, num_requests=16, in_range=(16, 128), out_range=(16, 64), seed=0)
    bench_prefix(lambda cache: LLM("smollm2", enable_prefix_caching=cache), 16, 256, 16, 16)

Both submit every request at once and drive ``llm.engine.step()`` themselves, so time to
first token (TTFT) is measured per request, from its submission to the step that returned
its first token (``time.perf_counter``). Prompts are random token ids and generation ignores
EOS, like nano-vllm's bench.py: the work is fixed by the seed, whatever the model says.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

from qkv.engine.request import SamplingParams


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _run(llm, work: list[tuple[list[int], SamplingParams]]) -> dict:
    """Submit ``work`` at once, step to the end; throughput and TTFT of this run alone."""
    engine = llm.engine
    before = engine.stats()
    submitted, first = {}, {}
    out_tokens = 0
    t0 = time.perf_counter()
    for ids, params in work:
        for req in engine.add_request(ids, params):
            submitted[req.request_id] = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            out_tokens += 1
            first.setdefault(out.request_id, now - submitted[out.request_id])
    elapsed = time.perf_counter() - t0
    after = engine.stats()
    ttft = list(first.values())
    prompt = after["num_prompt_tokens"] - before["num_prompt_tokens"]
    hit = after["num_cached_prompt_tokens"] - before["num_cached_prompt_tokens"]
    return {
        "num_requests": len(work),
        "input_tokens": sum(len(ids) for ids, _ in work),
        "output_tokens": out_tokens,
        "elapsed_s": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(len(ids) for ids, _ in work)) / elapsed,
        "first_token_s": min(ttft),  # the engine's first answer in this run (cold: after start-up)
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "prefix_hit_rate": hit / prompt if prompt else 0.0,
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
    }


def _random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(min(vocab, 10_000)) for _ in range(n)]


def bench_throughput(llm, num_requests: int, in_range: tuple[int, int], out_range: tuple[int, int],
                     seed: int = 0) -> dict:
    """``num_requests`` prompts of random length in ``in_range`` generating a random number of
    tokens in ``out_range`` (inclusive), all submitted at once. Returns output tok/s and
    mean/p50/p99 TTFT in seconds (see ``_run`` for every key)."""
    work = [(ids, SamplingParams(max_tokens=n_out, temperature=0.6, ignore_eos=True, seed=seed * 100_003 + i))
            for i, (ids, n_out) in enumerate(workload(num_requests, in_range, out_range, seed, llm.config.vocab_size))]
    return _run(llm, work)


def workload(num_requests: int, in_range: tuple[int, int], out_range: tuple[int, int], seed: int,
             vocab: int) -> list[tuple[list[int], int]]:
    """``bench_throughput``'s requests as (prompt ids, output length): a peer replays the same."""
    if num_requests < 1 or in_range[0] < 1 or out_range[0] < 1:
        raise ValueError("num_requests and the lower ends of in_range and out_range must be >= 1")
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        n_in, n_out = rng.randint(*in_range), rng.randint(*out_range)
        work.append((_random_ids(rng, n_in, vocab), n_out))
    return work


def bench_prefix(llm_factory: Callable[[bool], object], num_requests: int, system_prompt_tokens: int,
                 suffix_tokens: int, out_tokens: int, seed: int = 0) -> dict:
    """Requests that share a ``system_prompt_tokens`` prefix, each with its own
    ``suffix_tokens`` and ``out_tokens`` greedy tokens, with the prefix cache on and off.

    ``llm_factory(enable_prefix_caching)`` builds the engine for each mode. Before timing, one
    request with the bare system prompt runs in both modes (warm-up, and with the cache on it
    leaves the shared prefix cached, as a server's earlier traffic would). Returns
    ``{"cache_on": {...}, "cache_off": {...}, "speedup": on/off output tok/s, "ttft_ratio":
    off/on mean TTFT}``."""
    results = {}
    for mode, cache in (("cache_off", False), ("cache_on", True)):
        llm = llm_factory(cache)
        vocab = llm.config.vocab_size
        r = random.Random(seed)
        system = _random_ids(r, system_prompt_tokens, vocab)
        work = [(system + _random_ids(r, suffix_tokens, vocab),
                 SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)) for _ in range(num_requests)]
        _run(llm, [(system, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))])
        results[mode] = _run(llm, work)
        del llm  # one engine (and its KV pool) alive at a time
    on, off = results["cache_on"], results["cache_off"]
    results["speedup"] = on["output_tok_s"] / off["output_tok_s"]
    results["ttft_ratio"] = off["ttft_mean_s"] / on["ttft_mean_s"]
    return results
