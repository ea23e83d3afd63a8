"""Per-kernel GPU time of the steps that carry prompt tokens in the `1000 in / 1000 out` run
(issue 16): an engine of Llama-3-8B's shape (random bf16 weights, ``max_num_seqs`` 384, 8,192
tokens a step) with ``--decodes`` sequences decoding at ~1,050 tokens of context, then 8 new
1,000-token prompts admitted; the steps from their admission until their prompts are computed
are profiled (torch.profiler, eager kernels and graph replays alike), for the KV dtype given
and, for int4, each variant of ``VARIANTS`` (module defaults set for the window).

    PYTHONPATH=. python benchmarks/mixed_step_profile.py --kv-dtype int4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

# name -> module defaults set for its window ("module.NAME" under qkv.attention.triton), over the
# defaults as they stand (the code's, and --set's)
VARIANTS = {"default": {},
            "session8": {"packed_prefill.HALVES": False, "packed_prefill.ROT_KERNEL": False,
                         "packed_prefill.COMPACT": False, "packed.WRITE_ROT_IN_KERNEL": False,
                         "packed.WRITE_TILES": ((0, 0, 1),)},
            "onerow_write": {"packed.WRITE_TILES": ((0, 0, 1),)}}


def set_knobs(knobs: dict) -> dict:
    """Set module defaults (knobs.py); returns the values they replaced."""
    from knobs import set_defaults

    return set_defaults(knobs)


def table(prof, top_n):
    agg = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            c, t = agg.get(e.name[:50], (0, 0.0))
            agg[e.name[:50]] = (c + 1, t + e.device_time)
    top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top_n]
    return round(sum(v[1] for v in agg.values()) / 1e3, 2), [(k, c, round(t / 1e3, 2)) for k, (c, t) in top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--kv-dtype", default="int4")
    ap.add_argument("--decodes", type=int, default=376)
    ap.add_argument("--variants", default="default,session8")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--set", default=None, help='JSON: module defaults for the run, e.g. {"packed.WRITE_TILES": [[0, 8, 4]]}')
    args = ap.parse_args()
    if args.set:
        set_knobs(json.loads(args.set))
    from torch.profiler import ProfilerActivity, profile

    from qkv.engine.request import SamplingParams
    from qkv.tools.shapes import random_engine

    t0 = time.perf_counter()
    eng = random_engine("llama3-8b", max_num_seqs=384, max_num_batched_tokens=8192, max_model_len=4096,
                        gpu_memory_utilization=0.9, kv_dtype=args.kv_dtype)
    rng = random.Random(0)
    V = eng.config.vocab_size
    prompt = lambda n: [rng.randrange(10, V) for _ in range(n)]  # noqa: E731
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    reqs = []
    for _ in range(args.decodes):
        reqs += eng.add_request(prompt(1000), greedy(400))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
        eng.step()
    for _ in range(10):
        eng.step()
    torch.cuda.synchronize()
    print(f"# {args.kv_dtype}: engine and {args.decodes} prompts in {time.perf_counter() - t0:.1f} s", flush=True)
    out = []
    for name in (args.variants.split(",") if args.kv_dtype == "int4" else ["default"]):
        saved = set_knobs(VARIANTS[name])
        for rnd in range(2):  # a warm-up window (compiles), then the profiled one
            new = []
            for _ in range(8):
                new += eng.add_request(prompt(1000), greedy(2))
            torch.cuda.synchronize()
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                steps = 0
                while any(r.num_computed_tokens < r.num_prompt_tokens for r in new):
                    eng.step()
                    steps += 1
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e3
            while not all(r.finished for r in new):
                eng.step()
        set_knobs(saved)
        total, top = table(prof, args.top)
        rec = dict(kv=args.kv_dtype, variant=name, steps=steps, wall_ms=round(wall, 1), gpu_ms=total, top=top)
        out.append(rec)
        print(f"{args.kv_dtype} {name}: {steps} steps, wall {wall:.1f} ms, GPU {total} ms", flush=True)
        for k, c, ms in top:
            print(f"   {ms:8.2f} ms {c:5d}x {k}", flush=True)
    with open(os.path.join(args.out, "mixed_step_profile.jsonl"), "a") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
