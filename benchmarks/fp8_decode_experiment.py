"""Experiment: layouts for the GQA decode kernel over an fp8 cache (H100).

The production kernel (qkv/attention/triton/decode.py) scores ``q @ k^T`` with the query heads as
the MMA's M rows (padded to 16) and the widened K tile as the B operand, which has to go back
through shared memory after the fp8 -> fp16 conversion. The variants here put the keys on M
instead (``k @ q^T``: the converted K tile is the register A operand, heads on N padded to 8 or
16), and compare against the production kernel on the same caches. No splits: the batches
tried have enough (sequence, KV head) programs to fill the card.

    PYTHONPATH=. python benchmarks/fp8_decode_experiment.py
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl


@triton.jit
def _swapped(Q, KC, VC, BT, NC, OUT, stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
             stride_ot, stride_oh, sm_scale, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
             BS: tl.constexpr, BLOCK_N: tl.constexpr, VT_LOAD: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gmask = g < G
    heads = kvh * G + g
    qT = tl.load(Q + b * stride_qt + heads[None, :] * stride_qh + d[:, None], mask=gmask[None, :], other=0.0)  # [D, G]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    accT = tl.zeros([D, G_PAD], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        nmask = pos < seq_len
        blk = tl.load(BT + b * stride_bt + pos // BS, mask=nmask, other=0).to(tl.int64)
        off = blk * stride_cb + (pos % BS) * stride_ct + kvh * stride_ch
        k = tl.load(KC + off[:, None] + d[None, :], mask=nmask[:, None], other=0.0).to(qT.dtype)  # [N, D]
        s = tl.dot(k, qT) * qk_scale  # [N, G]
        s = tl.where(nmask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        if VT_LOAD:
            vT = tl.load(VC + off[None, :] + d[:, None], mask=nmask[None, :], other=0.0).to(qT.dtype)  # [D, N]
        else:
            vT = tl.trans(tl.load(VC + off[:, None] + d[None, :], mask=nmask[:, None], other=0.0).to(qT.dtype))
        accT = accT * alpha[None, :] + tl.dot(vT, p.to(qT.dtype))
        m_i = m_new
    out = accT / l_i[None, :]
    tl.store(OUT + b * stride_ot + heads[None, :] * stride_oh + d[:, None], out.to(OUT.dtype.element_ty),
             mask=gmask[None, :])


def swapped(q, cache, table, nc, scale, g_pad=16, block_n=64, warps=4, stages=3, vt_load=True, dt=torch.float16):
    B, H, D = q.shape
    kc, vc = cache[0], cache[1]
    kvh = kc.shape[2]
    out = torch.empty_like(q)
    qd = q.to(dt)
    _swapped[(B, kvh)](qd, kc, vc, table, nc, out, qd.stride(0), qd.stride(1), kc.stride(0), kc.stride(1),
                       kc.stride(2), table.stride(0), out.stride(0), out.stride(1), scale, G=H // kvh, G_PAD=g_pad,
                       D=D, BS=kc.shape[1], BLOCK_N=block_n, VT_LOAD=vt_load, num_warps=warps, num_stages=stages)
    return out


def main():
    from gpu_bench import bench_graph as bench  # scripts/ is on sys.path when run as a script

    from qkv.attention.triton.decode import paged_decode

    bw = 3.0e12
    for B, ctx in ((32, 8192), (256, 1024), (256, 2048)):
        H, KVH, D, bs = 32, 8, 128, 16
        nblk = B * ctx // bs
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda").to(torch.float8_e4m3fn)
        table = torch.randperm(nblk, device="cuda").view(B, ctx // bs).contiguous()
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
        ref = paged_decode(q, cache, table, nc, 0.088, max_seq_len=ctx)
        row = {"production": round(cache.numel() / (bench(lambda: paged_decode(q, cache, table, nc, 0.088,
                                                                                max_seq_len=ctx)) / 1e3) / bw, 3)}
        for g_pad in (8, 16):
            for block_n, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (256, 8, 3)):
                for vt in (True, False):
                    key = f"swap/G{g_pad}/N{block_n}/w{warps}/s{stages}/{'vT' if vt else 'trans'}"
                    try:
                        fn = lambda: swapped(q, cache, table, nc, 0.088, g_pad, block_n, warps, stages, vt)  # noqa: E731
                        err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
                        if err > 1e-2:
                            row[key] = f"wrong {err:.1e}"
                            continue
                        row[key] = round(cache.numel() / (bench(fn) / 1e3) / bw, 3)
                    except Exception as e:  # a layout Triton cannot build is skipped
                        row[key] = f"failed {type(e).__name__}"
        best = max((k for k in row if isinstance(row[k], float)), key=row.get)
        print(json.dumps(dict(name="fp8_decode_experiment", B=B, ctx=ctx, best=best, bw_frac=row)), flush=True)
        del cache


if __name__ == "__main__":
    main()
