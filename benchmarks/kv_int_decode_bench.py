"""Decode attention over int4/int8 KV pages at batch 32 x 8k (Llama-3-8B's attention shape: 32
heads, 8 KV heads, head_dim 128, blocks of 16), against the copy rate measured in the same run.

Fraction = packed bytes of the cache (values + scales, one layer) / kernel time / copy rate,
the copy rate counted as bytes read + written per second, measured in the same run by
``qkv.tools.bench_rates.measure`` (the ceiling ``qkv bench`` and benchmarks/gpu_bench.py use).
Kernel variants (``packed_decode``'s plain kernel, and the fast one with V in halves or read
as words) and tilings (keys per tile, warps, stages, splits
per sequence) are swept; each one's output is compared with the plain kernel's (max_abs_diff)
so a wrong variant shows; the query/output rotation (two small GEMMs) is timed on top of the
best one, and the engine's default launch (no tiling given) beside it.
The bf16 and fp8 production kernels are timed on the same shape beside it.

    PYTHONPATH=. python benchmarks/kv_int_decode_bench.py --out $OUT [--sweep 1]
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
from qkv.attention.triton import packed  # noqa: E402
from qkv.attention.triton.packed import packed_decode, write_packed  # noqa: E402
from qkv.kvcache import kv_pages  # noqa: E402
from qkv.kvcache.kv_int import resolve  # noqa: E402
from qkv.kvcache.spec import FullAttention  # noqa: E402


def copy_rate() -> float:
    from qkv.tools.bench_rates import measure

    return measure(torch.device("cuda"))["copy_Bps"]


# name -> packed_decode's kernel choice; None: removed from the kernel in session 16 (keys on the
# MMA's N dimension, "fast" and "fast_words"; prefetching, "_pf": all measured slower: docs/benchmarks.md)
VARIANTS = {
    "plain": dict(fast=False),
    "fast": None,
    "fast_m": dict(fast=True, v_words=0),
    "fast_words": None,
    "fast_m_words1": dict(fast=True, v_words=1),
    "fast_m_words": dict(fast=True, v_words=2),
    "fast_m_pf": None,
    # session 7: f the one-fma widening, w3 V as words into halves, L the lazy rescale (8), rN maxnreg N
    "fast_m_f": dict(fast=True, v_words=0, fused=True),
    "fast_m_w3f": dict(fast=True, v_words=3, fused=True),
    "fast_m_w3fL": dict(fast=True, v_words=3, fused=True, lazy=8),
    "fast_m_w3fL_r96": dict(fast=True, v_words=3, fused=True, lazy=8, maxnreg=96),
    "fast_m_w3fL_r88": dict(fast=True, v_words=3, fused=True, lazy=8, maxnreg=88),
    "fast_m_w3fL_r80": dict(fast=True, v_words=3, fused=True, lazy=8, maxnreg=80),
    "fast_m_pf2L": None,
    "fast_m_pf2": None,
    "fast_m_L": dict(fast=True, v_words=0, lazy=8),
    "fast_m_fL": dict(fast=True, v_words=0, fused=True, lazy=8),  # int8: by words, one fma
    "fast_m_f0": dict(fast=True, v_words=0, fused=True, lazy=0),
    "fast_m_w3": dict(fast=True, v_words=3, fused=False, lazy=0),
    "fast_m_w3_r96": dict(fast=True, v_words=3, fused=False, lazy=0, maxnreg=96),
    "fast_m_w3f_r96": dict(fast=True, v_words=3, fused=True, lazy=0, maxnreg=96),
    "fast_m_0": dict(fast=True, v_words=0, fused=False, lazy=0),
    "fast_m_L_r96": dict(fast=True, v_words=0, lazy=8, maxnreg=96),
}
SWEEP1 = {  # kv -> [(variant, keys per tile, warps, stages, splits or None: decode.num_splits)]
    "int4": [("plain", 64, 4, 3, 8),
             ("fast_m_words", 64, 4, 3, 8), ("fast_m_words", 128, 4, 3, 8), ("fast_m_words", 128, 4, 2, 8),
             ("fast_m_words", 128, 8, 3, 8), ("fast_m_words", 64, 4, 3, 4), ("fast_m_words", 128, 4, 3, 4),
             ("fast_m_words", 64, 4, 4, 8), ("fast_m_words", 32, 4, 3, 8), ("fast_m_words", 128, 4, 3, 16),
             ("fast_m_words", 64, 4, 3, 16), ("fast_m_words", 64, 4, 2, 8), ("fast_m_words", 256, 8, 2, 8),
             ("fast_m_words", 256, 4, 2, 8), ("fast_m_words1", 128, 4, 3, 8),
             ("fast_m", 64, 4, 3, 8), ("fast_m", 128, 4, 3, 8), ("fast_m", 128, 8, 3, 8),
             ("fast", 64, 4, 3, 8), ("fast", 128, 4, 3, 8), ("fast_words", 64, 4, 3, 8)],
    "int8": [("plain", 64, 4, 3, 4), ("fast_m", 64, 4, 3, 4), ("fast_m", 128, 4, 3, 4), ("fast_m", 64, 4, 3, 8),
             ("fast_m", 128, 8, 3, 8), ("fast", 64, 4, 3, 4)],
}
SWEEP2 = {  # after SWEEP1 (2026-12-03): keys on M with V in halves was best; fewer warps per program
    "int4": [("plain", 64, 4, 3, 8), ("fast_m", 128, 4, 3, 8), ("fast_m", 128, 4, 2, 8), ("fast_m", 128, 4, 2, 4),
             ("fast_m", 128, 4, 2, 16), ("fast_m", 256, 4, 2, 8), ("fast_m", 64, 2, 2, 8), ("fast_m", 64, 2, 2, 16),
             ("fast_m", 64, 2, 3, 8), ("fast_m", 32, 2, 2, 8), ("fast_m", 32, 2, 2, 16), ("fast_m", 32, 1, 2, 8),
             ("fast_m", 32, 1, 2, 16), ("fast_m", 16, 1, 2, 16), ("fast_m", 128, 2, 2, 8),
             ("fast_m_words", 128, 4, 2, 8), ("fast_m_words", 64, 2, 2, 8), ("fast_m_words", 64, 2, 2, 16),
             ("fast_m_words", 32, 2, 2, 16), ("fast_m_words", 32, 1, 2, 16), ("fast_m_words", 128, 2, 2, 8),
             ("fast", 64, 2, 2, 8), ("fast", 32, 2, 2, 16),
             ("fast_m_pf", 128, 4, 2, 8), ("fast_m_pf", 128, 4, 3, 8), ("fast_m_pf", 64, 4, 2, 8),
             ("fast_m_pf", 64, 4, 3, 16), ("fast_m_pf", 32, 2, 2, 16)],
    "int8": [("plain", 64, 4, 3, 4), ("fast_m", 128, 4, 3, 4), ("fast_m", 128, 4, 2, 4), ("fast_m", 64, 2, 2, 8),
             ("fast_m", 32, 2, 2, 16), ("fast_m", 32, 1, 2, 16), ("fast_m", 128, 2, 2, 8)],
}
SWEEP3 = {  # session 7 (2026-12-03): fewer instructions a tile, deeper copy rings, more programs per SM
    "int4": [("fast_m", 16, 1, 2, 16), ("fast_m_w3fL", 16, 1, 2, 16), ("fast_m_w3fL", 16, 1, 3, 16),
             ("fast_m_w3fL_r96", 16, 1, 3, 21), ("fast_m_w3fL_r96", 16, 1, 3, 10), ("fast_m_pf2L", 16, 1, 1, 16),
             ("fast_m_pf2L", 16, 1, 1, 8), ("fast_m_w3fL_r96", 16, 1, 2, 21), ("fast_m_w3fL_r96", 16, 1, 2, 10),
             ("fast_m_w3fL", 16, 1, 2, 8), ("fast_m_w3fL", 16, 1, 2, 32), ("fast_m_w3fL", 16, 1, 3, 32),
             ("fast_m_f", 16, 1, 2, 16), ("fast_m_w3f", 16, 1, 2, 16), ("fast_m_pf2", 16, 1, 1, 16),
             ("fast_m_w3fL_r80", 16, 1, 3, 25), ("fast_m_w3fL_r88", 16, 1, 2, 11), ("fast_m_w3fL", 32, 1, 2, 16),
             ("fast_m_w3fL", 32, 1, 3, 16), ("fast_m_w3fL", 32, 2, 2, 16), ("fast_m_w3fL", 64, 2, 2, 8),
             ("fast_m", 16, 1, 3, 16), ("fast_m_w3fL", 32, 2, 3, 8)],
    "int8": [("fast_m", 32, 1, 2, 16), ("fast_m_fL", 32, 1, 2, 16), ("fast_m_L", 32, 1, 2, 16),
             ("fast_m_fL", 32, 1, 3, 16), ("fast_m_fL", 16, 1, 2, 16), ("fast_m_fL", 32, 1, 2, 8),
             ("fast_m_L_r96", 32, 1, 3, 21)],
}
SWEEP4 = {  # session 7, round 2: V as words behind an opaque mov (round 1's were wrong with 16-key tiles)
    "int4": [("fast_m_0", 16, 1, 2, 16), ("fast_m_w3", 16, 1, 2, 16), ("fast_m_w3f", 16, 1, 2, 16),
             ("fast_m_w3_r96", 16, 1, 2, 10), ("fast_m_w3f_r96", 16, 1, 2, 10), ("fast_m_w3", 16, 1, 2, 8),
             ("fast_m_w3f", 16, 1, 2, 8), ("fast_m_L", 16, 1, 2, 16), ("fast_m_0", 16, 1, 2, 8),
             ("fast_m_w3_r96", 16, 1, 2, 21), ("fast_m_w3", 32, 1, 2, 16)],
    "int8": [("fast_m_fL", 16, 1, 2, 16), ("fast_m_f0", 16, 1, 2, 16), ("fast_m_fL", 16, 1, 2, 8),
             ("fast_m_fL", 16, 1, 3, 16), ("fast_m_0", 32, 1, 2, 16)],
}
SWEEPS = {"1": SWEEP1, "2": SWEEP2, "3": SWEEP3, "4": SWEEP4}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", default="2", choices=sorted(SWEEPS), help="which list of tilings")
    ap.add_argument("--quiet", action="store_true", help="records to the file only")
    ap.add_argument("--no-peers", action="store_true", help="skip the engine default and the bf16/fp8 kernels")
    args = ap.parse_args()
    path = os.path.join(args.out, "kv_int_bench.jsonl")
    open(path, "w").close()

    def record(**kw):  # appended as it comes: a run cut short keeps what it measured
        if not args.quiet:
            print(json.dumps(kw), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(kw) + "\n")

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
        ref = packed_decode(q, plain, table, nc, scale, max_seq_len=ctx, fast=False, splits=8).float()
        ref_rot = packed_decode(q, cache, table, nc, scale, max_seq_len=ctx, fast=False, splits=8).float()
        best = None
        for variant, block_n, warps, stages, splits in SWEEPS[args.sweep][kv]:
            tag = dict(name="packed_decode", kv=kv, variant=variant, B=B, ctx=ctx, block_n=block_n, warps=warps,
                       stages=stages, splits=splits)
            if VARIANTS[variant] is None:
                record(**tag, what="removed from the kernel (session 16)")
                continue
            kw = dict(VARIANTS[variant], block_n=block_n, num_warps=warps, num_stages=stages, splits=splits)
            try:
                fn = lambda: packed_decode(q, plain, table, nc, scale, max_seq_len=ctx, **kw)  # noqa: E731
                diff = (fn().float() - ref).abs().max().item()
                ms = bench_graph(fn)
                record(**tag, what="kernel", us=ms * 1e3, packed_bytes=nbytes, frac_of_copy=nbytes / (ms / 1e3) / bw,
                       max_abs_diff=diff)
                if diff < 2e-2 and (best is None or ms < best[0]):
                    best = (ms, kw, tag)
            except Exception as e:  # a tiling Triton cannot build is reported, not fatal
                record(**tag, error=f"{type(e).__name__}: {str(e)[:300]}")
        if best is not None:
            _, kw, tag = best
            fn = lambda: packed_decode(q, cache, table, nc, scale, max_seq_len=ctx, **kw)  # noqa: E731
            rot = packed.ROT_IN_KERNEL
            for in_kernel in (True, False):  # the rotations in the kernel's registers, or as GEMMs around it
                packed.ROT_IN_KERNEL = in_kernel
                try:
                    diff = (fn().float() - ref_rot).abs().max().item()
                    ms = bench_graph(fn)
                    record(**tag, what="with_rotation" + ("" if in_kernel else "_gemm"), us=ms * 1e3,
                           packed_bytes=nbytes, frac_of_copy=nbytes / (ms / 1e3) / bw, max_abs_diff=diff)
                except Exception as e:
                    record(**tag, what="with_rotation", error=f"{type(e).__name__}: {str(e)[:300]}")
            packed.ROT_IN_KERNEL = rot
        # the engine's launch: eager steps know the longest sequence, graphs do not
        for maxlen in (() if args.no_peers else (ctx, None)):
            try:
                fn = lambda: packed_decode(q, cache, table, nc, scale, max_seq_len=maxlen)  # noqa: E731
                ms = bench_graph(fn)
                record(name="packed_decode", kv=kv, variant="default", what="with_rotation", B=B, ctx=ctx,
                       max_seq_len=maxlen, us=ms * 1e3, packed_bytes=nbytes, frac_of_copy=nbytes / (ms / 1e3) / bw)
            except Exception as e:
                record(name="packed_decode", kv=kv, variant="default", max_seq_len=maxlen,
                       error=f"{type(e).__name__}: {str(e)[:300]}")
        del cache, plain
        torch.cuda.empty_cache()
    for dt in (torch.bfloat16, torch.float8_e4m3fn):
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda", generator=g).to(dt)
        ms = bench_graph(lambda: paged_decode(q, cache, table, nc, scale, max_seq_len=ctx))
        record(name="paged_decode", kv=str(dt), B=B, ctx=ctx, us=ms * 1e3, bytes=cache.numel() * cache.element_size(),
               frac_of_copy=cache.numel() * cache.element_size() / (ms / 1e3) / bw)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
