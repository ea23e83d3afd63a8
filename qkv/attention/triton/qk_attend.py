"""A q/k-norm model's (Qwen3's) whole decode attention in one launch per layer: per-head q/k
RMSNorm, RoPE, the K/V write and paged decode attention with its splits merged in the kernel
(Llama's the same without the norms).

Where ``qk_decode.attend`` runs ``fused.qk_norm_rope`` (which stores the rotated q and k and
writes k and v into the cache) and then the decode kernel (and, past 8 splits, its combine),
each program of this kernel (sequence, KV head, split) reads its group's q rows straight from
the qkv projection, normalizes and rotates them in registers; the split that holds the step's
own key computes that key the same way, stores it and v at the step's slot, and uses them from
registers for that key's row (a tile load may still see the row's old bytes). The last split to
finish merges all of them (``decode._merge_vec``). With programmatic dependent launch in a CUDA
graph (``static``) the block table, lengths, slots and the first K/V tile are read before the
wait for the projection. Same math and rounding points as the two kernels it replaces.

Applies where ``qk_decode.applies`` does and the head dim is a power of two; switch
``QKV_FUSE_QK_ATTEND`` (read at import; qk_decode.FUSE_ATTEND).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton import pdl
from qkv.attention.triton.decode import _merge_vec, _online, _tile, split_counters


@triton.jit
def _norm_rope(x, xr, w, wr, cos, sin, sgn, eps, D: tl.constexpr, DT: tl.constexpr, NORM: tl.constexpr = True):
    """Rows x [R, D] (fp32; xr: each element's RoPE partner, column (d + D/2) % D) -> RMSNorm
    then neox RoPE, rounded as ``fused._norm_rope_rows`` rounds: the norm's output to DT, times
    the weight to DT, the rotation to DT. ``NORM=False`` (Llama): the rotation alone (w unused)."""
    if NORM:
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
        n = ((x * rstd).to(DT).to(tl.float32) * w[None, :]).to(DT).to(tl.float32)
        nr = ((xr * rstd).to(DT).to(tl.float32) * wr[None, :]).to(DT).to(tl.float32)
    else:
        n = x
        nr = xr
    return (n * cos[None, :] + (sgn[None, :] * nr) * sin[None, :]).to(DT)


@triton.jit(do_not_specialize=["stride_bt"])
def _qk_attend_kernel(QKV, QW, KW, COS, SIN, POS, SLOT, KC, VC, BT, NC, QSL, ACC, ML, CNT, OUT,
                      stride_x, stride_c, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
                      sm_scale, eps, H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, G2: tl.constexpr,
                      D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                      S2: tl.constexpr, SC: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr,
                      NORM: tl.constexpr = True):
    if not PRE:  # pdl.py's contract: sync before reading what earlier kernels wrote, before any return
        pdl.sync(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    KVH = tl.num_programs(1)
    split = tl.program_id(2)
    qrow = tl.load(QSL + b)
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    own_pos = seq_len - 1  # the step's own key
    per_split = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    n_active = tl.cdiv(seq_len, per_split)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    d = tl.arange(0, D)
    ar = tl.arange(0, BLOCK_N)
    if PRE:  # static inputs (a CUDA graph) and keys older than the step: read before the wait
        nm0, off0 = _tile(BT + b * stride_bt, lo, hi, 1, stride_cb, stride_ct, kvh * stride_ch, BS, BLOCK_N, False)
        k0 = tl.load(KC + off0[:, None] + d[None, :], mask=nm0[:, None], other=0.0)
        v0 = tl.load(VC + off0[:, None] + d[None, :], mask=nm0[:, None], other=0.0)
        pdl.sync(PDL)
    if tl.load(QSL + b + 1) - qrow != 1:  # a prefill row of a mixed batch
        return
    if split >= n_active:
        return
    DT = KC.dtype.element_ty
    dr = (d + D // 2) % D
    sgn = tl.where(d < D // 2, -1.0, 1.0)
    pos = tl.load(POS + qrow)
    cos = tl.load(COS + pos * stride_c + d).to(tl.float32)
    sin = tl.load(SIN + pos * stride_c + d).to(tl.float32)
    row = QKV + qrow.to(tl.int64) * stride_x
    # q: this KV head's group of query heads, normalized and rotated in registers.
    g = tl.arange(0, G_PAD)
    gmask = (g < G)[:, None]
    qb = row + (kvh * G + g)[:, None] * D
    q = _norm_rope(tl.load(qb + d[None, :], mask=gmask, other=0.0).to(tl.float32),
                   tl.load(qb + dr[None, :], mask=gmask, other=0.0).to(tl.float32),
                   tl.load(QW + d).to(tl.float32), tl.load(QW + dr).to(tl.float32), cos, sin, sgn, eps, D, DT, NORM)
    # The step's own key and value (of this KV head).
    kb = row + H * D + kvh * D + tl.arange(0, 1)[:, None] * 0
    k_new = _norm_rope(tl.load(kb + d[None, :]).to(tl.float32), tl.load(kb + dr[None, :]).to(tl.float32),
                       tl.load(KW + d).to(tl.float32), tl.load(KW + dr).to(tl.float32), cos, sin, sgn, eps, D, DT,
                       NORM)
    v_new = tl.load(row + (H + KVH) * D + kvh * D + d)[None, :].to(DT)
    if (own_pos >= lo) & (own_pos < hi):  # this split holds the own key: it writes the cache row
        slot = tl.load(SLOT + qrow)
        if slot >= 0:  # -1: a padding row, stores nothing
            c = slot.to(tl.int64) * stride_ct + kvh * stride_ch + d[None, :]
            tl.store(KC + c, k_new)
            tl.store(VC + c, v_new)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    first = lo
    if PRE:
        if lo < hi:
            own = (nm0 & (lo + ar == own_pos))[:, None]
            k0 = tl.where(own, k_new, k0.to(DT))
            v0 = tl.where(own, v_new, v0.to(DT))
            m_i, l_i, acc = _online(q, k0, v0, nm0, m_i, l_i, acc, sm_scale, 0.0, False)
        first = lo + BLOCK_N
    for start in range(first, hi, BLOCK_N):
        nmask, off = _tile(BT + b * stride_bt, start, hi, 1, stride_cb, stride_ct, kvh * stride_ch, BS, BLOCK_N,
                           False)
        own = (nmask & (start + ar == own_pos))[:, None]
        k = tl.where(own, k_new, tl.load(KC + off[:, None] + d[None, :], mask=nmask[:, None], other=0.0).to(DT))
        v = tl.where(own, v_new, tl.load(VC + off[:, None] + d[None, :], mask=nmask[:, None], other=0.0).to(DT))
        m_i, l_i, acc = _online(q, k, v, nmask, m_i, l_i, acc, sm_scale, 0.0, False)
    heads = kvh * G + g
    out_ptr = OUT + qrow * stride_ot + heads[:, None] * stride_oh + d[None, :]
    if S == 1:
        tl.store(out_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask)
    else:  # partial state; the last split to finish merges (decode.py's in-kernel merge)
        base = (b * KVH + kvh) * S
        r = (base + split) * G_PAD + g
        tl.store(ACC + r[:, None] * D + d[None, :], acc)
        tl.store(ML + r * 2, m_i)
        tl.store(ML + r * 2 + 1, l_i)
        tl.debug_barrier()
        done = tl.atomic_add(CNT + b * KVH + kvh, 1, sem="acq_rel", scope="gpu")
        if done == n_active - 1:
            g2 = tl.arange(0, G2)
            tl.store(OUT + qrow * stride_ot + (kvh * G + g2)[:, None] * stride_oh + d[None, :],
                     _merge_vec(ACC, ML, base, n_active, d, G_PAD, G2, D, S2, SC).to(OUT.dtype.element_ty),
                     mask=(g2 < G)[:, None])
            tl.store(CNT + b * KVH + kvh, 0)  # ready for the next launch or replay


def qk_attend(qkv: torch.Tensor, num_heads: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
              eps: float,
              positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor, block_table: torch.Tensor, num_computed: torch.Tensor,
              query_start_loc: torch.Tensor, scale: float, splits: int, static: bool = False,
              block_n: int = 64) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) D] (one decode row per sequence: row ``query_start_loc[b]``; rows of
    other lengths are skipped), ``positions`` [T] indexing the ``cos``/``sin`` tables, a float
    ``kv_cache`` [2, blocks, bs, KVH, D] of qkv's dtype, ``slot_mapping`` [T] (-1: no write).
    Returns the attention output [T, H, D]; the cache holds the step's k (normalized, rotated)
    and v at their slots. ``q_weight=None``: no q/k norms (Llama), RoPE only."""
    T = qkv.shape[0]
    _, _, bs, kvh, D = kv_cache.shape
    H = num_heads
    B = num_computed.shape[0]
    assert D == triton.next_power_of_2(D) and qkv.shape[1] == (H + 2 * kvh) * D and qkv.stride(1) == 1
    kc, vc = kv_cache[0], kv_cache[1]
    assert kc.dtype == qkv.dtype and kc.stride(3) == 1 and kc.stride(2) == D and kc.stride(0) == bs * kc.stride(1)
    G = H // kvh
    G_PAD, G2 = max(16, triton.next_power_of_2(G)), triton.next_power_of_2(G)
    S, S2 = splits, triton.next_power_of_2(splits)
    out = torch.empty((T, H, D), dtype=qkv.dtype, device=qkv.device)
    rows = B * kvh * S * G_PAD if S > 1 else 1
    acc = torch.empty((rows, D), dtype=torch.float32, device=qkv.device)
    ml = torch.empty((rows, 2), dtype=torch.float32, device=qkv.device)
    cnt = split_counters(B * kvh, qkv.device)
    norm = q_weight is not None
    if not norm:
        q_weight = k_weight = cos  # not read
    mode, kw = pdl.launch(qkv.device)
    _qk_attend_kernel[(B, kvh, S)](
        qkv, q_weight, k_weight, cos, sin, positions, slot_mapping, kc, vc, block_table, num_computed,
        query_start_loc, acc, ml, cnt, out, qkv.stride(0), cos.stride(0), kc.stride(0), kc.stride(1), kc.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1), scale, eps, H=H, G=G, G_PAD=G_PAD, G2=G2, D=D, BS=bs,
        BLOCK_N=block_n, S=S, S2=S2, SC=max(1, min(S2, 8192 // (G2 * D))), PDL=mode, PRE=static, NORM=norm,
        num_warps=4, num_stages=3, **kw)
    return out
