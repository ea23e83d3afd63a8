"""Tile sweep of the MLA decode kernel and the MoE sort at DeepSeek-V2-Lite's decode shapes (CUDA).

    PYTHONPATH=. python3 benchmarks/mla_decode_sweep.py [--out results.jsonl] [--baseline old_mla.py]
        [--sections mla,fp8,align] [--workers 12]

For each (batch, context): the default launch and every swept (splits, BLOCK_N, warps, stages),
each timed by CUDA-graph replay and checked against an fp32 torch reference (relative error
of the output), as a share of the copy rate measured in the same process over the latent
bytes. ``--baseline`` times the default launch of another ``mla.py`` beside it (e.g.
``git show <rev>:qkv/attention/triton/mla.py > old_mla.py``). ``fp8``: the same over an
fp8 latent cache at 64 x 8k. ``align``: the one-program MoE sort (``moe._align_kernel``) by
chunk size at batch 1 and 128 (T*6 pairs). The kernels are compiled first by ``--workers``
processes in parallel (Triton's disk cache then serves the timed process).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import multiprocessing
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qkv.attention.triton import mla as mla_mod  # noqa: E402
from qkv.tools.bench_rates import measure  # noqa: E402

H, R, P, BS = 16, 512, 64, 16
# Per (batch, context): the launches timed beside the default, (splits, kernel, BLOCK_N, warps,
# stages, options of mla_decode): "merge" (the last split merges the partials in the kernel,
# no combine launch), "paged" (the block table read once per page of a tile, not per row),
# "peel" (whole tiles unmasked, the partial last one apart). The first of each shape is the
# default before them (2026-12-03). ("lazy", the output rescaled only when a max grew, measured
# no faster on 2026-12-04 and was removed.)
OLD = {"merge": False, "paged": False, "peel": False}
P1 = {"peel": False}
RUNS = {
    (64, 8192): [(4, "cp-qa", 32, 4, 3, OLD), (4, "cp-qa", 32, 4, 3, dict(P1, merge=False)),
                 (4, "cp-qa", 32, 4, 3, P1), (4, "cp-qa", 32, 4, 3, {"merge": False}),
                 (4, "cp-qa", 32, 4, 3, {}), (4, "cp-qa", 32, 4, 3, {"paged": False}),
                 (8, "cp-qa", 32, 4, 3, {}), (2, "cp-qa", 64, 4, 3, {}), (2, "cp-qa", 32, 4, 4, {})],
    (128, 640): [(1, "cp-qa", 32, 4, 4, OLD), (1, "cp-qa", 32, 4, 4, P1), (1, "cp-qa", 32, 4, 4, {}),
                 (1, "cp-qa", 32, 4, 4, {"paged": False}), (1, "cp-qa", 32, 4, 3, {}),
                 (2, "cp-qa", 32, 4, 3, {})],
    (1, 8192): [(64, "cp-qa", 32, 4, 4, OLD), (64, "cp-qa", 32, 4, 4, {}), (64, "cp-qa", 32, 4, 4, {"paged": False}),
                (32, "cp-qa", 32, 4, 4, {})],
}
# Round 1 of 2026-12-04 (docs/benchmarks.md) also ran an L2 bulk prefetch of the pages 2-8
# tiles ahead (181.8-261.2 us at 64 x 8k against 161.5), a stream-K launch (equal shares of
# all the tiles, 132-264 programs: 174.0-239.5 us) and evict-first hints (no change).
# The sweeps of 2026-12-03 (docs/benchmarks.md) also ran splits 1-64, cp tiles (16, 4, 5),
# (32, 4, 2|4), (32, 8, 3|4), (64, 8, 2|3), a variant with rows on M throughout (the PV dot on
# wgmma, commit 20b3066), TMA pages (kernels "tma", "tma-qa"), cp-qa (64, 8, 2), (32, 8, 3),
# (16, 4, 5) and cp-ks (the score dot split along R across the warps; 235.3 us at best at
# 64 x 8k): all slower than cp-qa (32, 4, 3) (docs/data/gpu-h200-2026-12-03-mla-decode-sweep*.jsonl).
FP8 = ((64, 8192, (4, 8)), (("cp", 32, 4, 2), ("cp", 32, 4, 3)))  # the fp8 kernel (the former one)
OUT = None


def record(**kw):
    print(json.dumps(kw), flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(json.dumps(kw) + "\n")


def bench(fn, rep=60):
    """Median ms of fn replayed through a CUDA graph (launch gaps removed), and the output of
    the graph's last replay."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=rep, return_mode="median"), out


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("mla_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def problem(B, ctx, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nblk = B * ctx // BS
    cache = torch.randn(nblk, BS, R + P, device="cuda", generator=g).to(dtype)
    table = torch.randperm(nblk, device="cuda", generator=g).to(torch.int32).view(B, ctx // BS)
    nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
    ql = torch.randn(B, H, R, device="cuda", generator=g).to(torch.bfloat16)
    qr = torch.randn(B, H, P, device="cuda", generator=g).to(torch.bfloat16)
    return cache, table, nc, ql, qr


def reference(cache, table, ql, qr, scale):
    """fp32 attention over every row of each sequence's table (the table covers ctx rows)."""
    B, nb = table.shape
    out = torch.empty(B, H, R, device="cuda")
    src = cache.view(torch.uint8) if cache.element_size() == 1 else cache  # fp8: gather the bytes
    for b in range(B):  # per sequence: [ctx, R + P] rows in fp32
        rows = src[table[b].long()].view(cache.dtype).reshape(nb * BS, R + P).float()
        s = (ql[b].float() @ rows[:, :R].T + qr[b].float() @ rows[:, R:].T) * scale
        out[b] = s.softmax(-1) @ rows[:, :R]
    return out


def _compile(task):
    """Worker: run one launch so that its kernels land in Triton's disk cache."""
    kind, B, dtype, baseline, cfg = task
    cache, table, nc, ql, qr = problem(B, 256, getattr(torch, dtype))  # B: the stream kernel's B_PAD
    try:
        if kind == "base":
            load_baseline(baseline).mla_decode(ql, qr, cache, table, nc, 0.07)
        else:
            S, kern, bn, w, st, opts = cfg
            mla_mod.mla_decode(ql, qr, cache, table, nc, 0.07, splits=S, block_n=bn, num_warps=w, num_stages=st,
                               kernel=kern, **dict(opts))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # out of shared memory: the timed pass records it
        return f"{task}: {type(e).__name__}"


def precompile(workers, baseline, sections):
    tasks = []
    if "mla" in sections:
        for B, ctx in RUNS:
            tasks += [("new", B, "bfloat16", None, run[:5] + (tuple(run[5].items()),)) for run in RUNS[B, ctx]]
            S, bn, w, st, kern = mla_mod.default_tiles(B)
            tasks.append(("new", B, "bfloat16", None, (S, kern, bn, w, st, ())))
            if baseline:
                tasks.append(("base", B, "bfloat16", baseline, None))
    if "fp8" in sections:
        (B, ctx, splits), tiles = FP8
        tasks += [("new", B, "float8_e4m3fn", None, (2,) + t + ((),)) for t in tiles]  # its combine: S = 2
        if baseline:
            tasks.append(("base", B, "float8_e4m3fn", baseline, None))
    tasks = list(dict.fromkeys(tasks))  # duplicates dropped
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for err in pool.imap_unordered(_compile, tasks):
            if err:
                print("precompile:", err, flush=True)


def sweep(bw, B, ctx, runs, baseline, dtype=torch.bfloat16):
    cache, table, nc, ql, qr = problem(B, ctx, dtype)
    gb = cache.numel() * cache.element_size() / 1e9
    ref = reference(cache, table, ql, qr, 0.07)
    name = str(dtype).replace("torch.", "")

    def one(kernel, fn, cfg, default=False):
        try:
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            ms, out = bench(fn)  # the replays' output checked too (the in-kernel merge's counters)
            err = max(err, ((out.float() - ref).norm() / ref.norm()).item())
        except Exception as e:  # out of shared memory for a tile: recorded, skipped
            record(name="mla_decode", B=B, ctx=ctx, cache=name, kernel=kernel, config=cfg, error=type(e).__name__)
            return None
        record(name="mla_decode", B=B, ctx=ctx, cache=name, kernel=kernel, config=cfg, default=default,
               us=round(ms * 1e3, 2), copy_frac=round(gb / ms * 1e3 / bw, 4), rel_err=float(f"{err:.3e}"))
        return ms, cfg, kernel

    rows = []
    if baseline:
        rows.append(one("old", lambda: baseline.mla_decode(ql, qr, cache, table, nc, 0.07), "default", True))
    cfg = mla_mod.default_tiles(B, cache.element_size())  # H = 16: one head block per sequence
    rows.append(one("new", lambda: mla_mod.mla_decode(ql, qr, cache, table, nc, 0.07), list(cfg), True))
    for S, kern, bn, w, st, o in runs:
        tag = kern + "".join(f"+{k}={v}" for k, v in o.items())
        rows.append(one(tag, lambda: mla_mod.mla_decode(ql, qr, cache, table, nc, 0.07, splits=S, block_n=bn,
                                                        num_warps=w, num_stages=st, kernel=kern, **o),
                        [S, bn, w, st]))
    rows = sorted((r for r in rows if r), key=lambda r: r[0])
    default = next((r for r in rows if r[2] == "new"), None)
    print(f"MLA {name} B={B} ctx={ctx}: default {default[1] if default else None} "
          f"{default[0] * 1e3 if default else float('nan'):.1f} us; best " + ", ".join(
              f"{k} {c} {ms * 1e3:.1f} us {gb / ms * 1e3 / bw:.1%}" for ms, c, k in rows[:5]), flush=True)
    del cache
    torch.cuda.empty_cache()


def align() -> None:
    from qkv.attention.triton import moe

    E = 64
    for T in (1, 16, 128):
        n = T * 6
        idx = torch.randint(0, E, (T, 6), device="cuda", dtype=torch.int32)
        bm = moe._block_m(n)
        bound = moe.padded_bound(n, E, bm)
        sorted_ids = torch.empty(bound, dtype=torch.int32, device="cuda")
        block_expert = torch.empty(bound // bm, dtype=torch.int32, device="cuda")
        num_padded = torch.empty(1, dtype=torch.int32, device="cuda")
        flat = idx.reshape(-1).contiguous()
        out = [f"default {bench(lambda: moe.align(idx, E, bm))[0] * 1e3:.1f} us"]
        for chunk, w in itertools.product((16, 32, 64, 128, 256), (1, 2, 4, 8)):
            if chunk > triton.next_power_of_2(max(n, 16)) * 2:
                continue
            ms, _ = bench(lambda: moe._align_kernel[(1,)](
                flat, sorted_ids, block_expert, num_padded, n, bound, bound // bm, E=E, E_P2=E, BLOCK_M=bm,
                CHUNK=chunk, num_warps=w))
            out.append(f"c{chunk}/w{w} {ms * 1e3:.1f}")
        print(f"align T={T} (pairs {n}): " + ", ".join(out))


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--baseline", help="another mla.py whose default launch is timed beside")
    ap.add_argument("--sections", default="mla,align")
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    OUT = args.out
    sections = args.sections.split(",")
    if args.workers > 1 and ("mla" in sections or "fp8" in sections):
        precompile(args.workers, args.baseline, sections)
    rates = measure(torch.device("cuda"))
    bw = rates["copy_Bps"] / 1e9  # GB/s, read + write counted
    record(name="rates", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
           copy_TBps=round(rates["copy_Bps"] / 1e12, 3), bf16_TFLOPs=round(rates["matmul_flops"] / 1e12, 1))
    baseline = load_baseline(args.baseline) if args.baseline else None
    if "mla" in sections:
        for B, ctx in RUNS:
            sweep(bw, B, ctx, RUNS[B, ctx], baseline)
    if "fp8" in sections:
        (B, ctx, splits), tiles = FP8
        sweep(bw, B, ctx, [(S,) + t + ({},) for S in splits for t in tiles], baseline, torch.float8_e4m3fn)
    if "align" in sections:
        align()


if __name__ == "__main__":
    main()
