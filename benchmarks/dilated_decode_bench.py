"""Dilated vs undilated sliding-window decode (and prefill) kernels at the same number of keys.

A window of W keys dilated by d reads the same W keys per query as the undilated window, spread
over W*d positions: the decode kernel should cost the same. Each case times ``paged_decode``
(bf16, 32 query / 8 KV heads of 128, blocks of 16 over shuffled pages) on sequences long
enough that every query sees all W keys, with the splits the Triton backend picks (sized by
W keys, not by W*d positions). Median of ``triton.testing.do_bench``; bandwidth counts the
K and V bytes read. The prefill rows time one 2,048-token chunk after a 4,096-token prefix:
dilated, it scans W*d positions per query tile and masks (documented as d times the work).

    PYTHONPATH=. python benchmarks/dilated_decode_bench.py --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from qkv.attention.triton.decode import paged_decode
from qkv.attention.triton.prefill import paged_prefill

H, KVH, D, BS = 32, 8, 128, 16


def cdiv(a, b):
    return -(-a // b)


def decode_case(batch: int, window: int, d: int, gen: torch.Generator) -> dict:
    seq = window * d + 7  # every query sees all W keys
    per_seq = cdiv(seq, BS)
    nblocks = batch * per_seq
    cache = torch.randn(2, nblocks, BS, KVH, D, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(nblocks, generator=gen).view(batch, per_seq).cuda()
    q = torch.randn(batch, H, D, dtype=torch.bfloat16, device="cuda")
    nc = torch.full((batch,), seq - 1, dtype=torch.int64, device="cuda")
    fn = lambda: paged_decode(q, cache, table, nc, D ** -0.5, window, None, max_seq_len=min(seq, window),  # noqa: E731
                              dilation=d)
    fn()
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    read = batch * KVH * window * D * 2 * 2
    return dict(kernel="decode", batch=batch, window=window, dilation=d, positions=window * d, ms=ms,
                us=ms * 1e3, gb_s=read / ms / 1e6)


def prefill_case(window: int, d: int, gen: torch.Generator, prefix: int = 4096, chunk: int = 2048) -> dict:
    total = prefix + chunk
    nblocks = cdiv(total, BS)
    cache = torch.randn(2, nblocks, BS, KVH, D, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(nblocks, generator=gen)[None].cuda()
    q = torch.randn(chunk, H, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(chunk, KVH, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(chunk, KVH, D, dtype=torch.bfloat16, device="cuda")
    qsl = torch.tensor([0, chunk], device="cuda")
    nc = torch.tensor([prefix], device="cuda")
    fn = lambda: paged_prefill(q, k, v, cache, table, qsl, nc, chunk, D ** -0.5, window, None,  # noqa: E731
                               dilation=d)
    fn()
    ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
    return dict(kernel="prefill", batch=1, window=window, dilation=d, positions=window * d, chunk=chunk, ms=ms,
                us=ms * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, window in ((1, 4096), (32, 4096), (128, 1024)):
        base = None
        for d in (1, 2, 4):
            r = decode_case(batch, window, d, gen)
            base = base or r["us"]
            r["vs_undilated"] = r["us"] / base
            rows.append(r)
            print(f"decode  batch {batch:>3} W {window:>5} d {d}: {r['us']:8.1f} us  {r['gb_s']:7.0f} GB/s  "
                  f"x{r['vs_undilated']:.3f}", flush=True)
            torch.cuda.empty_cache()
    base = None
    for d in (1, 2, 4):
        r = prefill_case(1024, d, gen)
        base = base or r["us"]
        r["vs_undilated"] = r["us"] / base
        rows.append(r)
        print(f"prefill chunk 2048 W 1024 d {d}: {r['us']:8.1f} us  x{r['vs_undilated']:.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
