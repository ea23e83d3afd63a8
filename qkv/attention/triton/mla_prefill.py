"""MLA prefill / extend: up-project the latent to per-head K/V, then causal flash attention.

Prefill is compute-bound, so it runs as vLLM runs it: the latents a chunk attends to (its
cached prefix, read from the latent pages, and its own rows) are up-projected once by
``kv_b_proj`` to per-head ``k_nope`` and ``v``; attention then costs ``Dn + P + Dv`` (320 for
DeepSeek) multiply-adds per query, key and head, against ``2R + P`` (1,088) for the absorbed
form, and the up-projection is linear in the keys. Decode is memory-bound and stays absorbed
(``mla.py``): one latent row read serves every head.

The kernel: grid ``(cdiv(max_query_len, BLOCK_M), prefill sequences, heads)``. Sequence ``s``
owns query rows ``q_start[s] + [0, q_len[s])`` at positions ``num_computed[s] + m`` and the
keys ``k_start[s] + [0, num_computed[s] + q_len[s])`` of the up-projected buffers, key ``j``
at position ``j``. Scores go through an online softmax (no score matrix in memory); tiles
wholly before the diagonal skip the causal mask, tiles after it are never loaded. The RoPE key
is one row per token shared by all heads: it is read from the latent rows, never expanded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mla_prefill_kernel(QN, QP, KN, V, KP, QSTART, QLEN, KSTART, NC, OUT,
                        stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_knt, stride_knh,
                        stride_vt, stride_vh, stride_kpt, stride_ot, stride_oh, sm_scale,
                        DN: tl.constexpr, DV: tl.constexpr, P: tl.constexpr, DN_PAD: tl.constexpr,
                        DV_PAD: tl.constexpr, P_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    mblk = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    qlen = tl.load(QLEN + s).to(tl.int32)
    if mblk * BLOCK_M >= qlen:
        return
    row0 = tl.load(QSTART + s).to(tl.int64)
    k0 = tl.load(KSTART + s).to(tl.int64)
    nc = tl.load(NC + s).to(tl.int32)
    m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < qlen
    dn, dv, p_ = tl.arange(0, DN_PAD), tl.arange(0, DV_PAD), tl.arange(0, P_PAD)
    dnm, dvm, pm = dn < DN, dv < DV, p_ < P
    qrow = row0 + m
    qn = tl.load(QN + qrow[:, None] * stride_qnt + h * stride_qnh + dn[None, :], mask=mmask[:, None] & dnm[None, :],
                 other=0.0)
    qp = tl.load(QP + qrow[:, None] * stride_qpt + h * stride_qph + p_[None, :], mask=mmask[:, None] & pm[None, :],
                 other=0.0)
    q_pos = nc + m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    q_first = nc + mblk * BLOCK_M
    hi = nc + tl.minimum(mblk * BLOCK_M + BLOCK_M, qlen)  # keys past this block's last query: none
    full_end = (q_first // BLOCK_N) * BLOCK_N  # [0, full_end): keys every query row of the block sees
    for start in range(0, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        kmask = k_pos < hi
        krow = k0 + k_pos
        kn = tl.load(KN + krow[:, None] * stride_knt + h * stride_knh + dn[None, :],
                     mask=kmask[:, None] & dnm[None, :], other=0.0)
        kp = tl.load(KP + krow[:, None] * stride_kpt + p_[None, :], mask=kmask[:, None] & pm[None, :], other=0.0)
        v = tl.load(V + krow[:, None] * stride_vt + h * stride_vh + dv[None, :],
                    mask=kmask[:, None] & dvm[None, :], other=0.0)
        sc = tl.dot(qn, tl.trans(kn.to(qn.dtype)), input_precision=PRECISION)
        sc += tl.dot(qp, tl.trans(kp.to(qp.dtype)), input_precision=PRECISION)
        sc = sc * qk_scale
        if start + BLOCK_N > full_end:  # the diagonal tiles: causal mask and the key bound
            sc = tl.where((k_pos[None, :] <= q_pos[:, None]) & kmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(qn.dtype), v.to(qn.dtype), input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]  # every query sees at least its own key: l_i > 0
    tl.store(OUT + qrow[:, None] * stride_ot + h * stride_oh + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=mmask[:, None] & dvm[None, :])


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, v: torch.Tensor,
                k_pe: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor, k_start: torch.Tensor,
                num_computed: torch.Tensor, max_query_len: int, scale: float, out: torch.Tensor) -> None:
    """Causal attention of the prefill sequences' queries over their up-projected keys.

    q_nope [T, H, Dn], q_pe [T, H, P] (RoPE applied); k_nope [K, H, Dn] and v [K, H, Dv] (any strides
    with a unit last one: a transposed [H, K, D] matmul output is fine); k_pe [K, P] (the latent rows' RoPE part, may be
    a column slice). q_start/q_len/k_start/num_computed: [S] int64 per prefill sequence (see
    the module docstring). Writes ``out`` [T, H, Dv] (caller-allocated) at those sequences'
    rows only; other rows are left as they are."""
    T, H, DN = q_nope.shape
    P, DV = q_pe.shape[2], out.shape[2]
    S = q_len.shape[0]
    if S == 0 or T == 0:
        return
    fp32 = q_nope.dtype == torch.float32
    if not q_nope.is_cuda:  # the interpreter: small tiles keep numpy fast
        BLOCK_M = BLOCK_N = 16
        warps, stages = 4, 1
    elif fp32 or max(DN, DV) > 128:
        BLOCK_M, BLOCK_N, warps, stages = 64, 32, 4, 2
    else:  # H100/H200, bf16 DeepSeek (128 + 64 | 128): 128-query tiles halve the key reloads
        BLOCK_M, BLOCK_N, warps, stages = 128, 64, 8, 2
    grid = (triton.cdiv(max_query_len, BLOCK_M), S, H)
    _mla_prefill_kernel[grid](
        q_nope, q_pe, k_nope, v, k_pe, q_start, q_len, k_start, num_computed, out,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        v.stride(0), v.stride(1),
        k_pe.stride(0), out.stride(0), out.stride(1), scale,
        DN=DN, DV=DV, P=P, DN_PAD=max(16, triton.next_power_of_2(DN)), DV_PAD=max(16, triton.next_power_of_2(DV)),
        P_PAD=max(16, triton.next_power_of_2(P)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if fp32 else "tf32", num_warps=warps, num_stages=stages)
