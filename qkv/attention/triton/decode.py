"""Paged decode attention: one query token per sequence, keys read from cache pages.

Grid ``(B, KVH, S)``: one program per (sequence, KV head, split). It loads each K/V tile
once and scores it against all ``G = H / KVH`` query heads of the group with one tensor-core
dot (G padded to 16 rows), so GQA costs the bytes of its KV heads, not of its query heads.
Long contexts are cut into ``S`` splits that run in parallel (split-K, "flash decoding");
up to ``MERGE_MAX_SPLITS`` splits, the last split to finish merges their partial softmax
states (an atomic counter per sequence and KV head), so a decode step is one launch; with
more, ``_combine_kernel`` merges them in a second launch (as it does for the MLA kernel). ``S`` depends only on the batch
shape, never on data, so the launch is the same on every CUDA-graph replay; each program
reads its sequence length from device memory and finds its own key range.

The caller has already written this step's K/V into the cache (decode writes first: one
new token never overwrites a key its own query sees, even in a sliding-window ring).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkv.attention.triton import pdl
from qkv.kvcache.kv_quant import compute_dtype, is_fp8

LOG2E = 1.4426950408889634


@triton.jit
def _tile(BT_ROW, start, hi, ring, stride_cb, stride_ct, head_off, BS: tl.constexpr, BLOCK_N: tl.constexpr,
          HAS_RING: tl.constexpr, first=0, dil=1, DILATED: tl.constexpr = False):
    """Keys ``[start, start + BLOCK_N)`` of one sequence: (valid mask, element offset of each
    key's row for this KV head), through the block table (a ring's when ``HAS_RING``).
    ``DILATED``: those are key *indices* below ``hi``; key j lies at position ``first + j*dil``."""
    idx = start + tl.arange(0, BLOCK_N)
    nmask = idx < hi
    pos = idx
    if DILATED:
        pos = first + idx * dil
    page = pos // BS
    if HAS_RING:
        page = page % ring
    blk = tl.load(BT_ROW + page, mask=nmask, other=0).to(tl.int64)
    return nmask, blk * stride_cb + (pos % BS) * stride_ct + head_off


@triton.jit
def _scores(s, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw dot products -> scores in log2 units (softcap * tanh(s / softcap) first, if any)."""
    if HAS_SOFTCAP:
        s = s * sm_scale
        s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        s = s * 1.4426950408889634
    else:
        s = s * (sm_scale * 1.4426950408889634)
    return s


@triton.jit
def _online(q, k, v, nmask, m_i, l_i, acc, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """One K/V tile [BLOCK_N, D] into the online softmax state of the group's query rows."""
    s = _scores(tl.dot(q, tl.trans(k)), sm_scale, softcap, HAS_SOFTCAP)
    s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per eager step: one variant for all
def _decode_kernel(Q, KC, VC, BT, NC, QSL, ACC, ML, CNT, OUT,
                   stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
                   sm_scale, softcap, window, ring, dil,
                   G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                   BS: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   MERGE: tl.constexpr, KEYS_ON_M: tl.constexpr, DOT_F16: tl.constexpr,
                   DILATED: tl.constexpr, MERGE_VEC: tl.constexpr = False, G2: tl.constexpr = 1,
                   S2: tl.constexpr = 1, SC: tl.constexpr = 1, PDL: tl.constexpr = 0, PRE: tl.constexpr = False,
                   CHUNK_SKIP: tl.constexpr = True, ORDER=None, HAS_ORDER: tl.constexpr = False):
    # pdl.py's contract: every program syncs once, before reading what the previous kernel
    # wrote and before it can return. ``PRE`` (a CUDA graph's decode step, where the block
    # table, lengths and row starts are static inputs no kernel writes, and every cached key
    # but this step's own is older than the step): those and the first K/V tile are read
    # before the wait, the step's own key again after it.
    if not PRE:
        pdl.sync(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    if HAS_ORDER:  # longest first (order.py; never with PRE: ORDER is the step's own): the (sequence,
        lin = b + tl.num_programs(0) * kvh  # KV head) grid in ORDER's sequence order, heads together
        b = tl.load(ORDER + lin // tl.num_programs(1))
        kvh = lin % tl.num_programs(1)
    split = tl.program_id(2)
    qrow = tl.load(QSL + b)
    if not PRE:
        if tl.load(QSL + b + 1) - qrow != 1:  # a prefill row of a mixed batch: the prefill kernel's
            return
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    kstart = 0
    if HAS_WINDOW:
        kstart = tl.maximum(seq_len - window, 0)
    n = seq_len - kstart
    if DILATED:  # the window's n keys, every dil-th position back from the query's own
        n = tl.minimum((seq_len - 1) // dil + 1, window)
        kstart = seq_len - 1 - (n - 1) * dil
    # Splits cut key indices [0, n): key j is at position kstart + j (kstart + j*dil dilated).
    per_split = tl.cdiv(tl.cdiv(n, S), BLOCK_N) * BLOCK_N
    n_active = tl.cdiv(n, per_split)  # splits with keys; graphs size S for long contexts
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n)
    if not DILATED:  # positions, as _tile takes them
        lo += kstart
        hi += kstart
    d = tl.arange(0, D_PAD)
    dmask = d < D
    if PRE:  # (not DILATED, not KEYS_ON_M; graphs hold decode rows only)
        nm0, off0 = _tile(BT + b * stride_bt, lo, hi, ring, stride_cb, stride_ct, kvh * stride_ch,
                          BS, BLOCK_N, HAS_RING)
        k0 = tl.load(KC + off0[:, None] + d[None, :], mask=nm0[:, None] & dmask[None, :], other=0.0)
        v0 = tl.load(VC + off0[:, None] + d[None, :], mask=nm0[:, None] & dmask[None, :], other=0.0)
        pdl.sync(PDL)
        if tl.load(QSL + b + 1) - qrow != 1:
            return
    if MERGE:
        if split >= n_active:  # (with a separate combine, empty splits store m = -inf, l = 0)
            return

    g = tl.arange(0, G_PAD)
    gmask = g < G
    heads = kvh * G + g
    q = tl.load(Q + qrow * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F16:  # widened here, not by a copy of q per layer on the host side
        q = q.to(tl.float16)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    if KEYS_ON_M:
        # Transposed: keys are the MMA's M rows and the group's heads its N columns (padded
        # to 8, not 16), so a K tile widened from fp8 in registers is the A operand as it is,
        # with no trip back through shared memory. Scores are [keys, heads] here.
        qT = tl.trans(q)
        accT = tl.zeros([D_PAD, G_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            nmask, off = _tile(BT + b * stride_bt, start, hi, ring, stride_cb, stride_ct, kvh * stride_ch,
                               BS, BLOCK_N, HAS_RING, kstart, dil, DILATED)
            k = tl.load(KC + off[:, None] + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0).to(q.dtype)
            vT = tl.load(VC + off[None, :] + d[:, None], mask=dmask[:, None] & nmask[None, :], other=0.0).to(q.dtype)
            s = _scores(tl.dot(k, qT), sm_scale, softcap, HAS_SOFTCAP)
            s = tl.where(nmask[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            accT = accT * alpha[None, :] + tl.dot(vT, p.to(q.dtype))
            m_i = m_new
        acc = tl.trans(accT)
    else:
        first = lo
        if PRE:  # the preloaded first tile, with this step's own key (position seq_len - 1) read now
            if lo < hi:  # (an empty split of the combine's layout: no tile, as the loop below)
                own = nm0 & (lo + tl.arange(0, BLOCK_N) == seq_len - 1)
                om = own[:, None] & dmask[None, :]
                k0 = tl.where(om, tl.load(KC + off0[:, None] + d[None, :], mask=om, other=0.0), k0)
                v0 = tl.where(om, tl.load(VC + off0[:, None] + d[None, :], mask=om, other=0.0), v0)
                m_i, l_i, acc = _online(q, k0.to(q.dtype), v0.to(q.dtype), nm0, m_i, l_i, acc, sm_scale, softcap,
                                        HAS_SOFTCAP)
            first = lo + BLOCK_N
        for start in range(first, hi, BLOCK_N):
            nmask, off = _tile(BT + b * stride_bt, start, hi, ring, stride_cb, stride_ct, kvh * stride_ch,
                               BS, BLOCK_N, HAS_RING, kstart, dil, DILATED)
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(KC + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(VC + off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            m_i, l_i, acc = _online(q, k, v, nmask, m_i, l_i, acc, sm_scale, softcap, HAS_SOFTCAP)
    out_ptr = OUT + qrow * stride_ot + heads[:, None] * stride_oh + d[None, :]
    omask = gmask[:, None] & dmask[None, :]
    if S == 1:  # (n_active == 1 with S > 1 still goes through the counter: it is then 0 == 0)
        tl.store(out_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=omask)
    elif not MERGE:  # partial state for _combine_kernel, rows (b * H + head) * S + split
        rowc = (b * tl.num_programs(1) * G + heads) * S + split
        tl.store(ACC + rowc[:, None] * D_PAD + d[None, :], acc, mask=gmask[:, None])
        tl.store(ML + rowc * 2, m_i, mask=gmask)
        tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)
    else:
        # Partial state of this split (m in log2 units).
        base = (b * tl.num_programs(1) + kvh) * S
        row = (base + split) * G_PAD + g
        tl.store(ACC + row[:, None] * D_PAD + d[None, :], acc)
        tl.store(ML + row * 2, m_i)
        tl.store(ML + row * 2 + 1, l_i)
        # The last split of this (sequence, KV head) to finish merges all of them: no second
        # launch. The barrier orders every thread's stores before the counter's release; the
        # merge reads through L2 (.cg) so no stale L1 line from an earlier replay is seen.
        tl.debug_barrier()
        done = tl.atomic_add(CNT + b * tl.num_programs(1) + kvh, 1, sem="acq_rel", scope="gpu")
        if MERGE_VEC:
            if done == n_active - 1:
                g2 = tl.arange(0, G2)
                tl.store(OUT + qrow * stride_ot + (kvh * G + g2)[:, None] * stride_oh + d[None, :],
                         _merge_vec(ACC, ML, base, n_active, d, G_PAD, G2, D_PAD, S2, SC,
                                    CHUNK_SKIP).to(OUT.dtype.element_ty),
                         mask=(g2 < G)[:, None] & dmask[None, :])
                tl.store(CNT + b * tl.num_programs(1) + kvh, 0)
        else:
            if done == n_active - 1:
                m_max = tl.full([G_PAD], float("-inf"), tl.float32)
                for s in range(n_active):
                    m_max = tl.maximum(m_max, tl.load(ML + ((base + s) * G_PAD + g) * 2, cache_modifier=".cg"))
                num = tl.zeros([G_PAD, D_PAD], tl.float32)
                den = tl.zeros([G_PAD], tl.float32)
                for s in range(n_active):
                    r = (base + s) * G_PAD + g
                    m_s = tl.load(ML + r * 2, cache_modifier=".cg")
                    w = tl.where(m_s > float("-inf"), tl.exp2(m_s - m_max), 0.0)
                    den += w * tl.load(ML + r * 2 + 1, cache_modifier=".cg")
                    num += w[:, None] * tl.load(ACC + r[:, None] * D_PAD + d[None, :], cache_modifier=".cg")
                tl.store(out_ptr, (num / den[:, None]).to(OUT.dtype.element_ty), mask=omask)
                tl.store(CNT + b * tl.num_programs(1) + kvh, 0)  # ready for the next launch or replay


@triton.jit
def _merge_vec(ACC, ML, base, n_active, d, G_PAD: tl.constexpr, G2: tl.constexpr, D_PAD: tl.constexpr,
               S: tl.constexpr, SC: tl.constexpr, CHUNK_SKIP: tl.constexpr = True):
    """The merged output [G2, D_PAD] of the first ``n_active`` splits' partial states (``S``: a
    power of two at least that), all loads issued at once (``SC`` splits a chunk, ``S / SC``
    chunks unrolled): the serial merge's loop waits one L2 round trip per split, this about one.
    Only the group's ``G2 = next_power_of_2(G)`` real rows are read, not the dot's padding."""
    g2 = tl.arange(0, G2)
    sa = tl.arange(0, S)
    rows = (base + sa)[:, None] * G_PAD + g2[None, :]  # [S, G2]
    am = (sa < n_active)[:, None]
    m_s = tl.load(ML + rows * 2, mask=am, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(ML + rows * 2 + 1, mask=am, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m_s, 0)
    den = tl.sum(tl.where(m_s > float("-inf"), tl.exp2(m_s - m_max[None, :]), 0.0) * l_s, 0)
    num = tl.zeros([G2, D_PAD], tl.float32)
    for s0 in tl.static_range(0, S, SC):
        # (a graph sizes S for long contexts: chunks past the splits with keys are skipped, not
        # issued masked; Llama-8B at 576 tokens has 9 of 32)
        if CHUNK_SKIP and s0 > 0:
            go = s0 < n_active
        else:
            go = True
        if go:
            sc = s0 + tl.arange(0, SC)
            r = (base + sc)[:, None] * G_PAD + g2[None, :]  # [SC, G2]
            cm = (sc < n_active)[:, None]
            m_c = tl.load(ML + r * 2, mask=cm, other=float("-inf"), cache_modifier=".cg")
            w = tl.where(m_c > float("-inf"), tl.exp2(m_c - m_max[None, :]), 0.0)
            a = tl.load(ACC + r[:, :, None] * D_PAD + d[None, None, :], mask=cm[:, :, None], other=0.0,
                        cache_modifier=".cg")
            num += tl.sum(w[:, :, None] * a, 0)
    return num / den[:, None]


@triton.jit
def _combine_kernel(ACC, ML, OUT, QSL, stride_ot, stride_oh, H, D: tl.constexpr, D_PAD: tl.constexpr,
                    S: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.sync(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    qrow = tl.load(QSL + b)
    if tl.load(QSL + b + 1) - qrow != 1:
        return
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < S
    row = (b * H + h) * S + s
    m = tl.load(ML + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(ML + row * 2 + 1, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    acc = tl.load(ACC + row[:, None] * D_PAD + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + qrow * stride_ot + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < D)


MERGE_MAX_SPLITS = 8
# The vectorized merge skips its chunks of splits past the last one with keys at run time
# (QKV_DECODE_CHUNK_SKIP=0: every chunk issued, masked).
MERGE_CHUNK_SKIP = os.environ.get("QKV_DECODE_CHUNK_SKIP", "1") == "1"
_COUNTERS: dict = {}


def split_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), shared by every decode launch on
    ``device`` (launches on one stream never overlap). Each launch leaves them zero again.
    Allocated outside graph capture by the first (eager warm-up) call; grown, never shrunk."""
    t = _COUNTERS.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = t
    return t


def num_splits(batch_size: int, num_kv_heads: int, max_seq_len: int | None, block_n: int,
               num_sms: int = 132) -> int:
    """Splits per sequence: enough programs to fill the SMs about twice, but no split shorter
    than one tile. ``max_seq_len=None`` (CUDA-graph capture) assumes long sequences. Always a
    power of two up to 32: ``S`` is a kernel constant, so each value is a compiled variant,
    and start-up compiles all six (engine/gpu.py ``warm_kernels``) instead of 32."""
    target = triton.cdiv(2 * num_sms, batch_size * num_kv_heads)
    s = min(triton.next_power_of_2(max(target, 1)), 32)
    if max_seq_len is not None:
        per_tile = max(1, triton.cdiv(max_seq_len, 4 * block_n))
        s = min(s, 1 << (per_tile.bit_length() - 1))  # rounded down: splits no shorter than before
    return max(s, 1)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, num_computed: torch.Tensor,
                 scale: float, window: int | None = None, ring: int | None = None, softcap: float | None = None,
                 max_seq_len: int | None = None, splits: int | None = None, block_n: int | None = None,
                 num_warps: int = 4, num_stages: int | None = None, query_start_loc: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, dot_dtype: torch.dtype | None = None,
                 keys_on_m: bool | None = None, dilation: int = 1, merge: bool | None = None,
                 static_inputs: bool = False, order: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D]; sequence b's query is row ``query_start_loc[b]`` (default: row b) and sees
    keys ``[0, num_computed[b]]`` (inclusive: the new token is already cached); with a
    ``window`` W the last W of them, and dilated by d the positions p, p-d, ..., p-(W-1)*d of
    its own p: the same W keys per program, so a dilated window costs the undilated one's work.

    Sequences whose query length is not 1 are skipped (a mixed batch: the prefill kernel
    fills their rows of ``out``). ``kv_cache`` [2, blocks, bs, KVH, D], ``block_table``
    [B, max_blocks]. Returns ``out`` [T, H, D] (allocated in q's dtype when not given).
    Allocates its split buffers per call (from the graph pool when captured).

    ``merge``: None merges up to ``MERGE_MAX_SPLITS`` splits in the kernel (a serial loop) and
    more in a second launch; True merges any number in the kernel, all loads at once (one
    launch); False always launches the combine kernel. ``static_inputs``: the table, lengths and
    row starts are a CUDA graph's inputs, written by no kernel of the step, and every cached key
    but the step's own is older than the step: the kernel reads them and its first K/V tile
    before it waits for the previous kernel (with programmatic dependent launch, pdl.py).
    ``order`` (order.longest_first): program b takes sequence order[b] (the same values, another
    start order; not with ``static_inputs``' prologue, which reads the lengths before the wait)."""
    if dilation > 1 and window is None:
        raise ValueError(f"dilation={dilation} needs a window")
    B = num_computed.shape[0]
    _, H, D = q.shape
    _, _, bs, kvh, _ = kv_cache.shape
    if keys_on_m is None:
        keys_on_m = is_fp8(kv_cache.dtype)
    if is_fp8(kv_cache.dtype):
        # e4m3 widens to fp16 in one instruction (to bf16 it takes two), half-size rows want
        # twice the keys per tile to keep as many bytes in flight, and the transposed layout
        # saves a shared-memory round trip (H100, batch 32 x 8k: 50% of the copy bandwidth
        # with bf16 and 64-key tiles, 73% with fp16 and 128, 77.5% transposed;
        # benchmarks/fp8_decode_experiment.py).
        dot_dtype = dot_dtype or torch.float16
        block_n = block_n or 128
        num_stages = num_stages or 2  # 3 stages: 71.5% at batch 32 x 8k, 2: 83.6% (run 23)
    block_n = block_n or 64
    num_stages = num_stages or 3
    if query_start_loc is None:
        query_start_loc = torch.arange(B + 1, device=q.device)
    G = H // kvh
    D_PAD = triton.next_power_of_2(D)
    S = splits or num_splits(B, kvh, max_seq_len, block_n)
    G_PAD = max(8 if keys_on_m else 16, triton.next_power_of_2(G))
    # The in-kernel merge is serial in the splits: it saves a launch for a few splits but at
    # 32 splits (batch 1, 8k keys) it cost 33 us against 26 us with the combine kernel (H100).
    merge_vec = bool(merge) and S > 1
    merge = S <= MERGE_MAX_SPLITS if merge is None else merge
    acc = torch.empty((B * kvh * S * G_PAD if S > 1 else 1, D_PAD), dtype=torch.float32, device=q.device)
    ml = torch.empty((B * kvh * S * G_PAD if S > 1 else 1, 2), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kc, vc = kv_cache[0], kv_cache[1]
    dot_dtype = dot_dtype or compute_dtype(q.dtype, kc.dtype)
    dot_f16 = dot_dtype == torch.float16 and q.dtype != torch.float16
    if not dot_f16:
        q = q.to(dot_dtype)
    cnt = split_counters(B * kvh, q.device)
    mode, kw = pdl.launch(q.device)
    pre = static_inputs and not keys_on_m and dilation == 1
    if pre:
        order = None
    S2 = triton.next_power_of_2(S)
    G2 = triton.next_power_of_2(G)
    _decode_kernel[(B, kvh, S)](
        q, kc, vc, block_table, num_computed, query_start_loc, acc, ml, cnt, out,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1),
        scale, softcap or 0.0, window or 0, ring or 1, dilation,
        G=G, G_PAD=G_PAD, D=D, D_PAD=D_PAD, BS=bs, BLOCK_N=block_n, S=S,
        HAS_WINDOW=window is not None, HAS_RING=ring is not None, HAS_SOFTCAP=softcap is not None,
        MERGE=merge, KEYS_ON_M=keys_on_m, DOT_F16=dot_f16, DILATED=dilation > 1, MERGE_VEC=merge_vec, G2=G2,
        S2=S2, SC=max(1, min(S2, 8192 // (G2 * D_PAD))), PDL=mode,
        PRE=pre, CHUNK_SKIP=MERGE_CHUNK_SKIP, ORDER=order, HAS_ORDER=order is not None,
        num_warps=num_warps, num_stages=num_stages, **kw)
    if S > 1 and not merge:
        _combine_kernel[(B, H)](acc, ml, out, query_start_loc, out.stride(0), out.stride(1), H, D=D, D_PAD=D_PAD,
                                S=S, S_PAD=S2, PDL=mode, num_warps=4, **kw)
    return out
