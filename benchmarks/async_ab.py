"""Offline throughput with async scheduling off, then on, on one random-weight engine (CUDA).

Both runs must give the same greedy tokens; prints tokens/s of each and the mean step time
against the bare decode-graph replay. Usage (on a GPU machine, from the repo root):

    PYTHONPATH=. python benchmarks/async_ab.py --shape llama3-8b --requests 256 --input-len 512 --output-len 256
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def run(eng, prompts, output_len: int) -> tuple[list[list[int]], float, int]:
    from qkv.engine.request import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    reqs = [r for p in prompts for r in eng.add_request(p, params)]
    decode = []  # wall time of each step launched while no prompt was left to compute
    while eng.has_unfinished():
        pure = not eng.scheduler.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens
                                                 for r in eng.scheduler.running)
        s = time.perf_counter()
        eng.step()
        if pure:
            decode.append(time.perf_counter() - s)
    torch.cuda.synchronize()
    return [r.output_token_ids for r in reqs], time.perf_counter() - t, decode


def profile_decode(eng, prompts) -> None:
    """cProfile of 30 pure decode steps per mode: where the host's time goes (with async
    scheduling, time spent waiting for the device shows up in PendingTokens.pop)."""
    import cProfile
    import pstats

    from qkv.engine.request import SamplingParams

    for mode in (False, True):
        eng.async_scheduling = mode
        reqs = [r for p in prompts for r in eng.add_request(p, SamplingParams(max_tokens=64, temperature=0,
                                                                              ignore_eos=True))]
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
            eng.step()
        for _ in range(3):
            eng.step()
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        t = time.perf_counter()
        prof.enable()
        for _ in range(30):
            eng.step()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- async_scheduling={mode}: {(time.perf_counter() - t) / 30 * 1e3:.2f} ms/step (profiled)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        while eng.has_unfinished():
            eng.step()


def gpu_timeline(eng, prompts) -> None:
    """CUDA events around every decode-graph replay for 50 steps per mode (each mode twice): the device time
    of a replay, and the device time between one replay's end and the next one's start
    (staging copy, gather, sampling; or idling while the host catches up)."""
    from qkv.engine.request import SamplingParams

    graphs = eng.runner.graphs
    marks = []
    replay = graphs.run.__func__

    def timed(self, sched, prev=None):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        size = next(s for s in self.sizes if s >= len(sched.requests))
        graph = self.graphs[size]
        orig = graph.replay

        def rep():
            start.record()
            orig()
            end.record()
        graph.replay = rep
        try:
            return replay(self, sched, *([] if prev is None else [prev]))  # older engines take no prev
        finally:
            graph.replay = orig
            marks.append((start, end))

    graphs.run = timed.__get__(graphs)
    try:
        for mode in (False, True, False, True):
            eng.async_scheduling = mode
            reqs = [r for p in prompts for r in eng.add_request(p, SamplingParams(max_tokens=64, temperature=0,
                                                                                  ignore_eos=True))]
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
                eng.step()
            marks.clear()
            for _ in range(50):
                eng.step()
            torch.cuda.synchronize()
            inside = [s.elapsed_time(e) for s, e in marks]
            between = [e.elapsed_time(s2) for (_, e), (s2, _) in zip(marks, marks[1:])]
            print(json.dumps(dict(async_scheduling=mode, replay_ms_mean=round(sum(inside) / len(inside), 3),
                                  between_replays_ms_mean=round(sum(between) / len(between), 3))), flush=True)
            while eng.has_unfinished():
                eng.step()
    finally:
        del graphs.run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--long", type=int, default=0, metavar="N", help="also N requests of 1000 in / 1000 out")
    ap.add_argument("--profile", action="store_true", help="cProfile 30 decode steps in each mode")
    ap.add_argument("--timeline", action="store_true", help="device time in and between decode replays")
    ap.add_argument("--skip-runs", action="store_true", help="only --profile / --timeline")
    args = ap.parse_args()
    import qkv
    from qkv.tools.shapes import random_engine

    print(f"qkv from {qkv.__file__}", flush=True)

    eng = random_engine(args.shape, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=4096, gpu_memory_utilization=0.9)
    V = eng.config.vocab_size

    def prompts(n: int, length: int) -> list[list[int]]:  # the same for both modes
        rng = random.Random(length)
        return [[rng.randrange(10, V) for _ in range(length)] for _ in range(n)]

    run(eng, prompts(64, args.input_len), 32)  # warm-up: every kernel variant the mixed steps use
    eng.kv.enable_prefix_caching = False  # the second run must not hit the first one's blocks
    workloads = [(args.requests, args.input_len, args.output_len)]
    if args.long:
        workloads.append((args.long, 1000, 1000))
    for n_req, n_in, n_out in ([] if args.skip_runs else workloads):
        results = {}
        for mode in (False, True):
            eng.async_scheduling = mode  # nothing is in flight between runs, so it may be flipped
            tokens, secs, decode = run(eng, prompts(n_req, n_in), n_out)
            out = sum(map(len, tokens))
            results[mode] = tokens
            s = eng.stats()
            decode.sort()
            print(json.dumps(dict(async_scheduling=mode, requests=n_req, input_len=n_in, output_len=n_out,
                                  seconds=round(secs, 3), out_tok_s=round(out / secs, 1),
                                  total_tok_s=round((out + n_req * n_in) / secs, 1), decode_steps=len(decode),
                                  decode_step_ms_median=round(decode[len(decode) // 2] * 1e3, 3) if decode else None,
                                  decode_seconds=round(sum(decode), 3), preemptions=s["num_preemptions"],
                                  blocks_in_use=s["num_blocks_in_use"])), flush=True)
        print(json.dumps(dict(identical_tokens=results[False] == results[True])))
    if args.profile:
        profile_decode(eng, prompts(args.requests, args.input_len))
    if args.timeline:
        gpu_timeline(eng, prompts(args.requests, args.input_len))
    # Bare replay of the batch-256 graph (or the largest), for the host-overhead comparison.
    graphs = eng.runner.graphs
    if graphs is not None:
        size = graphs.sizes[-1]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            graphs.graphs[size].replay()
        torch.cuda.synchronize()
        print(json.dumps(dict(graph_replay_ms=round((time.perf_counter() - t) / 20 * 1e3, 3), batch=size)))


if __name__ == "__main__":
    main()
