"""What the tensor-parallel layout costs at one rank: batch-1 decode, plain engine vs TP=1 through it.

    PYTHONPATH=. python3 benchmarks/tp_layout_bench.py --out OUTDIR [--shape llama3.2-1b]

Two engines of the same random-weight shape (bf16, CUDA graphs on) live in one process: the
plain one and one built with ``QKV_TP_LAYOUT=1`` (rank 0's executor and runner, a one-rank
NCCL group, the sharded model with its all-reduce hooks and gathered logits, decode graphs
with the collectives captured: qkv/distributed/). Runs alternate between them (A B A B ...)
so drift on the card hits both. Batch-1 decode tok/s excludes the first step (the prefill).
Writes one JSON line per engine and one with the ratio to OUTDIR/tpgraph.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch


def build(shape: str, layout: bool, args):
    from qkv.tools.shapes import random_engine

    os.environ["QKV_TP_LAYOUT"] = "1" if layout else "0"
    try:
        t = time.perf_counter()
        eng = random_engine(shape, device=args.device, dtype=args.dtype, max_num_seqs=4, max_model_len=args.max_model_len,
                            max_num_batched_tokens=1024, kv_cache_memory=2 << 30)
        return eng, time.perf_counter() - t
    finally:
        os.environ.pop("QKV_TP_LAYOUT")


def one_run(eng, prompt: list[int], new: int) -> tuple[float, float]:
    """(decode tok/s without the first step, median step ms) of one greedy request."""
    from qkv.engine.request import SamplingParams

    eng.add_request(prompt, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    eng.step()  # the prefill (and the first token)
    steps, t1 = [], time.perf_counter()
    while eng.has_unfinished():
        s = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - s)
    return (new - 1) / (time.perf_counter() - t1), statistics.median(steps) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (no graphs there)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    path = os.path.join(args.out, "tpgraph.jsonl")
    plain, t_plain = build(args.shape, False, args)
    layout, t_layout = build(args.shape, True, args)
    assert plain.tp is None and layout.tp is not None and layout.tp.size == 1
    if args.device == "cuda":  # both replay decode graphs; the layout's hold its collectives
        assert plain.runner.graphs is not None and layout.runner.graphs is not None
    print(f"built plain in {t_plain:.1f} s, TP=1 layout in {t_layout:.1f} s", flush=True)
    rng = random.Random(0)
    prompt = [rng.randrange(10, plain.config.vocab_size) for _ in range(args.prompt_len)]
    for eng in (plain, layout):  # warm-up: first prefill and decode kernels, allocator
        one_run(eng, prompt, 8)
    res = {"plain": [], "layout": []}
    for i in range(args.runs):
        for name, eng in (("plain", plain), ("layout", layout))[::1 if i % 2 == 0 else -1]:
            res[name].append(one_run(eng, prompt, args.new_tokens))
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = []
    for name in ("plain", "layout"):
        toks = [r[0] for r in res[name]]
        rows.append(dict(bench="tp_layout_b1_decode", engine=name, shape=args.shape,
                         dtype=args.dtype, prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs,
                         tok_s_median=statistics.median(toks), tok_s_all=[round(t, 1) for t in toks],
                         step_ms_median=statistics.median(r[1] for r in res[name]),
                         async_scheduling=(plain if name == "plain" else layout).async_scheduling,
                         device=card, date=stamp, torch=torch.__version__))
    ratio = rows[1]["tok_s_median"] / rows[0]["tok_s_median"]
    # Same shape, but the two engines draw their random weights differently, so their tokens
    # are not compared here: tests/test_tp_layout.py compares them on a saved checkpoint.
    rows.append(dict(bench="tp_layout_b1_decode", engine="layout/plain", ratio=ratio, device=card, date=stamp))
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    layout.tp.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
