"""Decode attention over int4/int8 KV pages at batch 32 x 8k (Llama-3-8B's attention shape: 32
heads, 8 KV heads, head_dim 128, blocks of 16), against the copy rate measured in the same run.

Fraction = packed bytes of the cache (values + scales, one layer) / kernel time / copy rate,
the copy rate counted as bytes read + written per second, measured in the same run by
``qkv.tools.bench_rates.measure`` (the ceiling ``qkv bench`` and scripts/gpu_bench.py use).
Tilings (keys per tile, warps, stages, splits per sequence) are swept; the query/output
rotation (two small GEMMs) is timed on top of the best one.
The bf16 and fp8 production kernels are timed on the same shape beside it.

    PYTHONPATH=. python scripts/kv_int_decode_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import bench_graph  # noqa: E402

from qkv.attention.triton.decode import paged_decode  # noqa: E402
from qkv.attention.triton.packed import packed_decode, write_packed  # noqa: E402
from qkv.kvcache import kv_pages  # noqa: E402
from qkv.kvcache.kv_int import resolve  # noqa: E402
from qkv.kvcache.spec import FullAttention  # noqa: E402


def copy_rate() -> float:
    from qkv.tools.bench_rates import measure

    return measure(torch.device("cuda"))["copy_Bps"]


TILINGS = {  # (keys per tile, warps, stages, splits or None: decode.num_splits)
    "int4": [(64, 4, 3, None), (32, 4, 3, None), (64, 4, 4, None), (128, 4, 3, None), (128, 8, 3, None),
             (64, 8, 3, None), (64, 4, 3, 4), (64, 4, 3, 8), (128, 4, 3, 4), (128, 8, 3, 8), (32, 4, 3, 8)],
    "int8": [(64, 4, 3, None), (128, 4, 3, None), (64, 4, 3, 4), (128, 8, 3, 8)],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    recs = []

    def record(**kw):
        recs.append(kw)
        print(json.dumps(kw), flush=True)

    bw = copy_rate()
    record(name="copy", TBps=bw / 1e12, device=torch.cuda.get_device_name())
    B, ctx, H, KVH, D, bs = 32, 8192, 32, 8, 128, 16
    nblk = B * ctx // bs
    g = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randperm(nblk, device="cuda", generator=g).view(B, ctx // bs).contiguous()
    nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
    q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda", generator=g)
    scale = D ** -0.5
    for kv in ("int4", "int8"):
        spec = FullAttention(KVH, D, 1, packed=resolve(kv, None, None, torch.bfloat16)[1])
        cache = kv_pages.new_cache(spec, nblk, bs, torch.uint8, "cuda")
        step = 1 << 16
        for s0 in range(0, nblk * bs, step):  # random K/V through the quantizing write kernel
            k = torch.randn(step, KVH, D, dtype=torch.bfloat16, device="cuda", generator=g)
            write_packed(cache, k, k.flip(0), torch.arange(s0, s0 + step, device="cuda"))
        nbytes = cache.numel()
        plain = cache.clone()  # the same pages read without the query/output rotation: the kernel alone
        plain.kv_layout = dataclasses.replace(
            cache.kv_layout, planes=tuple(dataclasses.replace(p, rotated=False) for p in cache.kv_layout.planes))
        best = None
        for block_n, warps, stages, splits in TILINGS[kv]:
            try:
                fn = lambda: packed_decode(q, plain, table, nc, scale, max_seq_len=ctx, block_n=block_n,  # noqa: E731
                                           num_warps=warps, num_stages=stages, splits=splits)
                ms = bench_graph(fn)
                record(name="packed_decode", kv=kv, what="kernel", B=B, ctx=ctx, block_n=block_n, warps=warps,
                       stages=stages, splits=splits, us=ms * 1e3, packed_bytes=nbytes,
                       frac_of_copy=nbytes / (ms / 1e3) / bw)
                if best is None or ms < best[0]:
                    best = (ms, block_n, warps, stages, splits)
            except Exception as e:  # a tiling Triton cannot build is reported, not fatal
                record(name="packed_decode", kv=kv, block_n=block_n, warps=warps, stages=stages, splits=splits,
                       error=f"{type(e).__name__}: {str(e)[:300]}")
        if best is not None:
            _, block_n, warps, stages, splits = best
            ms = bench_graph(lambda: packed_decode(q, cache, table, nc, scale, max_seq_len=ctx, block_n=block_n,
                                                   num_warps=warps, num_stages=stages, splits=splits))
            record(name="packed_decode", kv=kv, what="with_rotation", B=B, ctx=ctx, block_n=block_n, warps=warps,
                   stages=stages, splits=splits, us=ms * 1e3, packed_bytes=nbytes,
                   frac_of_copy=nbytes / (ms / 1e3) / bw)
        del cache, plain
        torch.cuda.empty_cache()
    for dt in (torch.bfloat16, torch.float8_e4m3fn):
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda", generator=g).to(dt)
        ms = bench_graph(lambda: paged_decode(q, cache, table, nc, scale, max_seq_len=ctx))
        record(name="paged_decode", kv=str(dt), B=B, ctx=ctx, us=ms * 1e3, bytes=cache.numel() * cache.element_size(),
               frac_of_copy=cache.numel() * cache.element_size() / (ms / 1e3) / bw)
        del cache
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "kv_int_bench.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
