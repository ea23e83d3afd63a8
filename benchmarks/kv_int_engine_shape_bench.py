"""Decode attention at the shape of the `1000 in / 1000 out` engine run (issue 16): many rows
of short contexts (384 sequences of 1,000-2,000 keys, Llama-3-8B's attention: 32 heads, 8 KV
heads, head_dim 128, blocks of 16), where the 32 x 8k kernel bench says little about the
split/tile choice. int4 pages (``--kv``: any packed format) through ``packed_decode`` (the
engine's launch: no ``max_seq_len`` inside a CUDA graph, and variants), the fp8 and bf16 caches through
``decode.paged_decode`` (the engine's launch), each timed as a CUDA-graph replay.

GB/s counts the bytes each format must read for the keys the rows attend to (values and
scales); ``frac`` is that over the copy rate measured in the same run. Each int4 variant's
output is compared with the plain kernel's (``d``: max |difference|).

    PYTHONPATH=. python benchmarks/kv_int_engine_shape_bench.py --out $OUT [--rows 384] [--big] [--kv int8]
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

H, KVH, D, BS = 32, 8, 128, 16
# name -> packed_decode keyword arguments (none: the engine's default launch)
INT4 = {
    "default": {},
    "s2": dict(splits=2),
    "s4": dict(splits=4),
    "n32": dict(block_n=32),
    "r96": dict(maxnreg=96),
    # session 8: the softmax sums across lanes once, after the loop (ld); the scores as two MMA
    # chains (qs) measured slower and left the kernel in session 16
    "ld": dict(l_defer=True),
    "n32s2": dict(block_n=32, splits=2),
    "n64": dict(block_n=64),
    "n64s2": dict(block_n=64, splits=2),
    # session 9: op one_page (scalar block-table entries), w4 V as eight nibble-position dots, kw the same for K
    "op": dict(one_page=True),
    "w4": dict(v_words=4),
    "kw": dict(k_words=1),
    "opw4kw": dict(one_page=True, v_words=4, k_words=1),
    "opw4kw_s16": dict(one_page=True, v_words=4, k_words=1, splits=16),
    "opw4kw_s4": dict(one_page=True, v_words=4, k_words=1, splits=4),
    "opw4kw_st3": dict(one_page=True, v_words=4, k_words=1, num_stages=3),
    "opw4kwld": dict(one_page=True, v_words=4, k_words=1, l_defer=True),
    "opw4kw_n32": dict(one_page=True, v_words=4, k_words=1, block_n=32),
    "opw4kw_n32s2": dict(one_page=True, v_words=4, k_words=1, block_n=32, splits=2),
    "opw4kw_n32st3": dict(one_page=True, v_words=4, k_words=1, block_n=32, num_stages=3),
    "opw4kwld_n32": dict(one_page=True, v_words=4, k_words=1, block_n=32, l_defer=True),
    "opw4kw_n16": dict(one_page=True, v_words=4, k_words=1, block_n=16),
    # session 9, round 2: block-table entries a tile ahead (one_page 2), deferred sums (D), lazy rescale (L8)
    "p2": dict(one_page=2, v_words=4, k_words=1),
    "p2D": dict(one_page=2, v_words=4, k_words=1, l_defer=True),
    "p2L8D": dict(one_page=2, v_words=4, k_words=1, l_defer=True, lazy=8),
    "p2D_r96": dict(one_page=2, v_words=4, k_words=1, l_defer=True, maxnreg=96),
    "p2L8D_r96": dict(one_page=2, v_words=4, k_words=1, l_defer=True, lazy=8, maxnreg=96),
    "p2D_n32": dict(one_page=2, v_words=4, k_words=1, l_defer=True, block_n=32),
    "p2L8D_n32": dict(one_page=2, v_words=4, k_words=1, l_defer=True, lazy=8, block_n=32),
    "p2D_n16": dict(one_page=2, v_words=4, k_words=1, l_defer=True, block_n=16),
    "p2L8D_n16": dict(one_page=2, v_words=4, k_words=1, l_defer=True, lazy=8, block_n=16),
    # session 12: longest sequences first (attention/triton/order.py; the argsort, once a step in the
    # engine, is not in the timed launch)
    "lpt": dict(lpt=True),
    # session 13: the order with more programs (2 splits), more resident ones (96 registers), other tilings
    "lpt_s2": dict(lpt=True, splits=2),
    "lpt_r96": dict(lpt=True, maxnreg=96),
    "lpt_n16": dict(lpt=True, block_n=16),
    "lpt_st3": dict(lpt=True, num_stages=3),
    "lpt_n64": dict(lpt=True, block_n=64),
    # session 13: session 9's fewer-instruction options (never timed), with the order; static SASS of the
    # many-row tiling's main loop (sm_90, built here): 2,202 instructions a 32-key tile by default,
    # 1,758 with one_page 1, 1,323 with one_page 1 + k_words (1,422 with v_words 4 as well)
    "lpt_op": dict(lpt=True, one_page=1),
    "lpt_opkw": dict(lpt=True, one_page=1, k_words=1),
    "lpt_op2kw": dict(lpt=True, one_page=2, k_words=1),
    "lpt_opw4kw": dict(lpt=True, one_page=1, v_words=4, k_words=1),
    "lpt_opkw_st3": dict(lpt=True, one_page=1, k_words=1, num_stages=3),
    # registers capped: 12 warps an SM at 168 (14 local loads a tile in the loop), 16 at 128 (43)
    "lpt_opkw_r168": dict(lpt=True, one_page=1, k_words=1, maxnreg=168),
    "lpt_opkw_r128": dict(lpt=True, one_page=1, k_words=1, maxnreg=128),
    "opkw": dict(one_page=1, k_words=1),  # 32 x 8k (16-key tiles, 8 splits): 1,156 -> 703 a tile
    "op2kw": dict(one_page=2, k_words=1),
    # session 14: one_page 1 + k_words + v_words 4 became the defaults; s13 is session 13's defaults
    "s13": dict(one_page=0, k_words=0, v_words=3),
    "lpt_s13": dict(lpt=True, one_page=0, k_words=0, v_words=3),
    "op2w4kw": dict(one_page=2, v_words=4, k_words=1),
    "lpt_op2w4kw": dict(lpt=True, one_page=2, v_words=4, k_words=1),
    # session 14, for --kv int8 (its decode-only steps took 56.6 s of the 1000/1000 run against fp8's
    # 43.9): the int4 many-row tiling's 32-key tiles, scalar block-table entries
    "lpt_n32": dict(lpt=True, block_n=32),
    "lpt_n32op": dict(lpt=True, block_n=32, one_page=1),
    "lpt_n32op2": dict(lpt=True, block_n=32, one_page=2),
    "lpt_n32st3": dict(lpt=True, block_n=32, num_stages=3),
    # (sm_90 builds: int8 32-key tiles take 243 registers, 8 warps an SM; 193 with one_page; 16-key 127)
    "lpt_n32op_r128": dict(lpt=True, block_n=32, one_page=1, maxnreg=128),
    "n32op": dict(block_n=32, one_page=1),
    # session 14: Triton's pipeliner keeps a tile's K/V data one tile ahead whatever num_stages is
    # while the tile's block-table entry is loaded in the same iteration (one_page 1: buffers
    # 1x16x16xi32 at 2, 3 and 4 stages); with the entries a tile ahead in registers (one_page 2) it
    # keeps 2 tiles ahead at 3 stages and 3 at 4 (sm_90 builds, 16-key tiles: 96 registers at 3 and
    # 4 stages against 128, 21 warps an SM against 16; 8.7 / 11.0 KB shared a warp)
    "p2st3": dict(one_page=2, num_stages=3),
    "p2st4": dict(one_page=2, num_stages=4),
    "p2n32st3": dict(one_page=2, block_n=32, num_stages=3),
    "p2st3s16": dict(one_page=2, num_stages=3, splits=16),  # (32 x 8k: 4,096 programs for 21 x 132 places)
    "lpt_p2st3": dict(lpt=True, one_page=2, num_stages=3),
    "lpt_p2st4": dict(lpt=True, one_page=2, num_stages=4),
    "lpt_p2n16st3": dict(lpt=True, one_page=2, block_n=16, num_stages=3),
    "lpt_p2n16st4": dict(lpt=True, one_page=2, block_n=16, num_stages=4),
    # session 15: one_page 2 at 3 stages became the int4 default; s14 is session 14's
    "s14": dict(one_page=1, num_stages=2),
    "lpt_s14": dict(lpt=True, one_page=1, num_stages=2),
    # session 15: 32 x 8k from L2 takes 119 us against 134 from HBM: the kernel's own work bounds it,
    # issued by 16 single-warp programs an SM (2,048 for 15.5 places each). 16 splits at 64 registers:
    # 4,096 programs, 31 an SM in one wave (32 fit by registers, 35 by shared at 2 stages), twice the
    # warps a scheduler, for 20-22 spill loads a tile (sm_90 builds: 533-552 instructions a tile)
    "s16r64": dict(one_page=1, num_stages=2, splits=16, maxnreg=64),
    "s16r64p2": dict(one_page=2, num_stages=2, splits=16, maxnreg=64),
    "s16r72": dict(one_page=1, num_stages=2, splits=16, maxnreg=72),  # (28 an SM: two waves)
    # the lazy rescale (36 FMUL of the 492 a tile rescale the accumulators; session 9's p2L8D, never timed)
    "p2st3L8D": dict(one_page=2, num_stages=3, lazy=8, l_defer=True),
    # session 16: V's words loaded keys-fastest (v_words 5), so the widened pairs are the PV dots'
    # A operand as they stand: no transpose through shared memory (16 STS, 8 LDSM.MT88), 488 -> 479
    # instructions a 16-key tile, 473 -> 464 over head-major pages (sm_90 builds)
    "w5": dict(v_words=5),
    "lpt_w5": dict(lpt=True, v_words=5),
    "w5st3L8D": dict(one_page=2, num_stages=3, lazy=8, l_defer=True, v_words=5),
}
BIG = "default,ld"  # variants at 32 x 8k
# each variant as packed.py module defaults (for gpu_bench.py --packed-set: the engine A/B)
KNOBS = {
    "default": {}, "s2": {"MIN_SPLITS": {"4": 2}}, "n32": {"FAST_TILING": {"4": [32, 1, 2]}},
    "ld": {"L_DEFER": {"4": True}},
    "n32s2": {"FAST_TILING": {"4": [32, 1, 2]}, "MIN_SPLITS": {"4": 2}},
    "n64": {"FAST_TILING": {"4": [64, 1, 2]}}, "n64s2": {"FAST_TILING": {"4": [64, 1, 2]}, "MIN_SPLITS": {"4": 2}},
}


def shapes(rows: int, big: bool, lo: int = 1000, hi: int = 2000, probe: bool = False, head_major: bool = False):
    """(label, per-row key counts, query heads, KV heads, distinct pages or 0): the run's steady
    state (prompts of 1,000, up to 1,000 generated). ``probe``: 32 x 8k's bytes where the reads
    cannot be what bounds the kernel (the table's entries modulo 256 pages, ~4 MB: L2-resident)
    and laid out as one KV head a sequence (256 x 8k, 4 query heads: a tile's 16 rows of a head
    are contiguous in the page, 1 KB, not 64 B every 512). ``head_major``: each shape again over
    head-major pages (label ``.../hm``; kv_pages.HEAD_MAJOR: the same contiguity at 8 KV heads),
    the L2 probe too; shapes without it are token-major (HEAD_MAJOR forced off)."""
    g = torch.Generator().manual_seed(1)
    out = [(f"{rows}x{lo}-{hi}", torch.randint(lo, hi + 1, (rows,), generator=g), H, KVH, 0)]
    if big:
        out.append(("32x8192", torch.full((32,), 8192), H, KVH, 0))
    if probe:
        out += [("32x8192/L2", torch.full((32,), 8192), H, KVH, 256),
                ("256x8192/kvh1", torch.full((256,), 8192), H // KVH, 1, 0)]
    out.append((f"{rows}x{lo + 70}", torch.full((rows,), lo + 70), H, KVH, 0))
    if head_major:
        out += [(f"{label}/hm", *rest) for label, *rest in out if "kvh1" not in label]  # (one head: the same)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--big", action="store_true", help="also batch 32 x 8k")
    ap.add_argument("--head-major", action="store_true", help="also every shape over head-major pages (/hm)")
    ap.add_argument("--probe", action="store_true",
                    help="also 32 x 8k from L2 and as one KV head a sequence (what bounds the kernel)")
    ap.add_argument("--keys", default="1000,2000", help="the rows' key counts: uniform in [LO, HI]")
    ap.add_argument("--variants", default="default,s2,n32,ld,r96")
    ap.add_argument("--big-variants", default=BIG)
    ap.add_argument("--repeat", type=int, default=1, help="time each variant this many times (interleaved rounds)")
    ap.add_argument("--peers", default="fp8", help="float caches timed beside: fp8,bf16")
    ap.add_argument("--profile-shape", default=None, help="with --profile-only: the shape's label (e.g. 32x8192)")
    ap.add_argument("--profile-only", action="store_true",
                    help="for ncu: the first shape only, each variant launched twice, nothing timed")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (no timing)")
    ap.add_argument("--kv", default="int4", help="the packed cache's format: int4, int8 or K,V (int8,int4)")
    ap.add_argument("--q-dtype", default="bf16", choices=("bf16", "fp16"),
                    help="the queries' dtype (and the packed kernel's operands': fp16 models take the fp16 path)")
    args = ap.parse_args()
    path = os.path.join(args.out, "kv_int_engine_shape.jsonl")
    open(path, "w").close()

    def record(**kw):
        line = json.dumps(kw)
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    dev = args.device
    cpu = dev == "cpu"
    timed = (lambda fn: 1.0) if cpu else bench_graph
    if cpu or args.profile_only:
        bw = 1.0
    else:
        from qkv.tools.bench_rates import measure

        bw = measure(torch.device("cuda"))["copy_Bps"]
        record(name="copy", TBps=bw / 1e12, device=torch.cuda.get_device_name())
    g = torch.Generator(device=dev).manual_seed(0)
    for label, lens, H, KVH, l2 in shapes(args.rows, args.big, *map(int, args.keys.split(",")), probe=args.probe,
                                          head_major=args.head_major):
        kv_pages.HEAD_MAJOR = label.endswith("/hm")  # (read when the cache below is made)
        if args.profile_only and args.profile_shape and label != args.profile_shape:
            continue
        B = lens.numel()
        blocks = (lens + BS - 1) // BS
        nblk = int(blocks.sum())
        maxb = int(blocks.max())
        perm = torch.randperm(nblk, generator=torch.Generator().manual_seed(2))
        table = torch.zeros(B, maxb, dtype=torch.int32)
        at = 0
        for i, nb in enumerate(blocks.tolist()):
            table[i, :nb] = perm[at:at + nb]
            at += nb
        if l2:  # every row reads the same few pages (the bytes counted are still every key's)
            table %= l2
        table = table.to(dev)
        nc = (lens - 1).to(dev)
        keys = int(lens.sum())
        qdt = torch.float16 if args.q_dtype == "fp16" else torch.bfloat16
        q = torch.randn(B, H, D, dtype=qdt, device=dev, generator=g)
        scale = D ** -0.5
        spec = FullAttention(KVH, D, 1, packed=resolve(args.kv, None, None, qdt)[1])
        cache = kv_pages.new_cache(spec, nblk, BS, torch.uint8, dev)
        step = 1 << 16
        for s0 in range(0, nblk * BS, step):
            n = min(step, nblk * BS - s0)
            k = torch.randn(n, KVH, D, dtype=qdt, device=dev, generator=g)
            write_packed(cache, k, k.flip(0), torch.arange(s0, s0 + n, device=dev))
        per_tok = cache.numel() // (nblk * BS)  # packed bytes of one token (all KV heads, K and V)
        if args.profile_only:
            for name in args.variants.split(","):
                for _ in range(2):
                    packed_decode(q, cache, table, nc, scale, **INT4[name])
            torch.cuda.synchronize()
            return
        ref = packed_decode(q, cache, table, nc, scale, max_seq_len=int(lens.max()), fast=False).float()
        for rep in range(args.repeat):
            for name in (args.big_variants if "x8192" in label else args.variants).split(","):
                kw = dict(INT4[name])
                if kw.pop("lpt", False):
                    kw["order"] = torch.argsort(nc, descending=True).to(torch.int32)
                try:
                    fn = lambda: packed_decode(q, cache, table, nc, scale, **kw)  # noqa: E731
                    d = (fn().float() - ref).abs().max().item()
                    ms = timed(fn)
                    nbytes = keys * per_tok
                    record(name=args.kv + ("/fp16" if qdt == torch.float16 else ""), shape=label, variant=name,
                           us=ms * 1e3, GBps=nbytes / ms / 1e6,
                           frac=nbytes / (ms / 1e3) / bw, d=d, rep=rep)
                except Exception as e:
                    record(name=args.kv, shape=label, variant=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        del cache
        torch.cuda.empty_cache()
        peers = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
        for peer in [p for p in args.peers.split(",") if p and not label.endswith("/hm")]:  # "fp8lpt": the fp8 kernel, longest first
            dt = peers[peer.removesuffix("lpt")]
            order = torch.argsort(nc, descending=True).to(torch.int32) if peer.endswith("lpt") else None
            c = torch.randn(2, nblk, BS, KVH, D, dtype=torch.bfloat16, device=dev, generator=g).to(dt)
            ms = timed(lambda: paged_decode(q, c, table, nc, scale, order=order))
            nbytes = keys * 2 * KVH * D * c.element_size()
            record(name=str(dt).split(".")[-1], shape=label, variant="lpt" if order is not None else "default",
                   us=ms * 1e3, GBps=nbytes / ms / 1e6, frac=nbytes / (ms / 1e3) / bw)
            del c
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
