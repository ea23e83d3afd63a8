"""Prefill / mixed-step attention over packed int8/int4 KV pages (kvcache/kv_pages.py).

Grid ``(cdiv(max_query_len, BLOCK_T), B, KVH)``: each program takes ``BLOCK_T`` query tokens
of one sequence and all ``G`` query heads of one KV head (``BLOCK_T * G_PAD`` rows of one
MMA), so every K/V tile is read and widened in registers once per KV head, by
``packed._tile`` (no dequantized copy of the cache). Causal and window masks come from the
key and query positions; the softmax is online (exp2), as ``prefill._attend``.

This step's own K/V must be seen as stored (quantized, then dequantized: the reference's
``kv_pages.stored``). They are quantized by ``packed.write_packed``, which stores the very
bytes ``kv_pages.write`` stores, so reading them back from pages equals the reference:
  * full-attention layers: the step's K/V are written into the cache first, and every key,
    old and new, is read from the pages (one phase);
  * ring (sliding-window) layers: a chunk longer than the ring would overwrite keys its own
    first queries still read, so, as the bf16 prefill kernel reads before writing, the step's
    K/V are quantized into scratch pages (the step's row r at slot r), read from there in a
    second phase, and written into the ring after the kernel.
Rotated (Hadamard) planes: the rotated query is scored and the output rotated back.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkv.attention.triton.decode import _scores
from qkv.attention.triton.packed import _layout_args, _rotate, _tile, packed_decode, write_packed


@triton.jit
def _attend(q, k, v, q_pos, k_pos, kmask, m_i, l_i, acc, sm_scale, softcap, window,
            HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr = True):
    """One key tile of the online softmax (scores in log2 units). ``MASKED=False``: the caller
    guarantees every key of the tile is valid and visible to every query row."""
    s = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), sm_scale, softcap, HAS_SOFTCAP)
    if MASKED:
        dist = q_pos[:, None] - k_pos[None, :]
        allowed = (dist >= 0) & kmask[None, :]
        if HAS_WINDOW:
            allowed = allowed & (dist < window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _kv(P32, P8, P16, base, row, nmask, k_vals, k_scales, v_vals, v_scales, K_BITS: tl.constexpr,
        K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        ALIGN: tl.constexpr, DT: tl.constexpr):
    """A key tile and its value tile, widened from the packed planes of pages ``P*`` (the cache's
    or the scratch pages): rows ``row`` of the pages at byte offsets ``base``."""
    k = _tile(P32, P8, P16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT)
    v = _tile(P32, P8, P16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT)
    return k, v


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _packed_prefill_kernel(Q, C8, C16, C32, S8, S16, S32, BT, QSL, NC, OUT,
                           stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, page_bytes,
                           k_vals, k_scales, v_vals, v_scales, sm_scale, softcap, window, ring,
                           KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                           BS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                           K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                           ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, STEP_IN_CACHE: tl.constexpr, SKIP_DECODE: tl.constexpr,
                           IEEE: tl.constexpr):
    mblk = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query tiles (the most keys) start first
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    row0 = tl.load(QSL + b).to(tl.int32)
    qlen = tl.load(QSL + b + 1).to(tl.int32) - row0
    if mblk * BLOCK_T >= qlen:
        return
    if SKIP_DECODE and qlen == 1:  # left to the packed decode kernel
        return
    nc = tl.load(NC + b).to(tl.int32)
    DT = Q.dtype.element_ty
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    BLOCK_M: tl.constexpr = BLOCK_T * G_PAD
    i = tl.arange(0, BLOCK_M)
    t = mblk * BLOCK_T + i // G_PAD  # row i: token t, query head kvh * G + g
    g = i % G_PAD
    mmask = (t < qlen) & (g < G)
    heads = kvh * G + g
    d = tl.arange(0, D)
    q = tl.load(Q + (row0 + t)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=mmask[:, None], other=0.0)
    q_pos = tl.where(mmask, nc + t, -1)  # padding rows see nothing (dropped at the store)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    q_lo = nc + mblk * BLOCK_T
    q_hi = nc + tl.minimum(mblk * BLOCK_T + BLOCK_T, qlen)  # exclusive
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    # Phase 1: keys from the cache's pages through the block table (ring-indexed): the cached
    # prefix, and with STEP_IN_CACHE this step's keys too (already written).
    end = nc
    if STEP_IN_CACHE:
        end = q_hi
    full_end = lo  # [lo, full_end): whole tiles every query row sees, unmasked (none with a window)
    if not HAS_WINDOW:
        full_end = (tl.minimum(q_lo, end) // BLOCK_N) * BLOCK_N
        for start in range(lo, full_end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            nmask = k_pos < full_end  # (all true: the loads' mask)
            blk = tl.load(BT + b * stride_bt + k_pos // BS).to(tl.int64)
            row = (k_pos % BS) * KVH + kvh
            base = blk * page_bytes
            k, v = _kv(C32, C8, C16, base, row, nmask, k_vals, k_scales, v_vals, v_scales, K_BITS, K_GRP,
                       V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT)
            m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, nmask, m_i, l_i, acc, sm_scale, softcap, window,
                                    HAS_WINDOW, HAS_SOFTCAP, PREC, MASKED=False)
    for start in range(full_end, end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        nmask = k_pos < end
        pg = k_pos // BS
        if HAS_RING:
            pg = pg % ring
        blk = tl.load(BT + b * stride_bt + pg, mask=nmask, other=0).to(tl.int64)
        row = (k_pos % BS) * KVH + kvh  # the token's row of this head in its page's planes
        base = blk * page_bytes
        k, v = _kv(C32, C8, C16, base, row, nmask, k_vals, k_scales, v_vals, v_scales, K_BITS, K_GRP,
                   V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT)
        m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, nmask, m_i, l_i, acc, sm_scale, softcap, window,
                                HAS_WINDOW, HAS_SOFTCAP, PREC)
    # Phase 2 (rings): this step's keys [nc, q_hi) from the scratch pages, row r at slot r.
    if not STEP_IN_CACHE:
        lo2 = nc
        if HAS_WINDOW:
            lo2 = tl.maximum(nc, q_lo - window + 1)
        lo2 = nc + ((lo2 - nc) // BLOCK_N) * BLOCK_N
        for start in range(lo2, q_hi, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            nmask = k_pos < q_hi
            r = tl.where(nmask, row0 + (k_pos - nc), 0)
            base = (r // BS).to(tl.int64) * page_bytes
            row = (r % BS) * KVH + kvh
            k, v = _kv(S32, S8, S16, base, row, nmask, k_vals, k_scales, v_vals, v_scales, K_BITS, K_GRP,
                       V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT)
            m_i, l_i, acc = _attend(q, k, v, q_pos, k_pos, nmask, m_i, l_i, acc, sm_scale, softcap, window,
                                    HAS_WINDOW, HAS_SOFTCAP, PREC)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # (padding rows: 0, not 0/0; not stored)
    tl.store(OUT + (row0 + t)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=mmask[:, None])


def packed_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   block_table: torch.Tensor, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                   num_computed: torch.Tensor, max_query_len: int, scale: float, window: int | None = None,
                   ring: int | None = None, softcap: float | None = None, mixed: bool = False,
                   max_seq_len: int | None = None,
                   block_t: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] packed by ``query_start_loc``: sequence b's queries sit at
    positions ``num_computed[b]`` onwards and see the cached prefix and this step's keys up to
    their own (within ``window``). Writes k/v (quantized) at ``slot_mapping`` (-1: skipped) and
    returns [T, H, D] in q's dtype: ``reference.packed_attention``'s values. ``mixed`` (a step
    that may hold one-token sequences beside longer ones): those rows go to the split-K
    ``packed_decode`` after the write (one program per KV head would walk a long context
    alone), sized by ``max_seq_len`` (the most keys a sequence sees; None: any). ``block_t``
    (query tokens per program), ``block_n`` (keys per tile), ``num_warps``, ``num_stages``: the
    launch (defaults: 128 MMA rows, 64 keys)."""
    lay, kp, vp = _layout_args(kv_cache)
    T, H, D = q.shape
    kvh = kp.rows
    if D & (D - 1) or D < 32:
        raise NotImplementedError(f"the packed prefill kernel needs a power-of-two head_dim >= 32, got {D}")
    G = H // kvh
    B = query_start_loc.shape[0] - 1
    bs, page_bytes = lay.block_size, lay.page_bytes
    step_in_cache = ring is None
    if step_in_cache:  # every position has its own slot: store first, read every key from pages
        write_packed(kv_cache, k, v, slot_mapping)
        scratch = kv_cache
    else:  # read before writing (see the module doc): the step's K/V as stored, in scratch pages
        scratch = torch.empty((triton.cdiv(T, bs), page_bytes), dtype=torch.uint8, device=q.device)
        scratch.kv_layout = lay
        write_packed(scratch, k, v, torch.arange(T, device=q.device))
    if kp.rotated:  # scores of the rotated query against the rotated keys (kv_pages)
        q = _rotate(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    G_PAD = triton.next_power_of_2(G)
    big = D > 128 or q.dtype == torch.float32
    # BLOCK_T tokens x G_PAD heads = 128 rows of one MMA (64 for wide heads or fp32).
    rows = 64 if big else 128
    block_t = block_t or max(1, rows // G_PAD)
    block_t = max(block_t, triton.cdiv(16, G_PAD))  # tl.dot needs M >= 16
    block_n = block_n or (32 if big else 64)
    words = D * min(kp.fmt.bits, vp.fmt.bits) // 32
    align = math.gcd(page_bytes // 4, kp.values_at // 4, vp.values_at // 4, words, 4)
    grid = (triton.cdiv(max_query_len, block_t), B, kvh)
    _packed_prefill_kernel[grid](
        q, kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int32),
        scratch, scratch.view(torch.float16), scratch.view(torch.int32),
        block_table, query_start_loc, num_computed, out,
        q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1), page_bytes,
        kp.values_at, kp.scales_at, vp.values_at, vp.scales_at, scale, softcap or 0.0, window or 0, ring or 1,
        KVH=kvh, G=G, G_PAD=G_PAD, D=D, BS=bs, BLOCK_T=block_t, BLOCK_N=block_n,
        K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D), V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D),
        ALIGN=align, HAS_WINDOW=window is not None, HAS_RING=ring is not None, HAS_SOFTCAP=softcap is not None,
        STEP_IN_CACHE=step_in_cache, SKIP_DECODE=mixed, IEEE=q.dtype == torch.float32,
        num_warps=num_warps or (4 if big else 8), num_stages=num_stages or (2 if big else 3))
    if not step_in_cache:
        write_packed(kv_cache, k, v, slot_mapping)
    if mixed:  # the one-token rows: the split-K decode kernel, in the rotated space as q and out are
        packed_decode(q, kv_cache, block_table, num_computed, scale, window, ring, softcap, max_seq_len=max_seq_len,
                      query_start_loc=query_start_loc, out=out, rotate=False)
    return _rotate(out) if vp.rotated else out
