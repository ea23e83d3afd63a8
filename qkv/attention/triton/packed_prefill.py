"""Prefill / mixed-step attention over packed int8/int4 KV pages (kvcache/kv_pages.py).

Grid ``(cdiv(max_query_len, BLOCK_T), B, KVH)``: each program takes ``BLOCK_T`` query tokens
of one sequence and all ``G`` query heads of one KV head (``BLOCK_T * G_PAD`` rows of one
MMA), so every K/V tile is read and widened in registers once per KV head (no dequantized copy
of the cache): as two halves by ``packed_widen._halves`` (the decode kernel's PTX widening; the
query's and the output's columns matched to them), or with ``HALVES`` off in natural order by
``packed._tile``. A mixed step's grid holds only the real query tiles (``COMPACT``). Causal and
window masks come from the key and query positions; the softmax is online (exp2), as
``prefill._attend``.

This step's own K/V must be seen as stored (quantized, then dequantized: the reference's
``kv_pages.stored``). They are quantized by ``packed.write_packed``, which stores the very
bytes ``kv_pages.write`` stores, so reading them back from pages equals the reference:
  * full-attention layers: the step's K/V are written into the cache first, and every key,
    old and new, is read from the pages (one phase);
  * ring (sliding-window) layers: a chunk longer than the ring would overwrite keys its own
    first queries still read, so, as the bf16 prefill kernel reads before writing, the step's
    K/V are quantized into scratch pages (the step's row r at slot r), read from there in a
    second phase, and written into the ring after the kernel.
Rotated (Hadamard) planes: the rotated query is scored and the output rotated back
(``rotate_rows``: one Triton kernel each, or inside this kernel with ``ROT_IN_KERNEL``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkv.attention.triton.decode import _scores
from qkv.attention.triton import packed
from qkv.attention.triton import order as launch_order  # looked up at call time
from qkv.attention.triton.packed import _layout_args, _rotate, _tile, packed_decode, write_packed
from qkv.attention.triton.packed_widen import _half_cols, _halves
from qkv.attention.triton.page_rows import page_row
from qkv.kvcache.kv_int import hadamard


@triton.jit
def _step(P32, P8, P16, base, row, nmask, k_pos, qa, qb, q_pos, m_i, l_i, acc_a, acc_b, sm_scale, softcap, window,
          k_vals, k_scales, v_vals, v_scales, K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr,
          V_GRP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr,
          HALVES: tl.constexpr, ASM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
          PREC: tl.constexpr, MASKED: tl.constexpr = True, KF=None, VF=None, frow=None, fa_c=None, fb_c=None,
          FLOAT: tl.constexpr = False):
    """One key tile of the online softmax (scores in log2 units), its K and V tiles widened from
    the packed planes of pages ``P*`` (the cache's or the scratch pages) at byte offsets ``base``,
    rows ``row``. HALVES: each tile as two halves of D/2 columns (packed_widen._halves: int4 the
    even and the odd columns, int8 the first and the second half; ASM widens them in PTX), two
    dots of depth D/2 against the query's matching columns ``qa``/``qb``, and two accumulators
    of the output's matching columns; else one tile in natural order (``qa`` the query, ``acc_a``
    the accumulator). ``MASKED=False``: every key of the tile is valid and visible to every row.
    ``FLOAT``: the tiles are rows ``frow`` (element offsets) of ``KF``/``VF``, this step's own
    keys as stored (``_read_back``, rows in the halves' order), each half at columns ``fa_c`` /
    ``fb_c`` of both (or whole at ``fa_c``)."""
    if FLOAT:
        ka = tl.load(KF + frow[:, None] + fa_c[None, :], mask=nmask[:, None], other=0.0)
        if HALVES:
            kb = tl.load(KF + frow[:, None] + fb_c[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(qb, tl.trans(kb), acc=tl.dot(qa, tl.trans(ka), input_precision=PREC), input_precision=PREC)
        else:
            s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    elif HALVES:
        ka, kb = _halves(P8, P16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT, ASM, P32)
        s = tl.dot(qb, tl.trans(kb), acc=tl.dot(qa, tl.trans(ka), input_precision=PREC), input_precision=PREC)
    else:
        k = _tile(P32, P8, P16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT)
        s = tl.dot(qa, tl.trans(k), input_precision=PREC)
    s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
    if MASKED:
        dist = q_pos[:, None] - k_pos[None, :]
        allowed = (dist >= 0) & nmask[None, :]
        if HAS_WINDOW:
            allowed = allowed & (dist < window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pd = p.to(DT)
    if FLOAT:
        va = tl.load(VF + frow[:, None] + fa_c[None, :], mask=nmask[:, None], other=0.0)
        acc_a = tl.dot(pd, va, acc=acc_a * alpha[:, None], input_precision=PREC)
        if HALVES:
            vb = tl.load(VF + frow[:, None] + fb_c[None, :], mask=nmask[:, None], other=0.0)
            acc_b = tl.dot(pd, vb, acc=acc_b * alpha[:, None], input_precision=PREC)
    elif HALVES:
        va, vb = _halves(P8, P16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT, ASM, P32)
        acc_a = tl.dot(pd, va, acc=acc_a * alpha[:, None], input_precision=PREC)
        acc_b = tl.dot(pd, vb, acc=acc_b * alpha[:, None], input_precision=PREC)
    else:
        v = _tile(P32, P8, P16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT)
        acc_a = tl.dot(pd, v, acc=acc_a * alpha[:, None], input_precision=PREC)
    return m_new, l_i, acc_a, acc_b


@triton.jit
def _rot_cols(x, HPM, cols, D: tl.constexpr, RSQ: tl.constexpr, PREC: tl.constexpr):
    """Columns ``cols`` of ``x [M, D] @ H`` (H = kv_int.hadamard's matrix = RSQ * HPM, HPM of
    +-1 in x's dtype: every product exact, the sum in fp32, one scaling), in x's dtype: packed._rotate's
    values up to the fp32 summation order."""
    h = tl.load(HPM + tl.arange(0, D)[:, None] * D + cols[None, :])
    return (tl.dot(x, h, input_precision=PREC) * RSQ).to(x.dtype)


@triton.jit
def _unrot(oa, ob, HPM, a_rows, b_rows, D: tl.constexpr, RSQ: tl.constexpr, PREC: tl.constexpr):
    """``[oa | ob] @ H`` for an output whose columns ``a_rows``/``b_rows`` are oa and ob."""
    d = tl.arange(0, D)
    ha = tl.load(HPM + a_rows[:, None] * D + d[None, :])
    hb = tl.load(HPM + b_rows[:, None] * D + d[None, :])
    o = tl.dot(ob, hb, acc=tl.dot(oa, ha, input_precision=PREC), input_precision=PREC)
    return o * RSQ


@triton.jit
def _tile_of(CUM, p, B):
    """Program ``p`` of a compact grid -> (sequence, its tile counted from its last, valid):
    CUM [B] the inclusive running count of each sequence's query tiles (0 for a sequence the
    kernel leaves alone); the sequence is the number of entries <= p, found with wide loads."""
    cnt = 0
    for c0 in range(0, B, 128):
        c = c0 + tl.arange(0, 128)
        cnt += tl.sum((tl.load(CUM + c, mask=c < B, other=2 ** 30) <= p).to(tl.int32), 0)
    b = tl.minimum(cnt, B - 1)
    end = tl.load(CUM + b)
    return b, end - 1 - p, cnt < B


@triton.jit(do_not_specialize=["stride_bt", "B"])  # the table's width varies per step: one variant
def _packed_prefill_kernel(Q, C8, C16, C32, S8, S16, S32, BT, QSL, NC, OUT, HPM, CUM, KF, VF, B,
                           stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, page_bytes,
                           k_vals, k_scales, v_vals, v_scales, sm_scale, softcap, window, ring,
                           KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                           BS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                           K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                           ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr,
                           HAS_SOFTCAP: tl.constexpr, STEP_IN_CACHE: tl.constexpr, SKIP_DECODE: tl.constexpr,
                           IEEE: tl.constexpr, HALVES: tl.constexpr = False, ASM: tl.constexpr = 0,
                           ROT_Q: tl.constexpr = False, ROT_O: tl.constexpr = False, RSQ: tl.constexpr = 1.0,
                           COMPACT: tl.constexpr = False, OWN_FLOAT: tl.constexpr = False,
                           PAGES_AHEAD: tl.constexpr = False, HEAD_MAJOR: tl.constexpr = False):
    kvh = tl.program_id(2)
    if COMPACT:  # one program per query tile of a sequence this kernel computes (CUM), the last tile first
        b, mblk, valid = _tile_of(CUM, tl.program_id(0), B)
        if not valid:
            return
    else:  # every (tile, sequence); programs past a sequence's tiles, or on its one-token row, return
        mblk = tl.num_programs(0) - 1 - tl.program_id(0)  # the last query tiles (the most keys) start first
        b = tl.program_id(1)
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
    VW: tl.constexpr = D // 2 if HALVES else D  # columns per accumulator
    i = tl.arange(0, BLOCK_M)
    t = mblk * BLOCK_T + i // G_PAD  # row i: token t, query head kvh * G + g
    g = i % G_PAD
    mmask = (t < qlen) & (g < G)
    heads = kvh * G + g
    d = tl.arange(0, D)
    if HALVES:
        ka_c, kb_c = _half_cols(K_BITS, D)
        va_c, vb_c = _half_cols(V_BITS, D)
    else:
        ka_c = d
        kb_c = d
        va_c = d
        vb_c = d
    qp = Q + (row0 + t)[:, None] * stride_qt + heads[:, None] * stride_qh
    if ROT_Q:  # K stored rotated: the rotated query's columns of K's halves, rotated here
        qn = tl.load(qp + d[None, :], mask=mmask[:, None], other=0.0)
        qa = _rot_cols(qn, HPM, ka_c, D, RSQ, PREC)
        qb = qa
        if HALVES:
            qb = _rot_cols(qn, HPM, kb_c, D, RSQ, PREC)
    else:
        qa = tl.load(qp + ka_c[None, :], mask=mmask[:, None], other=0.0)
        qb = qa
        if HALVES:
            qb = tl.load(qp + kb_c[None, :], mask=mmask[:, None], other=0.0)
    q_pos = tl.where(mmask, nc + t, -1)  # padding rows see nothing (dropped at the store)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, VW], tl.float32)
    acc_b = tl.zeros([BLOCK_M, VW], tl.float32)

    q_lo = nc + mblk * BLOCK_T
    q_hi = nc + tl.minimum(mblk * BLOCK_T + BLOCK_T, qlen)  # exclusive
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(q_lo - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    # Phase 1: keys from the cache's pages through the block table (ring-indexed): the cached
    # prefix, and with STEP_IN_CACHE this step's keys too (already written).
    end = nc
    if STEP_IN_CACHE and not OWN_FLOAT:
        end = q_hi
    full_end = lo  # [lo, full_end): whole tiles every query row sees, unmasked (none with a window)
    if not HAS_WINDOW:
        full_end = (tl.minimum(q_lo, end) // BLOCK_N) * BLOCK_N
        if PAGES_AHEAD:  # the first tile's entries; each iteration loads the next tile's
            nxt = tl.load(BT + b * stride_bt + tl.minimum(lo + tl.arange(0, BLOCK_N), full_end - 1) // BS,
                          mask=lo < full_end, other=0)
        for start in range(lo, full_end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            nmask = k_pos < full_end  # (all true: the loads' mask)
            if PAGES_AHEAD:
                blk = nxt.to(tl.int64)
                nxt = tl.load(BT + b * stride_bt + tl.minimum(k_pos + BLOCK_N, full_end - 1) // BS)
            else:
                blk = tl.load(BT + b * stride_bt + k_pos // BS).to(tl.int64)
            row = page_row(k_pos % BS, kvh, KVH, BS, HEAD_MAJOR)
            m_i, l_i, acc_a, acc_b = _step(C32, C8, C16, blk * page_bytes, row, nmask, k_pos, qa, qb, q_pos, m_i,
                                           l_i, acc_a, acc_b, sm_scale, softcap, window, k_vals, k_scales, v_vals,
                                           v_scales, K_BITS, K_GRP, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT, HALVES,
                                           ASM, HAS_WINDOW, HAS_SOFTCAP, PREC, MASKED=False)
    for start in range(full_end, end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        nmask = k_pos < end
        pg = k_pos // BS
        if HAS_RING:
            pg = pg % ring
        blk = tl.load(BT + b * stride_bt + pg, mask=nmask, other=0).to(tl.int64)
        row = page_row(k_pos % BS, kvh, KVH, BS, HEAD_MAJOR)  # the token's row of this head in its page's planes
        m_i, l_i, acc_a, acc_b = _step(C32, C8, C16, blk * page_bytes, row, nmask, k_pos, qa, qb, q_pos, m_i, l_i,
                                       acc_a, acc_b, sm_scale, softcap, window, k_vals, k_scales, v_vals, v_scales,
                                       K_BITS, K_GRP, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT, HALVES, ASM, HAS_WINDOW,
                                       HAS_SOFTCAP, PREC)
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
            row = page_row(r % BS, kvh, KVH, BS, HEAD_MAJOR)
            m_i, l_i, acc_a, acc_b = _step(S32, S8, S16, (r // BS).to(tl.int64) * page_bytes, row, nmask, k_pos, qa,
                                           qb, q_pos, m_i, l_i, acc_a, acc_b, sm_scale, softcap, window, k_vals,
                                           k_scales, v_vals, v_scales, K_BITS, K_GRP, V_BITS, V_GRP, D, BLOCK_N, ALIGN,
                                           DT, HALVES, ASM, HAS_WINDOW, HAS_SOFTCAP, PREC)

    # Phase 2 (OWN_FLOAT): this step's keys [nc, q_hi) as stored, rows of KF/VF (row r: token r),
    # each row in its halves' column order (_read_back): every half loads as contiguous columns
    # (int4's even and odd columns as strided 2-byte loads were 2-3.5x slower, session 14).
    if OWN_FLOAT:
        fa_c = d
        fb_c = d
        if HALVES:
            fa_c = tl.arange(0, D // 2)
            fb_c = fa_c + D // 2
        full2 = nc
        if not HAS_WINDOW:  # whole tiles below the first query row: unmasked
            full2 = nc + ((q_lo - nc) // BLOCK_N) * BLOCK_N
            for start in range(nc, full2, BLOCK_N):
                k_pos = start + tl.arange(0, BLOCK_N)
                nmask = k_pos < full2
                frow = (row0 + (k_pos - nc)).to(tl.int64) * (KVH * D) + kvh * D
                m_i, l_i, acc_a, acc_b = _step(C32, C8, C16, 0, 0, nmask, k_pos, qa, qb, q_pos, m_i, l_i, acc_a,
                                               acc_b, sm_scale, softcap, window, k_vals, k_scales, v_vals, v_scales,
                                               K_BITS, K_GRP, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT, HALVES, ASM,
                                               HAS_WINDOW, HAS_SOFTCAP, PREC, False, KF, VF, frow, fa_c, fb_c, True)
        else:
            full2 = tl.maximum(nc, q_lo - window + 1)
            full2 = nc + ((full2 - nc) // BLOCK_N) * BLOCK_N
        for start in range(full2, q_hi, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            nmask = k_pos < q_hi
            frow = tl.where(nmask, row0 + (k_pos - nc), 0).to(tl.int64) * (KVH * D) + kvh * D
            m_i, l_i, acc_a, acc_b = _step(C32, C8, C16, 0, 0, nmask, k_pos, qa, qb, q_pos, m_i, l_i, acc_a, acc_b,
                                           sm_scale, softcap, window, k_vals, k_scales, v_vals, v_scales, K_BITS,
                                           K_GRP, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT, HALVES, ASM, HAS_WINDOW,
                                           HAS_SOFTCAP, PREC, True, KF, VF, frow, fa_c, fb_c, True)

    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # (padding rows: 0, not 0/0; not stored)
    op = OUT + (row0 + t)[:, None] * stride_ot + heads[:, None] * stride_oh
    ODT = OUT.dtype.element_ty
    if ROT_O:  # V stored rotated: the output (rounded as the kernel's would be) rotated back here
        oa = (acc_a * inv[:, None]).to(ODT)
        if HALVES:
            o = _unrot(oa, (acc_b * inv[:, None]).to(ODT), HPM, va_c, vb_c, D, RSQ, PREC)
        else:
            o = tl.dot(oa, tl.load(HPM + d[:, None] * D + d[None, :]), input_precision=PREC) * RSQ
        tl.store(op + d[None, :], o.to(ODT), mask=mmask[:, None])
    else:
        tl.store(op + va_c[None, :], (acc_a * inv[:, None]).to(ODT), mask=mmask[:, None])
        if HALVES:
            tl.store(op + vb_c[None, :], (acc_b * inv[:, None]).to(ODT), mask=mmask[:, None])


# Issue 16, session 9: K/V tiles as halves widened in PTX (packed_widen._halves, the decode
# kernel's widening: bytes, one fma a value pair) instead of natural-order tiles widened by
# Triton's int->float conversions (sm_90 build, 128 x 64 tiles, 8 warps: 197 registers and
# 3,328 SASS lines against 240 and 4,688 with 128 I2F). ROT_IN_KERNEL: the query's and the
# output's rotations inside the kernel (dots with a +-1 matrix): it spills at that tiling (255
# registers + stack), so off; ROT_KERNEL: they run as ``_rot_rows_kernel`` (one read and one
# write of bf16 rows) instead of packed._rotate's fp32 GEMM and casts.
HALVES = True
ROT_IN_KERNEL = False
ROT_KERNEL = True
# By the narrower plane's bits: full-attention layers read this step's own keys from rows of q's
# dtype instead of widening them from the pages in every program that sees them (issue 16,
# session 13). The rows are the pages' values (``_read_back``: the just-written slots dequantized
# once, as kv_pages.stored), so the outputs are the pages path's up to summation order; the pages
# are then read for the cached prefix only. H200, session 14, default tiling: int8 1,003.6 ->
# 646.8 us at 8 x 1,000 new tokens (the 1000/1000 run's prompt step), 4,797 -> 3,937 at 8 x 2,048
# over 2,048 cached; int4 1,459 -> 2,710 and 4,895 -> 9,770: its even/odd half columns loaded 2
# bytes at a time. The read-back now stores rows in the halves' order (16-byte loads, as int8's);
# timed again (session 15, same call): int4 1,201 -> 1,319 us at 8 x 1,000 new, 4,902 -> 4,573 over
# 2,048 cached, and the 1000/1000 run 12,450 -> 12,424 out tok/s: int4 stays off.
OWN_FLOAT = {4: False, 8: True}
READ_BACK_ROWS = 32  # tokens a read-back program takes
# The cached prefix's whole tiles take their block-table entries a tile ahead (issue 16, session
# 14): loaded in the same iteration, they leave the pipeliner one buffer of page data at any
# num_stages (TTGIR 1x64x64xi8 at 3 stages); a tile ahead, two (sm_90 builds, int4 and int8). By
# the narrower plane's bits. H200, session 15, same call, 8 x 2,048 new over 2,048 cached: int8
# (own rows) 4,022 -> 3,738 us, 8 x 1,000 with nothing cached 633 -> 639 (no prefix: neutral);
# int4 4,902 -> 5,209 and 1,201 -> 1,510: off.
PAGES_AHEAD = {4: False, 8: True}
# A mixed step's grid of (query tiles x sequences x KV heads) is mostly programs that return at
# once (376 one-token rows x 32 tiles x 8 heads = 96k of them in the 1000/1000 run's mixed steps,
# at one resident program per SM); COMPACT launches one program per real query tile, each finding
# its sequence in a running count of tiles (made once per step, in the batch's scratch).
COMPACT = True
# (query tokens x heads rows per program, keys per tile, warps, stages) for bf16/fp16 queries,
# head_dim <= 128; wider heads and fp32 keep (64 rows, 32 keys, 4 warps, 2 stages).
TILING = (128, 64, 8, 3)
# rotate_rows' launch, head_dim <= 128: (rows a program, warps); wider heads take 32 rows.
ROT_TILING = (64, 4)

_HPM: dict = {}


@triton.jit
def _rot_rows_kernel(X, HPM, Y, N, RSQ: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    """Rows of X [N, D] times kv_int.hadamard's matrix (RSQ * HPM, HPM +-1 in X's dtype: the
    products exact, the sum in fp32, one scaling, one rounding to X's dtype)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    m = r < N
    x = tl.load(X + r[:, None] * D + d[None, :], mask=m[:, None], other=0.0)
    y = tl.dot(x, tl.load(HPM + d[:, None] * D + d[None, :]), input_precision="ieee" if IEEE else "tf32") * RSQ
    tl.store(Y + r[:, None] * D + d[None, :], y.to(Y.dtype.element_ty), mask=m[:, None])


@triton.jit
def _read_back_kernel(C8, C16, C32, SLOT, KF, VF, N, page_bytes, k_vals, k_scales, v_vals, v_scales,
                      KVH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr,
                      K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                      ALIGN: tl.constexpr, HALF_ORDER: tl.constexpr = False, HEAD_MAJOR: tl.constexpr = False):
    """Rows r of KF/VF [N, KVH, D] (KV head: program_id 1) <- the K and V values that slot
    SLOT[r] of the pages holds, dequantized to KF's dtype (slot -1: zeros). HALF_ORDER: each
    plane's row in its halves' column order (``_half_cols``: int4 the even columns then the odd,
    int8 unchanged), so the prefill kernel loads each half as contiguous columns."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    kvh = tl.program_id(1)
    slot = tl.load(SLOT + r, mask=r < N, other=-1)
    ok = slot >= 0
    slot = tl.where(ok, slot, 0)
    base = (slot // BS).to(tl.int64) * page_bytes
    row = page_row(slot % BS, kvh, KVH, BS, HEAD_MAJOR)
    DT = KF.dtype.element_ty
    off = r.to(tl.int64) * (KVH * D) + kvh * D
    kt = _tile(C32, C8, C16, base, k_vals, k_scales, row, ok, K_BITS, K_GRP, D, BLOCK, ALIGN, DT)
    _store_row(KF, off, kt, r < N, D, BLOCK, HALF_ORDER and K_BITS == 4)
    vt = _tile(C32, C8, C16, base, v_vals, v_scales, row, ok, V_BITS, V_GRP, D, BLOCK, ALIGN, DT)
    _store_row(VF, off, vt, r < N, D, BLOCK, HALF_ORDER and V_BITS == 4)


@triton.jit
def _store_row(X, off, x, rmask, D: tl.constexpr, BLOCK: tl.constexpr, EVEN_ODD: tl.constexpr):
    """x [BLOCK, D] into rows ``off`` of X; EVEN_ODD: its even columns, then its odd ones (each
    half stored as contiguous columns)."""
    if EVEN_ODD:
        ev, od = tl.split(tl.reshape(x, (BLOCK, D // 2, 2)))
        h = tl.arange(0, D // 2)
        tl.store(X + off[:, None] + h[None, :], ev, mask=rmask[:, None])
        tl.store(X + off[:, None] + (D // 2 + h)[None, :], od, mask=rmask[:, None])
    else:
        tl.store(X + off[:, None] + tl.arange(0, D)[None, :], x, mask=rmask[:, None])


def _read_back(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, dtype: torch.dtype, align: int,
               half_order: bool = False, scratch: dict | None = None):
    """This step's K and V as its slots of ``kv_cache`` hold them: two [T, KVH, D] tensors of
    ``dtype`` (rotated planes stay rotated; ``half_order``: each row's columns in its plane's
    halves' order, see ``_read_back_kernel``). Allocated here once a step: with ``scratch`` (the
    batch's, freed with the step) every layer reuses them, each layer's kernels having read
    them, in stream order, before the next layer's read-back writes them."""
    lay, kp, vp = _layout_args(kv_cache)
    T, kvh, D = slot_mapping.shape[0], kp.rows, kp.width
    key = ("packed_prefill_read_back", T, kvh, D, dtype)
    kf, vf = (None, None) if scratch is None else scratch.get(key, (None, None))
    if kf is None:
        kf = torch.empty((T, kvh, D), dtype=dtype, device=kv_cache.device)
        vf = torch.empty_like(kf)
        if scratch is not None:
            scratch[key] = (kf, vf)
    _read_back_kernel[(triton.cdiv(T, READ_BACK_ROWS), kvh)](
        kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int32), slot_mapping, kf, vf, T,
        lay.page_bytes, kp.values_at, kp.scales_at, vp.values_at, vp.scales_at, KVH=kvh, D=D, BS=lay.block_size,
        BLOCK=READ_BACK_ROWS, K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D), V_BITS=vp.fmt.bits,
        V_GRP=vp.fmt.group_for(D), ALIGN=align, HALF_ORDER=half_order, HEAD_MAJOR=lay.head_major, num_warps=4)
    return kf, vf


def rotate_rows(x: torch.Tensor) -> torch.Tensor:
    """``packed._rotate(x)`` (a query or an output: no stored byte depends on it) up to fp32
    summation order, as one Triton kernel; packed._rotate itself when ROT_KERNEL is off."""
    if not ROT_KERNEL:
        return _rotate(x)
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(0) != D or x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N = x2.shape[0]
    block, warps = ROT_TILING if D <= 128 else (32, 4)
    _rot_rows_kernel[(triton.cdiv(N, block),)](x2, _hpm(D, x.dtype, x.device), y, N, RSQ=float(D ** -0.5), D=D,
                                                BLOCK=block, IEEE=x.dtype == torch.float32, num_warps=warps)
    return y


def _hpm(D: int, dtype: torch.dtype, device) -> torch.Tensor:
    """kv_int.hadamard's matrix times sqrt(D): entries +-1, exact in any float dtype."""
    key = (D, dtype, device)
    if key not in _HPM:
        _HPM[key] = (hadamard(torch.eye(D, device=device)) * D ** 0.5).round().to(dtype).contiguous()
    return _HPM[key]


def packed_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   block_table: torch.Tensor, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                   num_computed: torch.Tensor, max_query_len: int, scale: float, window: int | None = None,
                   ring: int | None = None, softcap: float | None = None, mixed: bool = False,
                   max_seq_len: int | None = None,
                   block_t: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, halves: bool | None = None,
                   rot_in_kernel: bool | None = None, compact: bool | None = None,
                   scratch: dict | None = None, own_float: bool | None = None,
                   pages_ahead: bool | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] packed by ``query_start_loc``: sequence b's queries sit at
    positions ``num_computed[b]`` onwards and see the cached prefix and this step's keys up to
    their own (within ``window``). Writes k/v (quantized) at ``slot_mapping`` (-1: skipped) and
    returns [T, H, D] in q's dtype: ``reference.packed_attention``'s values. ``mixed`` (a step
    that may hold one-token sequences beside longer ones): those rows go to the split-K
    ``packed_decode`` after the write (one program per KV head would walk a long context
    alone), sized by ``max_seq_len`` (the most keys a sequence sees; None: any). ``block_t``
    (query tokens per program), ``block_n`` (keys per tile), ``num_warps``, ``num_stages``: the
    launch (defaults: ``TILING``); ``halves`` / ``rot_in_kernel``: the kernel's variants
    (defaults ``HALVES`` / ``ROT_IN_KERNEL``), ``compact`` the grid (default ``COMPACT``), all
    giving the reference's values; ``scratch``: a dict that lives for the step (the batch's), where
    the compact grid's tile count is kept for the step's other layers; ``own_float`` (default
    ``OWN_FLOAT`` by the narrower plane's bits; full-attention layers): this step's keys read
    back once into rows of q's dtype and scored from there; ``pages_ahead`` (default
    ``PAGES_AHEAD`` by the narrower plane's bits): the cached prefix's block-table entries loaded a tile ahead."""
    lay, kp, vp = _layout_args(kv_cache)
    T, H, D = q.shape
    kvh = kp.rows
    if D & (D - 1) or D < 32:
        raise NotImplementedError(f"the packed prefill kernel needs a power-of-two head_dim >= 32, got {D}")
    G = H // kvh
    B = query_start_loc.shape[0] - 1
    bs, page_bytes = lay.block_size, lay.page_bytes
    halves = HALVES if halves is None else halves
    rot_in = ROT_IN_KERNEL if rot_in_kernel is None else rot_in_kernel
    half = q.dtype in (torch.bfloat16, torch.float16)
    asm = 2 if half and halves and not packed.INTERPRET else 0
    step_in_cache = ring is None
    if step_in_cache:  # every position has its own slot: store first, read every key from pages
        write_packed(kv_cache, k, v, slot_mapping)
        pages = kv_cache
    else:  # read before writing (see the module doc): the step's K/V as stored, in scratch pages
        pages = torch.empty((triton.cdiv(T, bs), page_bytes), dtype=torch.uint8, device=q.device)
        pages.kv_layout = lay
        write_packed(pages, k, v, torch.arange(T, device=q.device))
    rot_q, rot_o = kp.rotated and rot_in, vp.rotated and rot_in
    q_in = q
    if kp.rotated and not rot_q:  # scores of the rotated query against the rotated keys (kv_pages)
        q = rotate_rows(q)
    hpm = _hpm(D, q.dtype, q.device) if rot_q or rot_o else q
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    G_PAD = triton.next_power_of_2(G)
    big = D > 128 or q.dtype == torch.float32
    rows, bn, nw, ns = (64, 32, 4, 2) if big else TILING
    block_t = block_t or max(1, rows // G_PAD)
    block_t = max(block_t, triton.cdiv(16, G_PAD))  # tl.dot needs M >= 16
    block_n = block_n or bn
    nbits = min(kp.fmt.bits, vp.fmt.bits)  # the narrower plane's: the by-bits defaults' key
    words = D * nbits // 32
    align = math.gcd(page_bytes // 4, kp.values_at // 4, vp.values_at // 4, words, 4)
    compact = COMPACT if compact is None else compact
    own = bool(OWN_FLOAT[nbits] if own_float is None else own_float) and step_in_cache
    kf, vf = _read_back(kv_cache, slot_mapping, q.dtype, align, halves, scratch) if own else (q, q)
    if compact:
        key = ("packed_prefill_tiles", block_t, mixed)
        cum = None if scratch is None else scratch.get(key)
        if cum is None:
            qlens = query_start_loc[1:] - query_start_loc[:-1]
            tiles = (qlens + block_t - 1) // block_t
            if mixed:
                tiles = torch.where(qlens == 1, 0, tiles)
            cum = torch.cumsum(tiles, 0).to(torch.int32)
            if scratch is not None:
                scratch[key] = cum
        # (sum over sequences of cdiv(len, block_t) <= cdiv(T, block_t) + B)
        grid = (min(B * triton.cdiv(max_query_len, block_t), triton.cdiv(T, block_t) + B), 1, kvh)
    else:
        cum = query_start_loc
        grid = (triton.cdiv(max_query_len, block_t), B, kvh)
    _packed_prefill_kernel[grid](
        q, kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int32),
        pages, pages.view(torch.float16), pages.view(torch.int32),
        block_table, query_start_loc, num_computed, out, hpm, cum, kf, vf, B,
        q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1), page_bytes,
        kp.values_at, kp.scales_at, vp.values_at, vp.scales_at, scale, softcap or 0.0, window or 0, ring or 1,
        KVH=kvh, G=G, G_PAD=G_PAD, D=D, BS=bs, BLOCK_T=block_t, BLOCK_N=block_n,
        K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D), V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D),
        ALIGN=align, HAS_WINDOW=window is not None, HAS_RING=ring is not None, HAS_SOFTCAP=softcap is not None,
        STEP_IN_CACHE=step_in_cache, SKIP_DECODE=mixed, IEEE=q.dtype == torch.float32,
        HALVES=halves, ASM=asm, ROT_Q=rot_q, ROT_O=rot_o, RSQ=float(D ** -0.5), COMPACT=compact, OWN_FLOAT=own,
        PAGES_AHEAD=bool(PAGES_AHEAD[nbits] if pages_ahead is None else pages_ahead),
        HEAD_MAJOR=lay.head_major, num_warps=num_warps or nw, num_stages=num_stages or ns)
    if not step_in_cache:
        write_packed(kv_cache, k, v, slot_mapping)
    if not mixed:
        return rotate_rows(out) if vp.rotated and not rot_o else out
    # The one-token rows: the split-K decode kernel, in the space q and out are in here.
    order = launch_order.longest_first(num_computed, kp.rows, scratch)
    if not (rot_q or rot_o):
        packed_decode(q, kv_cache, block_table, num_computed, scale, window, ring, softcap, max_seq_len=max_seq_len,
                      query_start_loc=query_start_loc, out=out, rotate=False, order=order)
        return rotate_rows(out) if vp.rotated else out
    if rot_q != kp.rotated or rot_o != vp.rotated:  # (one plane rotated in the kernel, the other not)
        raise NotImplementedError("packed_prefill rotates both planes in the kernel or neither")
    dec = packed_decode(q_in, kv_cache, block_table, num_computed, scale, window, ring, softcap,
                        max_seq_len=max_seq_len, query_start_loc=query_start_loc, out=out, rotate=True,
                        order=order)
    if dec is out:  # (the fast decode kernel rotates in registers and wrote its rows into out)
        return out
    # (other decode kernels rotate the output by a GEMM into a new tensor: take its one-token rows)
    qlens = query_start_loc[1:] - query_start_loc[:-1]
    one = torch.repeat_interleave(qlens == 1, qlens, output_size=T)
    return torch.where(one[:, None, None], dec, out)
