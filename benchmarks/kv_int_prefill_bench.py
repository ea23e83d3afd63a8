"""Prefill attention over int8/int4 KV pages: 8 sequences x 2048 new tokens over 2048 cached
(Llama-3-8B's attention shape: 32 heads, 8 KV heads, head_dim 128, blocks of 16), one layer.

Times, in the same run and on the same step (CUDA events, median of ``--iters``), each entry
point as the engine calls it (the step's K/V write included):
  * ``packed``: the Triton packed prefill kernel (triton.backend.packed_attention), and a few
    of its launch tilings (query tokens x keys per tile, warps, stages), each also with this
    step's keys read back into bf16 rows (``own``: packed_prefill.OWN_FLOAT), and the default with
    the cached prefix's page entries a tile ahead (``ahead``: packed_prefill.PAGES_AHEAD);
  * ``reference``: reference.packed_attention on the device (gathers and dequantizes the
    visible keys, then a dense softmax), the path prefill steps took before the kernel;
  * ``bf16`` / ``fp8``: the Triton backend's paged prefill over a bf16 / fp8 cache.
Each packed output's max abs difference from the reference is printed, so a wrong tiling shows.

    PYTHONPATH=. python benchmarks/kv_int_prefill_bench.py [--out DIR] [--iters 10]
    PYTHONPATH=. python benchmarks/kv_int_prefill_bench.py --new 1000 --cached 0 \
        --tilings "64,64,8,3;16,64,4,3;32,32,4,3;32,128,8,2;64,32,8,2"   # the 1000/1000 run's prompt step
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from qkv.attention import reference
from qkv.attention.batch import AttentionBatch
from qkv.attention.triton.backend import paged_attention as triton_paged
from qkv.attention.triton.packed_prefill import packed_prefill
from qkv.kvcache import kv_pages
from qkv.kvcache.kv_int import resolve
from qkv.kvcache.spec import FullAttention

B, NEW, CACHED, H, KVH, D, BS = 8, 2048, 2048, 32, 8, 128, 16
TILINGS = [(16, 64, 4, 3), (32, 128, 8, 2)]  # (block_t, block_n, warps, stages); default (32, 64, 8, 3)


def timed(fn, iters):
    if not torch.cuda.is_available():  # --small under Triton's interpreter: a smoke run of this script
        import time

        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def make_step(dev):
    per = -(-(CACHED + NEW) // BS)  # (a partial last block: 1,000 tokens take 63)
    perm = torch.randperm(B * per, device=dev)
    table = perm.view(B, per)
    pos = torch.arange(CACHED, CACHED + NEW, device=dev)
    slots = (table[:, pos // BS] * BS + pos % BS).reshape(-1)
    t64 = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
    return AttentionBatch(query_start_loc=t64([i * NEW for i in range(B + 1)]), num_computed=t64([CACHED] * B),
                          query_lens=t64([NEW] * B), max_query_len=NEW, max_seq_len=CACHED + NEW, block_size=BS,
                          block_tables=[table], slot_mappings=[slots], ring_blocks=[None])


def main():
    global B, NEW, CACHED, H, KVH, TILINGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run with TRITON_INTERPRET=1)")
    ap.add_argument("--new", type=int, default=None, help="new tokens a sequence (1000: the 1000/1000 run's prompts)")
    ap.add_argument("--cached", type=int, default=None, help="cached tokens a sequence before them")
    ap.add_argument("--tilings", default=None,
                    help="block_t,block_n,warps,stages;... (block_t: query tokens, x 4 heads = the MMA's rows)")
    ap.add_argument("--head-major", action="store_true", help="pages head-major (kv_pages.HEAD_MAJOR)")
    args = ap.parse_args()
    kv_pages.HEAD_MAJOR = args.head_major
    if args.tilings:
        TILINGS = [tuple(int(x) for x in t.split(",")) for t in args.tilings.split(";")]
    if args.small:  # (fp32: Triton 3.6's interpreter computes bf16 kernels wrongly, the decode kernel's too)
        B, NEW, CACHED, H, KVH, TILINGS = 2, 32, 32, 4, 2, []
    NEW = NEW if args.new is None else args.new
    CACHED = CACHED if args.cached is None else args.cached
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch = make_step(dev)
    nb = B * -(-(CACHED + NEW) // BS)
    T = B * NEW
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(T, n, D, device=dev, dtype=dtype) for n in (H, KVH, KVH))
    scale = D ** -0.5
    rows = []

    def rec(name, us, **kw):
        rows.append(dict(name=name, us=round(us, 1), **kw))
        print(f"{name:<40} {us:10.1f} us " + " ".join(f"{a}={b}" for a, b in kw.items()), flush=True)

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    print(f"# {name}: {B} seqs x {NEW} new over {CACHED} cached, H={H} KVH={KVH} D={D}")
    for dt in (torch.bfloat16, torch.float8_e4m3fn) if dev.type == "cuda" else ():
        cache = torch.randn(2, nb, BS, KVH, D, device=dev).to(dt)
        us = timed(lambda: triton_paged(q, k, v, cache, batch, 0, scale), args.iters)
        rec(f"triton paged prefill ({'fp8' if dt != torch.bfloat16 else 'bf16'} cache)", us)
        del cache
    for kv in ("int8", "int4"):
        spec = FullAttention(KVH, D, 1, packed=resolve(kv, None, None, torch.float32)[1])
        cache = kv_pages.new_cache(spec, nb, BS, torch.uint8, dev)
        allslots = torch.arange(nb * BS, device=dev)
        kv_pages.write(cache, 0, torch.randn(nb * BS, KVH, D, device=dev), allslots)
        kv_pages.write(cache, 1, torch.randn(nb * BS, KVH, D, device=dev), allslots)
        ref_cache = cache.clone()
        ref_cache.kv_layout = cache.kv_layout
        ref = reference.packed_attention(q, k, v, ref_cache, batch, 0, scale)
        us = timed(lambda: reference.packed_attention(q, k, v, ref_cache, batch, 0, scale), max(3, args.iters // 3))
        rec(f"reference packed_attention ({kv})", us)
        del ref_cache
        torch.cuda.empty_cache()
        runs = [(t, o, False) for t in [None] + TILINGS for o in (False, True)]
        runs += [(None, o, True) for o in (False, True)]  # the prefix's page entries a tile ahead
        for tiling, own, ahead in runs:
            kw = {} if tiling is None else dict(zip(("block_t", "block_n", "num_warps", "num_stages"), tiling))
            kw["own_float"] = own  # this step's keys read back once into bf16 rows (packed_prefill.OWN_FLOAT)
            kw["pages_ahead"] = ahead  # (packed_prefill.PAGES_AHEAD)

            def step():
                return packed_prefill(q, k, v, cache, batch.block_tables[0], batch.slot_mappings[0],
                                      batch.query_start_loc, batch.num_computed, NEW, scale, **kw)
            try:
                err = (step().float() - ref.float()).abs().max().item()
                us = timed(step, args.iters)
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile (shared memory)
                print(f"packed {kv} {tiling}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rec(f"triton packed prefill ({kv}) {'default' if tiling is None else tiling}{' own' if own else ''}"
                f"{' ahead' if ahead else ''}", us,
                max_abs_diff=f"{err:.2e}")
        del cache
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kv_int_prefill_bench.json"), "w") as f:
            shape = dict(B=B, new=NEW, cached=CACHED, H=H, KVH=KVH, D=D, block_size=BS)
            json.dump(dict(device=name, shape=shape, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
