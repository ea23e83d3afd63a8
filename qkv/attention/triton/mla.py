"""MLA decode as MQA over the latent cache (absorbed weights, DeepSeek-V2/V3).

With ``W_UK`` folded into the query and ``W_UV`` into the output, every head attends over the
same per-token row ``[c_KV (R) | k_rope (P)]``: keys are the whole row, values its first R
columns. One program takes ``BLOCK_H`` heads of one sequence and one split of its keys, so each
cached row is read once for all those heads (for 16 heads: once per sequence). Splits merge
in the combine kernel of ``decode.py``; a launch of one split per sequence writes the output
itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton.decode import MERGE_MAX_SPLITS, _combine_kernel, split_counters
from qkv.attention.triton.kv_write import write_rows
from qkv.kvcache.kv_pages import layout_of
from qkv.kvcache.kv_quant import compute_dtype


@triton.jit
def _mla_q(QL, QR, b, h, hmask, stride_qlt, stride_qlh, stride_qrt, stride_qrh,
           R: tl.constexpr, P: tl.constexpr, QA: tl.constexpr):
    """The program's queries (latent and rope parts): [heads, R] when q is a dot's A operand
    (QA), else transposed, [R, heads], as the B operand of lat @ q."""
    r = tl.arange(0, R)
    p_ = tl.arange(0, P)
    if QA:
        qlt = tl.load(QL + b * stride_qlt + h[:, None] * stride_qlh + r[None, :], mask=hmask[:, None], other=0.0)
        qrt = tl.load(QR + b * stride_qrt + h[:, None] * stride_qrh + p_[None, :], mask=hmask[:, None], other=0.0)
    else:
        qlt = tl.load(QL + b * stride_qlt + h[None, :] * stride_qlh + r[:, None], mask=hmask[None, :], other=0.0)
        qrt = tl.load(QR + b * stride_qrt + h[None, :] * stride_qrh + p_[:, None], mask=hmask[None, :], other=0.0)
    return qlt, qrt


@triton.jit
def _mla_store(OUT, ACC, ML, CNT, acc, m_i, l_i, b, h, hmask, split, S, H, stride_ot, stride_oh, R: tl.constexpr,
               MERGE: tl.constexpr = 0):
    """A program's result: the output itself when it ran the whole sequence (one split), else its
    fp32 partial state (acc, max, sum); with ``MERGE`` (a power of two >= S) the last split of
    the sequence to finish merges them all (no combine launch), else ``_combine_kernel`` does."""
    r = tl.arange(0, R)
    out = OUT + b * stride_ot + h[:, None] * stride_oh + r[None, :]
    if S == 1:
        tl.store(out, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=hmask[:, None])
    else:
        base = (b * H + h) * S
        tl.store(ACC + (base + split)[:, None] * R + r[None, :], acc, mask=hmask[:, None])
        tl.store(ML + (base + split) * 2, m_i, mask=hmask)
        tl.store(ML + (base + split) * 2 + 1, l_i, mask=hmask)
        if MERGE > 0:
            # As decode.py's in-kernel merge: the barrier orders every thread's stores before the
            # counter's release; the last program reads the partials through L2 (.cg), all
            # MERGE slots' loads issued at once (slots past S masked off), and zeroes the counter
            # for the next launch or graph replay.
            tl.debug_barrier()
            cnt = CNT + b * tl.num_programs(1) + tl.program_id(1)
            done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if done == S - 1:
                m_max = tl.full(m_i.shape, float("-inf"), tl.float32)
                for j in tl.static_range(MERGE):
                    ok = hmask & (j < S)
                    m_max = tl.maximum(m_max, tl.load(ML + (base + j) * 2, mask=ok, other=float("-inf"),
                                                      cache_modifier=".cg"))
                num = tl.zeros(acc.shape, tl.float32)
                den = tl.zeros(m_i.shape, tl.float32)
                for j in tl.static_range(MERGE):
                    ok = hmask & (j < S)
                    m_j = tl.load(ML + (base + j) * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    w = tl.where(m_j > float("-inf"), tl.exp2(m_j - m_max), 0.0)
                    den += w * tl.load(ML + (base + j) * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
                    num += w[:, None] * tl.load(ACC + (base + j)[:, None] * R + r[None, :], mask=ok[:, None],
                                                other=0.0, cache_modifier=".cg")
                tl.store(out, (num / den[:, None]).to(OUT.dtype.element_ty), mask=hmask[:, None])
                tl.store(cnt, 0)


@triton.jit
def _mla_rows(bt, start, hi, blk_next, i, jp, stride_cb, stride_ct, BS: tl.constexpr, BLOCK_N: tl.constexpr,
              PAGED: tl.constexpr):
    """The row offsets of the tile at ``start`` (from ``blk_next``, its table entries read one
    tile ahead) and the next tile's table entries."""
    if PAGED:  # the tile's BLOCK_N // BS pages: one table entry each, not one per row
        pages = blk_next.to(tl.int64)
        nxt = (start + BLOCK_N) // BS + jp
        blk_next = tl.load(bt + nxt, mask=nxt * BS < hi, other=0)
        blk = tl.sum(tl.where((i // BS)[:, None] == jp[None, :], pages[None, :], 0), 1)
        off = blk * stride_cb + (i % BS) * stride_ct
    else:
        pos = start + i
        blk = blk_next.to(tl.int64)
        blk_next = tl.load(bt + (pos + BLOCK_N) // BS, mask=pos + BLOCK_N < hi, other=0)
        off = blk * stride_cb + (pos % BS) * stride_ct
    return off, blk_next


@triton.jit
def _mla_tile(C, off, nmask, qlt, qrt, m_i, l_i, acc, qk_scale, R: tl.constexpr, P: tl.constexpr,
              BLOCK_N: tl.constexpr, QA: tl.constexpr, KS: tl.constexpr, MASKED: tl.constexpr):
    """One tile's online-softmax step. ``MASKED``: rows past the keys (``nmask`` false) are not
    loaded and score -inf; else every row is a key and no mask is computed."""
    r = tl.arange(0, R)
    p_ = tl.arange(0, P)
    if MASKED:
        lat = tl.load(C + off[:, None] + r[None, :], mask=nmask[:, None], other=0.0).to(qlt.dtype)
        rope = tl.load(C + off[:, None] + R + p_[None, :], mask=nmask[:, None], other=0.0).to(qlt.dtype)
    else:
        lat = tl.load(C + off[:, None] + r[None, :]).to(qlt.dtype)
        rope = tl.load(C + off[:, None] + R + p_[None, :]).to(qlt.dtype)
    if KS > 1:  # split-K score dot: [KS, heads, rows] partial scores, summed across the slices
        lat3 = tl.permute(tl.reshape(lat, [BLOCK_N, KS, R // KS]), [1, 2, 0])
        s = tl.sum(tl.dot(qlt, lat3), 0) + tl.dot(qrt, tl.trans(rope))
    elif QA:
        s = tl.dot(qlt, tl.trans(lat)) + tl.dot(qrt, tl.trans(rope))
    else:
        s = tl.trans(tl.dot(lat, qlt) + tl.dot(rope, qrt))  # [BLOCK_H, BLOCK_N]
    if MASKED:
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    if QA:
        l_i = l_i * alpha[:, None]
    else:
        l_i = l_i * alpha
    m_i = m_new
    p = tl.exp2(s - m_i[:, None])
    if QA:
        l_i = l_i + p
    else:
        l_i = l_i + tl.sum(p, 1)
    acc = tl.dot(p.to(lat.dtype), lat, acc)
    return m_i, l_i, acc


@triton.jit
def _mla_attend(QL, QR, C, BT, b, h, hmask, lo, hi, stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_cb,
                stride_ct, stride_bt, sm_scale, R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, QA: tl.constexpr, KS: tl.constexpr,
                PAGED: tl.constexpr, PEEL: tl.constexpr):
    """Sequence b's heads h over its keys [lo, hi) (lo a multiple of BLOCK_N): the unnormalized
    output, the row max (log2 units) and the row sum."""
    # Shaped for Triton's software pipeliner (checked in the TTGIR: async copies into a ring of
    # num_stages - 1 tiles): each tile of rows is loaded once, into shared memory, and both dots
    # read it there (scores as lat @ q^T, so the tile is the A operand of one dot and the B of
    # the other, never a register transpose, which kept the old kernel's loads synchronous).
    # The block table is read one tile ahead by hand: a gather whose addresses come from a load
    # of the same iteration spends a pipeline stage on that load. ``PEEL``: the whole tiles run
    # unmasked, the last partial one (if any) in a second loop with masks.
    p_ = tl.arange(0, P)
    if KS > 1:  # q split along R into KS slices [KS, heads, R / KS], one per warp, kept in registers
        kk = tl.arange(0, KS)
        rr = tl.arange(0, R // KS)
        qlt = tl.load(QL + b * stride_qlt + h[None, :, None] * stride_qlh + kk[:, None, None] * (R // KS)
                      + rr[None, None, :], mask=hmask[None, :, None], other=0.0)
        qrt = tl.load(QR + b * stride_qrt + h[:, None] * stride_qrh + p_[None, :], mask=hmask[:, None], other=0.0)
    else:  # QA: q the A operand ([heads, R]): the score dot's warps split the rows, none reads them twice
        qlt, qrt = _mla_q(QL, QR, b, h, hmask, stride_qlt, stride_qlh, stride_qrt, stride_qrh, R, P, QA)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    if QA:  # the row sums kept per column, summed once at the end: a cross-warp reduction a tile fewer
        l_i = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    else:
        l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 below
    bt = BT + b * stride_bt
    i = tl.arange(0, BLOCK_N)
    jp = tl.arange(0, BLOCK_N // BS if PAGED else 1)
    if PAGED:  # tiles of whole pages: lo and BLOCK_N multiples of BS
        blk_next = tl.load(bt + lo // BS + jp, mask=(lo // BS + jp) * BS < hi, other=0)
    else:
        blk_next = tl.load(bt + (lo + i) // BS, mask=lo + i < hi, other=0)
    if PEEL:
        full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
        for start in range(lo, full, BLOCK_N):
            off, blk_next = _mla_rows(bt, start, hi, blk_next, i, jp, stride_cb, stride_ct, BS, BLOCK_N, PAGED)
            m_i, l_i, acc = _mla_tile(C, off, i < BLOCK_N, qlt, qrt, m_i, l_i, acc, qk_scale, R, P, BLOCK_N, QA, KS,
                                      False)
    else:
        full = lo
    for start in range(full, hi, BLOCK_N):
        off, blk_next = _mla_rows(bt, start, hi, blk_next, i, jp, stride_cb, stride_ct, BS, BLOCK_N, PAGED)
        m_i, l_i, acc = _mla_tile(C, off, start + i < hi, qlt, qrt, m_i, l_i, acc, qk_scale, R, P, BLOCK_N, QA, KS,
                                  True)
    if QA:
        l_i = tl.sum(l_i, 1)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _mla_decode_kernel(QL, QR, C, BT, NC, ACC, ML, CNT, OUT,
                       stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_cb, stride_ct, stride_bt,
                       stride_ot, stride_oh, H, sm_scale,
                       R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, QA: tl.constexpr = False, KS: tl.constexpr = 1,
                       MERGE: tl.constexpr = 0, PAGED: tl.constexpr = False, PEEL: tl.constexpr = False):
    # One program: one sequence's head block over one of S equal key ranges (splits).
    b = tl.program_id(0)
    hblk = tl.program_id(1)
    split = tl.program_id(2)
    S = tl.num_programs(2)  # splits per sequence
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    per_split = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    acc, m_i, l_i = _mla_attend(QL, QR, C, BT, b, h, hmask, lo, hi, stride_qlt, stride_qlh, stride_qrt, stride_qrh,
                                stride_cb, stride_ct, stride_bt, sm_scale, R, P, BS, BLOCK_H, BLOCK_N, QA, KS,
                                PAGED, PEEL)
    _mla_store(OUT, ACC, ML, CNT, acc, m_i, l_i, b, h, hmask, split, S, H, stride_ot, stride_oh, R, MERGE)



@triton.jit
def _mla_tma_scores(DL, DR, row, qlt, qrt, QA: tl.constexpr):
    """One page's rows (TMA copies of its latent and rope parts) and their scores [BLOCK_H, BS]."""
    lat = DL.load([row, 0])
    rope = DR.load([row, 0])
    if QA:  # q the A operand, in registers; the page read through a transposed view
        s = tl.dot(qlt, tl.trans(lat)) + tl.dot(qrt, tl.trans(rope))
    else:
        s = tl.trans(tl.dot(lat, qlt) + tl.dot(rope, qrt))
    return lat, s


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _mla_decode_tma_kernel(QL, QR, C, DL, DR, BT, NC, ACC, ML, OUT,
                           stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_cb, stride_ct, stride_bt,
                           stride_ot, stride_oh, H, sm_scale,
                           R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, BLOCK_H: tl.constexpr,
                           PAGES: tl.constexpr, QA: tl.constexpr):
    # Whole 16-row pages copied by TMA (descriptors DL: [BS, R] and DR: [BS, P] blocks over the
    # cache viewed as [blocks * BS, R + P]): the copy engine generates the addresses and writes
    # shared memory, the warps only wait on its barrier. PAGES pages per iteration (1 or 2),
    # their scores merged into one softmax step. A page past the end of the keys would feed
    # unwritten rows to the PV dot (0 * NaN), so the last partial tile runs masked pointer loads.
    b = tl.program_id(0)
    hblk = tl.program_id(1)
    split = tl.program_id(2)
    S = tl.num_programs(2)
    BLOCK_N: tl.constexpr = BS * PAGES
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    per_split = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.maximum(tl.minimum(lo + per_split, seq_len), lo)  # an empty split: hi = lo
    full = lo + (hi - lo) // BLOCK_N * BLOCK_N  # the end of the whole tiles
    h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    r = tl.arange(0, R)
    p_ = tl.arange(0, P)
    qlt, qrt = _mla_q(QL, QR, b, h, hmask, stride_qlt, stride_qlh, stride_qrt, stride_qrh, R, P, QA)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 below
    bt = BT + b * stride_bt
    nxt0 = tl.load(bt + lo // BS, mask=lo < full, other=0)
    nxt1 = tl.load(bt + lo // BS + 1, mask=lo + BS < full, other=0)
    for start in range(lo, full, BLOCK_N):
        row0 = (nxt0 * BS).to(tl.int32)  # TMA coordinates are 32-bit (a table may be int64)
        row1 = (nxt1 * BS).to(tl.int32)
        ahead = start + BLOCK_N < full
        nxt0 = tl.load(bt + (start + BLOCK_N) // BS, mask=ahead, other=0)
        lat0, s0 = _mla_tma_scores(DL, DR, row0, qlt, qrt, QA)
        s0 = s0 * qk_scale
        if PAGES == 2:
            nxt1 = tl.load(bt + (start + BLOCK_N) // BS + 1, mask=ahead, other=0)
            lat1, s1 = _mla_tma_scores(DL, DR, row1, qlt, qrt, QA)
            s1 = s1 * qk_scale
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
        else:
            m_new = tl.maximum(m_i, tl.max(s0, 1))
        alpha = tl.exp2(m_i - m_new)
        p0 = tl.exp2(s0 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p0, 1)
        acc = acc * alpha[:, None] + tl.dot(p0.to(lat0.dtype), lat0)
        if PAGES == 2:
            p1 = tl.exp2(s1 - m_new[:, None])
            l_i += tl.sum(p1, 1)
            acc = tl.dot(p1.to(lat1.dtype), lat1, acc)
        m_i = m_new
    if full < hi:  # the last partial tile: masked gathers
        pos = full + tl.arange(0, BLOCK_N)
        nmask = pos < hi
        blk = tl.load(bt + pos // BS, mask=nmask, other=0).to(tl.int64)
        off = blk * stride_cb + (pos % BS) * stride_ct
        lat = tl.load(C + off[:, None] + r[None, :], mask=nmask[:, None], other=0.0)
        rope = tl.load(C + off[:, None] + R + p_[None, :], mask=nmask[:, None], other=0.0)
        if QA:
            s = tl.dot(qlt, tl.trans(lat)) + tl.dot(qrt, tl.trans(rope))
        else:
            s = tl.trans(tl.dot(lat, qlt) + tl.dot(rope, qrt))
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat)
        m_i = m_new
    _mla_store(OUT, ACC, ML, ML, acc, m_i, l_i, b, h, hmask, split, S, H, stride_ot, stride_oh, R)


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _mla_decode_kernel_fp8(QL, QR, C, BT, NC, ACC, ML,
                       stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_cb, stride_ct, stride_bt,
                       H, sm_scale,
                       R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, S: tl.constexpr):
    # The kernel before the pipelined one (loads to registers, widened there): over an fp8
    # cache the pipelined shape measured slower (651.6 us at 64 x 8k against 333.8: its tile
    # feeds two dots that want two shared layouts once widened, so it is not pipelined).
    b = tl.program_id(0)
    hblk = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    per_split = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    r = tl.arange(0, R)
    p_ = tl.arange(0, P)
    ql = tl.load(QL + b * stride_qlt + h[:, None] * stride_qlh + r[None, :], mask=hmask[:, None], other=0.0)
    qr = tl.load(QR + b * stride_qrt + h[:, None] * stride_qrh + p_[None, :], mask=hmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        nmask = pos < hi
        blk = tl.load(BT + b * stride_bt + pos // BS, mask=nmask, other=0).to(tl.int64)
        off = blk * stride_cb + (pos % BS) * stride_ct
        lat = tl.load(C + off[:, None] + r[None, :], mask=nmask[:, None], other=0.0).to(ql.dtype)
        rope = tl.load(C + off[:, None] + R + p_[None, :], mask=nmask[:, None], other=0.0).to(ql.dtype)
        s = tl.dot(ql, tl.trans(lat)) + tl.dot(qr, tl.trans(rope))
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat).to(tl.float32)
        m_i = m_new
    row = (b * H + h) * S + split
    tl.store(ACC + row[:, None] * R + r[None, :], acc, mask=hmask[:, None])
    tl.store(ML + row * 2, m_i, mask=hmask)
    tl.store(ML + row * 2 + 1, l_i, mask=hmask)


def mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               num_computed: torch.Tensor, scale: float, splits: int | None = None, block_n: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None, kernel: str | None = None,
               variant: dict | None = None, merge: bool | None = None, paged: bool | None = None,
               peel: bool | None = None) -> torch.Tensor:
    """q_lat [B, H, R], q_rope [B, H, P]; kv_cache [blocks, bs, R + P] already holding this step's
    row; keys ``[0, num_computed[b]]``. Returns the latent output ``P @ c_KV`` [B, H, R]
    (the caller applies ``W_UV``). R and P must be powers of two (512 and 64 for DeepSeek).
    ``splits`` (key ranges per sequence, merged by a second kernel when more than one),
    ``block_n`` (rows per tile), ``num_warps`` and ``num_stages`` (the pipeline's depth: tiles
    in flight + 1) default to the tiles measured fastest on an H200. An fp8 cache runs
    ``_mla_decode_kernel_fp8`` (stages: 2 by default; it leaves partials for the combine),
    int8/int4 latent pages ``mla_packed``'s kernel (its tiles: ``mla_packed.default_tiles``;
    ``variant``: its options, ``mla_packed.VARIANT``).
    ``kernel`` picks the bf16 kernel: ``"cp"`` (rows gathered by ``cp.async``), ``"tma"`` (whole
    pages copied by TMA, ``block_n`` one or two pages); ``"cp-qa"`` and ``"tma-qa"`` are the
    same with q the A operand of the score dot; ``"cp-ks"`` also splits that dot's R among
    the warps (each holds one slice of q; the partial scores are summed across them).
    The ``cp`` kernels' options (None: the defaults): ``merge`` (None: up to
    ``MERGE_MAX_SPLITS`` splits), the last split of each sequence merges the partials in the
    kernel instead of a combine launch; ``paged`` reads the block table once per page of a tile
    instead of once per row (tiles of whole pages only); ``peel`` runs the whole tiles without
    masks and the last partial one apart (measured no faster: off)."""
    from qkv.attention.triton import mla_packed

    B, H, R = q_lat.shape
    P = q_rope.shape[2]
    bs = kv_cache.shape[1]
    BLOCK_H = min(16, triton.next_power_of_2(H)) if H >= 16 else 16
    hblocks = triton.cdiv(H, BLOCK_H)
    lay = layout_of(kv_cache)
    regs = kv_cache.element_size() == 1 and lay is None  # fp8: always partials for _combine_kernel
    if lay is not None:
        S, block_n, num_warps, num_stages = mla_packed.default_tiles(
            B * hblocks, lay.planes[0].fmt.bits, splits, block_n, num_warps, num_stages, R)
        kern = None
    else:
        S, block_n, num_warps, num_stages, kern = default_tiles(B * hblocks, kv_cache.element_size(), splits,
                                                                block_n, num_warps, num_stages, kernel)
    combine = S > 1 or regs
    cp = lay is None and not regs and kern in ("cp", "cp-qa", "cp-ks")
    if merge is None:
        merge = S <= MERGE_MAX_SPLITS
    merge = cp and S > 1 and merge
    combine = combine and not merge
    # paged by default where two programs share an SM (3 stages): at 4 stages (one program per
    # SM) it measured slower on the H200 (docs/benchmarks.md, 2026-12-04)
    paged = cp and (num_stages < 4 if paged is None else paged) and block_n % bs == 0
    if cp and q_lat.is_cuda and block_n < 16:  # the PV dot's K is the tile's rows: tl.dot needs 16
        raise ValueError(f"mla_decode: block_n {block_n} is below 16, the smallest tile tl.dot takes on the GPU")
    peel = cp and bool(peel)
    out = torch.empty((B, H, R), dtype=q_lat.dtype, device=q_lat.device)
    acc = torch.empty((B * H * S, R) if S > 1 or regs else (1, 1), dtype=torch.float32, device=q_lat.device)
    ml = torch.empty((B * H * S, 2) if S > 1 or regs else (1, 1), dtype=torch.float32, device=q_lat.device)
    cnt = split_counters(B * hblocks, q_lat.device) if merge else ml
    cdt = q_lat.dtype if lay is not None else compute_dtype(q_lat.dtype, kv_cache.dtype)
    q_lat, q_rope = q_lat.to(cdt), q_rope.to(cdt)
    if lay is not None:
        mla_packed.launch_decode(q_lat, q_rope, kv_cache, block_table, num_computed, acc, ml, out, scale,
                                 BLOCK_H, S, block_n, num_warps, num_stages, variant)
    elif regs:
        _mla_decode_kernel_fp8[(B, hblocks, S)](
            q_lat, q_rope, kv_cache, block_table, num_computed, acc, ml,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), kv_cache.stride(0),
            kv_cache.stride(1), block_table.stride(0), H, scale,
            R=R, P=P, BS=bs, BLOCK_H=BLOCK_H, BLOCK_N=block_n, S=S, num_warps=num_warps, num_stages=num_stages)
    elif kern not in ("cp", "cp-qa", "cp-ks"):
        if kern not in ("tma", "tma-qa") or block_n % bs or block_n // bs > 2 or not kv_cache.is_contiguous():
            raise ValueError(f"mla_decode: kernel {kern!r} with block_n {block_n} over {bs}-row pages is not supported")
        from triton.tools.tensor_descriptor import TensorDescriptor

        rows2d = kv_cache.view(-1, R + P)  # pages as rows: a page is BS consecutive rows
        dl = TensorDescriptor(rows2d, [rows2d.shape[0], R], [R + P, 1], [bs, R])
        dr = TensorDescriptor(rows2d[:, R:], [rows2d.shape[0], P], [R + P, 1], [bs, P])
        _mla_decode_tma_kernel[(B, hblocks, S)](
            q_lat, q_rope, kv_cache, dl, dr, block_table, num_computed, acc, ml, out,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), kv_cache.stride(0),
            kv_cache.stride(1), block_table.stride(0), out.stride(0), out.stride(1), H, scale,
            R=R, P=P, BS=bs, BLOCK_H=BLOCK_H, PAGES=block_n // bs, QA=kern == "tma-qa",
            num_warps=num_warps, num_stages=num_stages)
    else:
        _mla_decode_kernel[(B, hblocks, S)](
            q_lat, q_rope, kv_cache, block_table, num_computed, acc, ml, cnt, out,
            q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), kv_cache.stride(0),
            kv_cache.stride(1), block_table.stride(0), out.stride(0), out.stride(1), H, scale,
            R=R, P=P, BS=bs, BLOCK_H=BLOCK_H, BLOCK_N=block_n, QA=kern in ("cp-qa", "cp-ks"),
            KS=num_warps if kern == "cp-ks" else 1, MERGE=triton.next_power_of_2(S) if merge else 0,
            PAGED=paged, PEEL=peel, num_warps=num_warps, num_stages=num_stages)
    if combine:
        rows = torch.arange(B + 1, device=q_lat.device)
        _combine_kernel[(B, H)](acc, ml, out, rows, out.stride(0), out.stride(1), H, D=R, D_PAD=R,
                                S=S, S_PAD=triton.next_power_of_2(S), num_warps=4)
    return out


def default_tiles(programs: int, elem: int = 2, splits: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  kernel: str | None = None) -> tuple[int, int, int, int, str]:
    """(splits, BLOCK_N, warps, stages, kernel) for ``programs`` (sequence, head block) pairs over
    a cache of ``elem``-byte values, each as given unless None. From benchmarks/mla_decode_sweep.py
    on an H200 (2026-12-03, docs/benchmarks.md): about one wave of programs, at most two per SM
    (a 32-row tile on 4 warps, 3 stages: 93 KB of shared memory, 255 registers); one split
    once there are as many programs as SMs (at 128 x 640 the merge's fp32 partials cost more
    than 4 idle SMs), and a third tile in flight (4 stages, 130 KB) while the programs fit one
    per SM. bf16 caches run ``cp-qa`` (fp32 caches, for tests, the ``cp`` shape); an fp8 cache
    keeps the former kernel's tiles. (mla_decode adds the per-page table reads at 3 stages and
    the in-kernel merge up to 8 splits: 161.5 us at 64 x 8k, 87.7% of the copy rate.)"""
    if elem == 1:
        S = splits or min(32, max(1, triton.next_power_of_2(triton.cdiv(2 * 132, programs))))
        wide = S >= 16
        return S, block_n or (64 if wide else 32), num_warps or (8 if wide else 4), num_stages or 2, "cp"
    if not splits:
        splits = 1 if programs >= 128 else min(64, triton.next_power_of_2(2 * 132 // programs + 1) // 2)
    block_n = block_n or (32 if elem == 2 else 16)  # fp32 tiles would need 2x the shared memory
    one_per_sm = splits * programs <= 132
    stages = num_stages or (4 if elem == 2 and block_n == 32 and one_per_sm else 3)
    return splits, block_n, num_warps or 4, stages, kernel or ("cp-qa" if elem == 2 else "cp")


def mla_paged_attention(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed):
    """The backend's MLA entry (reference signature). In the absorbed mode (the default), decode
    steps run the kernel above (``mla_packed``'s over int8/int4 latent pages) and steps with
    prompt tokens ``mla_step.mla_extend`` (decodes absorbed, chunks up-projected); the naive
    mode, decode steps over latents that are not powers of two, and packed latents the
    kernels do not read (``mla_packed.kernels_read``) run the reference."""
    from qkv.attention.triton.mla_packed import kernels_read

    R, P = c_kv.shape[1], k_pe.shape[1]
    pow2 = R & (R - 1) == 0 and P & (P - 1) == 0
    packed = layout_of(kv_cache) is not None  # int8/int4 latent rows (kvcache/kv_pages.py)
    if packed and not (absorbed and kernels_read(kv_cache, R, P)):
        from qkv.attention.mla_reference import mla_paged_attention as reference

        return reference(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed)
    if absorbed and not batch.is_decode:
        from qkv.attention.triton.mla_step import mla_extend

        return mla_extend(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv)
    if not (absorbed and pow2):
        from qkv.attention.mla_reference import mla_paged_attention as reference

        return reference(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed)
    # Store this step's rows first: the kernel reads keys [0, num_computed] from the pages.
    # (Padding rows of a CUDA graph have slot -1: the kernel skips them.)
    store_rows(kv_cache, torch.cat([c_kv, k_pe], dim=-1), R, batch.slot_mappings[group])
    q_lat = torch.einsum("thd,hdr->thr", q_nope, w_uk.to(q_nope.dtype))  # W_UK folded into the query
    o_lat = mla_decode(q_lat, q_pe, kv_cache, batch.block_tables[group], batch.num_computed, scale)
    return torch.einsum("thr,hvr->thv", o_lat, w_uv.to(o_lat.dtype))  # W_UV folded into the output


def store_rows(kv_cache: torch.Tensor, rows: torch.Tensor, R: int, slot_mapping: torch.Tensor) -> None:
    """This step's latent rows [T, R + P] into the pages at ``slot_mapping`` (-1: skipped): as
    they are (rounded to fp8 by an fp8 cache), or quantized into int8/int4 latent pages."""
    if layout_of(kv_cache) is not None:
        from qkv.attention.triton.mla_packed import write_latent

        write_latent(kv_cache, rows, R, slot_mapping)
    else:
        write_rows(kv_cache, rows, slot_mapping)
