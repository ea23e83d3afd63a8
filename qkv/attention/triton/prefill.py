"""Prefill / extend attention over a packed variable-length batch with a paged prefix.

Grid ``(cdiv(max_query_len, BLOCK_M), B, H)``: each program takes ``BLOCK_M`` query rows of
one sequence and one head. Keys come in two phases, like the reference backend:
  1. the prefix already in the cache (prefix-cache hits, earlier chunks), read from pages
     through the block table (ring-indexed for sliding-window groups);
  2. this step's own keys, read straight from ``k``/``v``, with the causal mask.
Reading before writing keeps a sliding-window ring correct when one chunk is longer than
the ring: the caller writes the new K/V into the cache only after this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton.decode import _scores, _tile
from qkv.kvcache.kv_quant import as_stored, compute_dtype, is_fp8


@triton.jit
def _attend(q, k, v, q_pos, k_pos, kmask, m_i, l_i, acc, sm_scale, softcap, window,
            HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr = True,
            dil=1, DILATED: tl.constexpr = False):
    """One key tile of the online softmax. ``MASKED=False``: the caller guarantees every key
    of the tile is valid and visible to every query row (no causal, window or padding test).
    ``window`` is the span in positions (W*d dilated); ``DILATED`` keeps every ``dil``-th key."""
    k = k.to(q.dtype)  # an fp8 cache is widened to the query's dtype
    v = v.to(q.dtype)
    s = _scores(tl.dot(q, tl.trans(k)), sm_scale, softcap, HAS_SOFTCAP)
    if MASKED:
        dist = q_pos[:, None] - k_pos[None, :]
        allowed = (dist >= 0) & kmask[None, :]
        if HAS_WINDOW:
            allowed = allowed & (dist < window)
        if DILATED:  # neighbouring queries see different residues: a mask, not a strided load
            allowed = allowed & (dist % dil == 0)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _as_fp8(x, dtype):
    """``x`` as an fp8 cache stores it (saturated, rounded to e4m3), back in ``dtype``."""
    x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
    return x.to(tl.float8e4nv).to(dtype)


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant for all
def _prefill_kernel(Q, K, V, KC, VC, BT, QSL, NC, OUT,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
                    sm_scale, softcap, window, ring, dil,
                    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    SKIP_DECODE: tl.constexpr, ROUND_FP8: tl.constexpr, DILATED: tl.constexpr):
    mblk = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // G
    row0 = tl.load(QSL + b).to(tl.int32)
    qlen = tl.load(QSL + b + 1).to(tl.int32) - row0
    if mblk * BLOCK_M >= qlen:
        return
    if SKIP_DECODE and qlen == 1:  # left to the GQA decode kernel
        return
    nc = tl.load(NC + b).to(tl.int32)
    m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < qlen
    d = tl.arange(0, D_PAD)
    dmask = d < D
    q = tl.load(Q + (row0 + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    q_pos = nc + m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Phase 1: cached keys [lo, nc) from pages.
    q_lo = nc + mblk * BLOCK_M
    q_hi = nc + tl.minimum(mblk * BLOCK_M + BLOCK_M, qlen)  # exclusive
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_end = lo  # [lo, full_end): whole tiles every query sees (none with a window)
    if not (HAS_WINDOW or HAS_RING):
        full_end = (nc // BLOCK_N) * BLOCK_N
        for start in range(lo, full_end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            blk = tl.load(BT + b * stride_bt + k_pos // BS).to(tl.int64)
            off = blk * stride_cb + (k_pos % BS) * stride_ct + kvh * stride_ch
            k = tl.load(KC + off[:, None] + d[None, :], mask=dmask[None, :], other=0.0)
            v = tl.load(VC + off[:, None] + d[None, :], mask=dmask[None, :], other=0.0)
            m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, k_pos < nc, m_i, l_i, acc, sm_scale, softcap, window,
                                    HAS_WINDOW, HAS_SOFTCAP, MASKED=False)
    for start in range(full_end, nc, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        kmask, off = _tile(BT + b * stride_bt, start, nc, ring, stride_cb, stride_ct, kvh * stride_ch,
                           BS, BLOCK_N, HAS_RING)
        lmask = kmask[:, None] & dmask[None, :]
        k = tl.load(KC + off[:, None] + d[None, :], mask=lmask, other=0.0)
        v = tl.load(VC + off[:, None] + d[None, :], mask=lmask, other=0.0)
        m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, kmask, m_i, l_i, acc, sm_scale, softcap, window,
                                HAS_WINDOW, HAS_SOFTCAP, True, dil, DILATED)

    # Phase 2: this step's keys [nc, q_hi) from k/v.
    lo2 = nc
    if HAS_WINDOW:
        lo2 = tl.maximum(nc, q_lo - window + 1)
    lo2 = nc + ((lo2 - nc) // BLOCK_N) * BLOCK_N
    diag = lo2  # [lo2, diag): tiles wholly before this block's first query (none with a window)
    if not HAS_WINDOW:
        diag = nc + ((mblk * BLOCK_M) // BLOCK_N) * BLOCK_N
        for start in range(lo2, diag, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            r = row0 + (k_pos - nc)
            k = tl.load(K + r[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=dmask[None, :], other=0.0)
            v = tl.load(V + r[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=dmask[None, :], other=0.0)
            if ROUND_FP8:
                k, v = _as_fp8(k, q.dtype), _as_fp8(v, q.dtype)
            m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, k_pos < q_hi, m_i, l_i, acc, sm_scale, softcap, window,
                                    HAS_WINDOW, HAS_SOFTCAP, MASKED=False)
    for start in range(diag, q_hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        kmask = k_pos < q_hi
        r = row0 + (k_pos - nc)
        lmask = kmask[:, None] & dmask[None, :]
        k = tl.load(K + r[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=lmask, other=0.0)
        v = tl.load(V + r[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=lmask, other=0.0)
        if ROUND_FP8:
            k, v = _as_fp8(k, q.dtype), _as_fp8(v, q.dtype)
        m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, kmask, m_i, l_i, acc, sm_scale, softcap, window,
                                HAS_WINDOW, HAS_SOFTCAP, True, dil, DILATED)

    out = acc / l_i[:, None]
    tl.store(OUT + (row0 + m)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])


def paged_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  block_table: torch.Tensor, query_start_loc: torch.Tensor, num_computed: torch.Tensor,
                  max_query_len: int, scale: float, window: int | None = None, ring: int | None = None,
                  softcap: float | None = None, skip_decode: bool = False, dilation: int = 1) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] packed by ``query_start_loc``; returns [T, H, D] (q's dtype).
    Does not write the cache. With ``skip_decode`` the rows of one-token sequences are left
    unwritten, for the decode kernel to fill. A dilated window (``dilation`` d > 1) scans the
    ``window * d`` positions before each query tile and masks all but every d-th: d times the
    undilated prefill's key tiles (decode, the steady state, reads only the W keys)."""
    if dilation > 1 and window is None:
        raise ValueError(f"dilation={dilation} needs a window")
    T, H, D = q.shape
    kc, vc = kv_cache[0], kv_cache[1]
    bs, kvh = kc.shape[1], kc.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, even when q is a view
    dt = compute_dtype(q.dtype, kc.dtype)
    # This step's keys are read from k/v, the prefix's from pages: both must be as stored.
    # The kernel rounds k/v to fp8 as it loads them (ROUND_FP8) on the GPU; the interpreter
    # rounds e4m3 wrongly, so there the host does it.
    round_fp8 = is_fp8(kc.dtype) and q.is_cuda
    if is_fp8(kc.dtype) and not round_fp8:
        k, v = as_stored(k, kc.dtype), as_stored(v, kc.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    D_PAD = triton.next_power_of_2(D)
    big = D_PAD > 128 or dt == torch.float32
    # H100: 128-query tiles halve how often each K/V tile is loaded (8 warps, 3 stages).
    BLOCK_M, BLOCK_N = (64, 32) if big else (128, 64)
    B = query_start_loc.shape[0] - 1
    grid = (triton.cdiv(max_query_len, BLOCK_M), B, H)
    _prefill_kernel[grid](
        q, k, v, kc, vc, block_table, query_start_loc, num_computed, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
        scale, softcap or 0.0, window * dilation if window else 0, ring or 1, dilation,
        G=H // kvh, D=D, D_PAD=D_PAD, BS=bs, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_WINDOW=window is not None, HAS_RING=ring is not None, HAS_SOFTCAP=softcap is not None,
        SKIP_DECODE=skip_decode, ROUND_FP8=round_fp8, DILATED=dilation > 1, num_warps=4 if big else 8, num_stages=2 if big else 3)
    return out
