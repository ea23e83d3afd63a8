"""What the tensor-parallel layout costs at one rank: batch-1 decode, plain engine vs TP=1 through it.

    PYTHONPATH=. python3 benchmarks/tp_layout_bench.py --out OUTDIR [--shape llama3.2-1b]

Engines of the same random-weight shape (bf16, CUDA graphs on) live in one process: the
plain one, one built with ``QKV_TP_LAYOUT=1`` (rank 0's executor and runner, a one-rank
NCCL group, the sharded model with its all-reduce hooks and gathered logits, decode graphs
with the collectives captured: qkv/distributed/), and on CUDA that layout without graphs
(``enforce_eager``: what capturing the collectives buys). Runs alternate between them (A B C,
C B A, ...) so drift on the card hits all. Batch-1 decode tok/s excludes the first step (the prefill).
Writes one JSON line per engine and one per ratio to OUTDIR/tpgraph.jsonl.
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


def build(shape: str, layout: bool, args, eager: bool = False):
    from qkv.tools.shapes import random_engine

    os.environ["QKV_TP_LAYOUT"] = "1" if layout else "0"
    try:
        t = time.perf_counter()
        eng = random_engine(shape, device=args.device, dtype=args.dtype, max_num_seqs=4, max_model_len=args.max_model_len,
                            max_num_batched_tokens=1024, kv_cache_memory=2 << 30, enforce_eager=eager)
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
    nccl = torch.cuda.nccl.version() if args.device == "cuda" else None
    print(f"torch {torch.__version__}, nccl {nccl}, shape {args.shape}, {args.dtype}, {args.device}", flush=True)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = dict(bench="tp_layout_b1_decode", shape=args.shape, dtype=args.dtype, device=card, date=stamp,
                torch=torch.__version__, nccl=nccl)

    def write(**row) -> None:  # one JSON line, written at once (a later failure keeps it)
        line = json.dumps({**base, **row})
        with open(path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    engines = {"plain": build(args.shape, False, args)}
    assert engines["plain"][0].tp is None
    try:
        engines["layout"] = build(args.shape, True, args)
        layout = engines["layout"][0]
        assert layout.tp is not None and layout.tp.size == 1
        if args.device == "cuda":  # the layout without graphs: what capturing its collectives buys
            engines["layout_eager"] = build(args.shape, True, args, eager=True)
    except Exception as e:  # noqa: BLE001 - the plain engine's number still comes back
        write(engine="layout", error=f"{type(e).__name__}: {e}")
        engines.pop("layout", None)
        engines.pop("layout_eager", None)
    print(", ".join(f"built {name} in {t:.1f} s" for name, (_, t) in engines.items()), flush=True)
    rng = random.Random(0)
    prompt = [rng.randrange(10, engines["plain"][0].config.vocab_size) for _ in range(args.prompt_len)]
    for eng, _ in engines.values():  # warm-up: first prefill and decode kernels, allocator
        one_run(eng, prompt, 8)
    res = {name: [] for name in engines}
    order = list(engines)
    for i in range(args.runs):  # alternating A B, B A, ...: drift on the card hits both
        for name in (order if i % 2 == 0 else order[::-1]):
            res[name].append(one_run(engines[name][0], prompt, args.new_tokens))
    tok = {}
    for name, (eng, t_build) in engines.items():
        toks = [r[0] for r in res[name]]
        tok[name] = statistics.median(toks)
        write(engine=name, prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs,
              tok_s_median=tok[name], tok_s_all=[round(t, 1) for t in toks],
              step_ms_median=statistics.median(r[1] for r in res[name]), build_s=round(t_build, 2),
              async_scheduling=eng.async_scheduling, graphs=eng.runner.graphs is not None)
    if "layout" in tok:
        # Same shape, but the two engines draw their random weights differently, so their tokens
        # are not compared here: tests/test_tp_layout.py compares them on a saved checkpoint.
        write(engine="layout/plain", ratio=tok["layout"] / tok["plain"])
    if "layout_eager" in tok:
        write(engine="layout/layout_eager", ratio=tok["layout"] / tok["layout_eager"])
    for name, (eng, _) in engines.items():
        if eng.tp is not None:
            eng.tp.shutdown()
    return 0

if __name__ == "__main__":
    sys.exit(main())
