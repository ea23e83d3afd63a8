"""Tile sweep of the MLA decode kernel and the MoE sort at DeepSeek-V2-Lite's decode shapes (CUDA).

    PYTHONPATH=. python3 scripts/mla_decode_sweep.py

For each (batch, context): the default launch's time and the best of the swept
(splits, BLOCK_N, warps, stages), as a fraction of the measured copy rate over the latent bytes.
Then the one-program MoE sort (``moe._align_kernel``) by chunk size at batch 1 and 128 (T*6 pairs).
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import bench_graph  # noqa: E402  (graph replay timing, shared with the other GPU benches)

from qkv.attention.triton import moe  # noqa: E402
from qkv.attention.triton.mla import mla_decode  # noqa: E402
from qkv.tools.bench_rates import device_rates  # noqa: E402


def mla(bw: float) -> None:
    H, R, P, bs = 16, 512, 64, 16
    for B, ctx in ((128, 640), (64, 8192), (1, 8192)):
        nblk = B * ctx // bs
        cache = torch.randn(nblk, bs, R + P, dtype=torch.bfloat16, device="cuda")
        table = torch.randperm(nblk, device="cuda", dtype=torch.int32).view(B, ctx // bs)
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        ql = torch.randn(B, H, R, dtype=torch.bfloat16, device="cuda")
        qr = torch.randn(B, H, P, dtype=torch.bfloat16, device="cuda")
        gb = cache.numel() * 2 / 1e9
        default = bench_graph(lambda: mla_decode(ql, qr, cache, table, nc, 0.07))
        rows = []
        for S, bn, w, st in itertools.product((1, 2, 4, 8, 16, 32), (16, 32, 64), (4, 8), (2, 3)):
            if B * S > 4096 or (bn == 64 and w == 4):
                continue
            try:
                ms = bench_graph(lambda: mla_decode(ql, qr, cache, table, nc, 0.07, splits=S, block_n=bn,
                                                    num_warps=w, num_stages=st), iters=20)
            except Exception as e:  # out of shared memory for a tile: skip the config
                print(f"  skip S{S} N{bn} w{w} s{st}: {type(e).__name__}")
                continue
            rows.append((ms, S, bn, w, st))
        rows.sort()
        print(f"MLA B={B} ctx={ctx}: default {default * 1e3:.1f} us = {gb / default * 1e3 / bw:.1%} of copy rate")
        for ms, S, bn, w, st in rows[:5]:
            print(f"   S={S:2d} BLOCK_N={bn:2d} warps={w} stages={st}: {ms * 1e3:7.1f} us = {gb / ms * 1e3 / bw:.1%}")
        del cache
        torch.cuda.empty_cache()


def align() -> None:
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
        out = [f"default {bench_graph(lambda: moe.align(idx, E, bm)) * 1e3:.1f} us"]
        for chunk, w in itertools.product((16, 32, 64, 128, 256), (1, 2, 4, 8)):
            if chunk > triton.next_power_of_2(max(n, 16)) * 2:
                continue
            ms = bench_graph(lambda: moe._align_kernel[(1,)](
                flat, sorted_ids, block_expert, num_padded, n, bound, bound // bm, E=E, E_P2=E, BLOCK_M=bm,
                CHUNK=chunk, num_warps=w))
            out.append(f"c{chunk}/w{w} {ms * 1e3:.1f}")
        print(f"align T={T} (pairs {n}): " + ", ".join(out))


if __name__ == "__main__":
    rates = device_rates(torch.device("cuda"))
    bw = rates["copy_Bps"] / 1e9  # GB/s, read + write counted
    print("rates", rates)
    mla(bw)
    align()
