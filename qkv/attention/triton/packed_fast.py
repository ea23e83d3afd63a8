"""The fast packed decode kernel (``packed.packed_decode(fast=True)``, the default for bf16/fp16
queries on the GPU): split-K decode attention over int8/int4 pages, as ``packed``'s kernel,
with less work per cached element. Single-warp programs (``packed.FAST_TILING``), one per
(sequence, KV head, split), each walking its keys in tiles:

- keys on the MMA's M dimension (transposed dots, heads padded to 8), so a tile
  widened in registers (``packed_widen``: PTX, the reference's values) is the A operand as it is;
- int4 K and V as eight dots each, one per nibble position of the 32-bit words (``K_WORDS``,
  ``V_WORDS`` 4; 5: V's words loaded keys-fastest, no transpose): no byte is split out of the
  words and no join repacks the widened values; the query's columns and the output's are
  permuted once, outside the loop. int8 planes (and narrower heads) come as two halves;
- a tile aligned to pages reads its block-table entries as scalars, a tile ahead (``ONE_PAGE``
  2; ``page_rows``), so the pipeliner keeps 2 tiles of K/V in flight at 3 stages;
- the query's and the output's Hadamard rotations (rotated planes) in registers (``ROT_Q``,
  ``ROT_O``); the lazy rescale for int8 (``LAZY``).

Options (``packed.packed_decode``'s arguments; their timings are in docs/benchmarks.md):
``V_WORDS`` 0-3 (0 and 3 serve int8 planes and heads narrower than 128), ``L_DEFER``, ``LAZY``
for int4, ``ONE_PAGE`` 0/1, registers capped. Options measured slower and removed in session 16
(their code is in git before that): keys on the MMA's N dimension, K and V a tile ahead in
registers (``prefetch`` 1/2), the scores as two MMA chains (``qk_split``).

Without ``ASM`` (Triton's interpreter, which runs no PTX) the tiles are widened by Triton ops:
the same values, so the tests check the kernel's structure on the CPU too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qkv.attention.triton.decode import _scores
from qkv.attention.triton.packed_widen import (_halves, _half_cols, _int4_word_halves, _int4_words, _int4_words_raw,
                                               _natural8, _opaque, _split8, _widen_words8, _words_cols)
from qkv.attention.triton.page_rows import _keys, _keys_entries, _keys_one_page, _page_entries


@triton.jit
def _qk_nibbles(C32, C8, base, vals_at, scales_at, row, nmask, q0, q1, q2, q3, q4, q5, q6, q7,
                D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                PREC: tl.constexpr, OPQ: tl.constexpr):
    """``K_WORDS``: an int4 K tile's scores [keys, heads] as one chain of eight dots of depth
    D/8, one per nibble position (``q<m>`` [D/8, heads]: the query's columns 8j + m), the widened
    words straight from the asm (no byte split out of the words, no join)."""
    w, c = _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
    o0, o1, o2, o3, o4, o5, o6, o7 = _widen_words8(w, c, D, BLOCK_N, DT, ASM)
    if OPQ == 2:
        o0 = _opaque(o0, ASM)
        o1 = _opaque(o1, ASM)
        o2 = _opaque(o2, ASM)
        o3 = _opaque(o3, ASM)
        o4 = _opaque(o4, ASM)
        o5 = _opaque(o5, ASM)
        o6 = _opaque(o6, ASM)
        o7 = _opaque(o7, ASM)
    s = tl.dot(o0, q0, input_precision=PREC)
    s = tl.dot(o1, q1, acc=s, input_precision=PREC)
    s = tl.dot(o2, q2, acc=s, input_precision=PREC)
    s = tl.dot(o3, q3, acc=s, input_precision=PREC)
    s = tl.dot(o4, q4, acc=s, input_precision=PREC)
    s = tl.dot(o5, q5, acc=s, input_precision=PREC)
    s = tl.dot(o6, q6, acc=s, input_precision=PREC)
    s = tl.dot(o7, q7, acc=s, input_precision=PREC)
    return s


@triton.jit
def _pv_dot(o, pd, acc, PREC: tl.constexpr, KEYS_FAST: tl.constexpr):
    """acc + V_m^T @ P for one nibble position's widened V tile ``o`` ([keys, D/8], or
    [D/8, keys] with KEYS_FAST)."""
    if KEYS_FAST:
        return tl.dot(o, pd, acc=acc, input_precision=PREC)
    else:
        return tl.dot(tl.trans(o), pd, acc=acc, input_precision=PREC)


@triton.jit
def _pv_nibbles(C32, C8, base, vals_at, scales_at, row, nmask, pd, alpha, a0, a1, a2, a3, a4, a5, a6, a7,
                D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                PREC: tl.constexpr, RESCALE: tl.constexpr, KEYS_FAST: tl.constexpr = False):
    """``V_WORDS`` 4: an int4 V tile's P @ V as eight dots of M = D/8, one per nibble position
    (accumulator m [D/8, heads]: columns 8j + m), so the widened words go to the dots as the
    asm leaves them: no join repacks each value pair into natural column order (32 PRMT a
    16-key tile), the output's columns are permuted once, after the loop (``_natural8``).
    ``KEYS_FAST`` (``V_WORDS`` 5): the words load [D/8, keys], so each asm block widens two
    keys' words and its outputs are the A operand's key pairs: no transpose before the dots.
    Without KEYS_FAST the widened tiles pass an opaque mov (``_opaque``: fed straight to the
    transposed dots, session 7's 16-key tiles gave wrong values on the H200); with it they must
    not, or the mov pins the words' load layout and the transpose comes back (the same SASS)."""
    w, c = _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN, KEYS_FAST)
    o0, o1, o2, o3, o4, o5, o6, o7 = _widen_words8(w, c, D, BLOCK_N, DT, ASM, KEYS_FAST)
    if not KEYS_FAST:
        o0 = _opaque(o0, ASM)
        o1 = _opaque(o1, ASM)
        o2 = _opaque(o2, ASM)
        o3 = _opaque(o3, ASM)
        o4 = _opaque(o4, ASM)
        o5 = _opaque(o5, ASM)
        o6 = _opaque(o6, ASM)
        o7 = _opaque(o7, ASM)
    if RESCALE:
        a0 = a0 * alpha[None, :]
    a0 = _pv_dot(o0, pd, a0, PREC, KEYS_FAST)
    if RESCALE:
        a1 = a1 * alpha[None, :]
    a1 = _pv_dot(o1, pd, a1, PREC, KEYS_FAST)
    if RESCALE:
        a2 = a2 * alpha[None, :]
    a2 = _pv_dot(o2, pd, a2, PREC, KEYS_FAST)
    if RESCALE:
        a3 = a3 * alpha[None, :]
    a3 = _pv_dot(o3, pd, a3, PREC, KEYS_FAST)
    if RESCALE:
        a4 = a4 * alpha[None, :]
    a4 = _pv_dot(o4, pd, a4, PREC, KEYS_FAST)
    if RESCALE:
        a5 = a5 * alpha[None, :]
    a5 = _pv_dot(o5, pd, a5, PREC, KEYS_FAST)
    if RESCALE:
        a6 = a6 * alpha[None, :]
    a6 = _pv_dot(o6, pd, a6, PREC, KEYS_FAST)
    if RESCALE:
        a7 = a7 * alpha[None, :]
    a7 = _pv_dot(o7, pd, a7, PREC, KEYS_FAST)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _v_tile(C32, C8, C16, base, vals_at, scales_at, row, nmask, BITS: tl.constexpr, GRP: tl.constexpr,
            D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
            V_WORDS: tl.constexpr):
    """One V tile as ``_pv_acc`` takes it: (va, vb, v), the two halves, or the whole tile by
    words (``V_WORDS``; then va = vb = v)."""
    if V_WORDS == 3:  # halves, loaded as words
        va, vb = _int4_word_halves(C32, C8, base, vals_at, scales_at, row, nmask, D, BLOCK_N, ALIGN, DT, ASM)
        v = va
    elif V_WORDS:
        v = _int4_words(C32, C8, base, vals_at, scales_at, row, nmask, D, BLOCK_N, ALIGN, DT, ASM, V_WORDS)
        va = v
        vb = v
    else:
        va, vb = _halves(C8, C16, base, vals_at, scales_at, row, nmask, BITS, GRP, D, BLOCK_N, ALIGN, DT, ASM,
                         C32)
        v = va
    return va, vb, v


@triton.jit
def _pv_acc(acc_a, acc_b, va, vb, v, pd, alpha, WHOLE: tl.constexpr, PREC: tl.constexpr):
    """The accumulators [columns, heads] after one tile: acc * alpha + V^T @ P. WHOLE: one full
    tile ``v`` and one accumulator ``acc_a``; else halves ``va``/``vb`` into ``acc_a``/``acc_b``."""
    if WHOLE:
        acc_a = tl.dot(tl.trans(v), pd, acc=acc_a * alpha[None, :], input_precision=PREC)
    else:
        acc_a = tl.dot(tl.trans(va), pd, acc=acc_a * alpha[None, :], input_precision=PREC)
        acc_b = tl.dot(tl.trans(vb), pd, acc=acc_b * alpha[None, :], input_precision=PREC)
    return acc_a, acc_b


@triton.jit
def _fwht(x, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """x [R, D] (fp32) times the normalized Sylvester Hadamard matrix: kv_int.hadamard's
    butterflies (pairs h apart: sum in the first, difference in the second), in registers."""
    for k in tl.static_range(LOG2D):
        y = tl.permute(tl.reshape(x, (R, D // (2 << k), 2, 1 << k)), (0, 1, 3, 2))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, D))
    return x * (1.0 / tl.sqrt(D * 1.0))


@triton.jit
def _rescaled(s, m_i, l_i, acc_a, acc_b, LAZY: tl.constexpr):
    """One tile's scores [keys, heads] into the online softmax: (p, m, l, acc_a, acc_b), l and the
    accumulators [columns, heads] rescaled to the new running max. ``LAZY`` > 0: the running max
    moves only when the tile's exceeds it by more than LAZY (log2 units; p <= 2^LAZY), so the
    accumulators' rescale (D x G_PAD products a tile) is skipped on most tiles, one uniform
    branch for the program."""
    if LAZY:
        m_t = tl.max(s, 0)
        if tl.max(m_t - m_i, 0) > LAZY:
            m_new = tl.maximum(m_i, m_t)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc_a = acc_a * alpha[None, :]
            acc_b = acc_b * alpha[None, :]
            m_i = m_new
    else:
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc_a = acc_a * alpha[None, :]
        acc_b = acc_b * alpha[None, :]
        m_i = m_new
    p = tl.exp2(s - m_i[None, :])
    return p, m_i, l_i + tl.sum(p, 0), acc_a, acc_b


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def fast_decode_kernel(Q, C8, C16, C32, BT, NC, QSL, ACC, ML, OUT,
                       stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, page_bytes,
                       k_vals, k_scales, v_vals, v_scales, sm_scale, softcap, window, ring,
                       KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                       K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                       ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr,
                       V_WORDS: tl.constexpr,
                       LAZY: tl.constexpr = 0, ROT_Q: tl.constexpr = False, ROT_O: tl.constexpr = False,
                       LOG2D: tl.constexpr = 7, L_DEFER: tl.constexpr = False,
                       ONE_PAGE: tl.constexpr = False, K_WORDS: tl.constexpr = 0,
                       ORDER=None, HAS_ORDER: tl.constexpr = False, HEAD_MAJOR: tl.constexpr = False):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    if HAS_ORDER:  # longest first (order.py): the (sequence, KV head) grid in ORDER's sequence order,
        lin = b + tl.num_programs(0) * kvh  # every KV head of a sequence before the next one's
        b = tl.load(ORDER + lin // tl.num_programs(1))
        kvh = lin % tl.num_programs(1)
    split = tl.program_id(2)
    qrow = tl.load(QSL + b)
    if tl.load(QSL + b + 1) - qrow != 1:  # a prefill row of a mixed batch
        return
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    kstart = 0
    if HAS_WINDOW:
        kstart = tl.maximum(seq_len - window, 0)
    n = seq_len - kstart
    per_split = tl.cdiv(tl.cdiv(n, S), BLOCK_N) * BLOCK_N
    lo = kstart + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    DT = Q.dtype.element_ty
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    HALF: tl.constexpr = D // 2
    WHOLE: tl.constexpr = V_WORDS == 1 or V_WORDS == 2  # one V accumulator of D columns (else halves)
    VW: tl.constexpr = D if WHOLE else HALF  # columns per V accumulator
    BT_ROW = BT + b * stride_bt

    g = tl.arange(0, G_PAD)
    gmask = g < G
    heads = kvh * G + g
    ka_c, kb_c = _half_cols(K_BITS, D)
    if V_WORDS == 2:
        va_c = _words_cols(D)
        vb_c = va_c
    elif WHOLE:
        va_c = tl.arange(0, D)
        vb_c = va_c
    else:
        va_c, vb_c = _half_cols(V_BITS, D)
    qp = Q + qrow * stride_qt + heads[:, None] * stride_qh
    if ROT_Q:  # K stored rotated (kv_int.hadamard): the query rotated here, in fp32, then cast as _rotate's
        qn = tl.load(qp + tl.arange(0, D)[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        qn = _fwht(qn, G_PAD, D, LOG2D).to(DT)
        if K_BITS == 4:  # even and odd columns
            qa, qb = tl.split(tl.reshape(qn, (G_PAD, HALF, 2)))
        else:  # first and second half
            qa, qb = tl.split(tl.permute(tl.reshape(qn, (G_PAD, 2, HALF)), (0, 2, 1)))
    else:
        qa = tl.load(qp + ka_c[None, :], mask=gmask[:, None], other=0.0)  # the query's columns of K's halves
        qb = tl.load(qp + kb_c[None, :], mask=gmask[:, None], other=0.0)
    if K_WORDS:  # the query's columns 8j + m for nibble position m, [D/8, heads] (_qk_nibbles)
        if ROT_Q:
            qw = qn
        else:
            qw = tl.load(qp + tl.arange(0, D)[None, :], mask=gmask[:, None], other=0.0)
        q0, q1, q2, q3, q4, q5, q6, q7 = _split8(qw, G_PAD, D)
        q0 = tl.trans(q0)
        q1 = tl.trans(q1)
        q2 = tl.trans(q2)
        q3 = tl.trans(q3)
        q4 = tl.trans(q4)
        q5 = tl.trans(q5)
        q6 = tl.trans(q6)
        q7 = tl.trans(q7)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    if L_DEFER:  # per-element partial sums of p (keys on M, not LAZY): summed over the keys once, after the loop
        l_acc = tl.zeros([BLOCK_N, G_PAD], tl.float32)
    if V_WORDS >= 4:  # one accumulator [D/8, heads] per nibble position (_pv_nibbles)
        a0 = tl.zeros([D // 8, G_PAD], tl.float32)
        a1 = tl.zeros([D // 8, G_PAD], tl.float32)
        a2 = tl.zeros([D // 8, G_PAD], tl.float32)
        a3 = tl.zeros([D // 8, G_PAD], tl.float32)
        a4 = tl.zeros([D // 8, G_PAD], tl.float32)
        a5 = tl.zeros([D // 8, G_PAD], tl.float32)
        a6 = tl.zeros([D // 8, G_PAD], tl.float32)
        a7 = tl.zeros([D // 8, G_PAD], tl.float32)
    acc_a = tl.zeros([VW, G_PAD], tl.float32)  # accumulators [columns, heads]
    acc_b = tl.zeros([VW, G_PAD], tl.float32)
    qaT = tl.trans(qa)  # scores [keys, heads]: keys on the MMA's M dimension
    qbT = tl.trans(qb)
    if ONE_PAGE == 2:
        e0, e1 = _page_entries(BT_ROW, lo, hi, ring, BS, BLOCK_N, HAS_RING)
    for start in range(lo, hi, BLOCK_N):
        if ONE_PAGE == 2:  # this tile's entries were loaded a tile ago; the next tile's now
            n0, n1 = _page_entries(BT_ROW, start + BLOCK_N, hi, ring, BS, BLOCK_N, HAS_RING)
            nmask, base, row = _keys_entries(e0, e1, start, hi, page_bytes, kvh, KVH, BS, BLOCK_N, HEAD_MAJOR)
            e0 = n0
            e1 = n1
        elif ONE_PAGE:
            nmask, base, row = _keys_one_page(BT_ROW, start, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N,
                                              HAS_RING, HEAD_MAJOR)
        else:
            nmask, base, row = _keys(BT_ROW, start, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N, HAS_RING,
                                     HEAD_MAJOR)
        if K_WORDS:
            s = _qk_nibbles(C32, C8, base, k_vals, k_scales, row, nmask, q0, q1, q2, q3, q4, q5, q6, q7, D,
                            BLOCK_N, ALIGN, DT, ASM, PREC, K_WORDS)
        else:  # one chain of depth D over the two halves
            ka, kb = _halves(C8, C16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT,
                             ASM, C32)
            s = tl.dot(kb, qbT, acc=tl.dot(ka, qaT, input_precision=PREC), input_precision=PREC)
        s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
        s = tl.where(nmask[:, None], s, float("-inf"))
        if LAZY and V_WORDS >= 4:  # (as _rescaled, over the eight accumulators)
            m_t = tl.max(s, 0)
            if tl.max(m_t - m_i, 0) > LAZY:
                m_new = tl.maximum(m_i, m_t)
                alpha = tl.exp2(m_i - m_new)
                if L_DEFER:
                    l_acc = l_acc * alpha[None, :]
                else:
                    l_i = l_i * alpha
                a0 = a0 * alpha[None, :]
                a1 = a1 * alpha[None, :]
                a2 = a2 * alpha[None, :]
                a3 = a3 * alpha[None, :]
                a4 = a4 * alpha[None, :]
                a5 = a5 * alpha[None, :]
                a6 = a6 * alpha[None, :]
                a7 = a7 * alpha[None, :]
                m_i = m_new
            p = tl.exp2(s - m_i[None, :])
            if L_DEFER:
                l_acc = l_acc + p
            else:
                l_i = l_i + tl.sum(p, 0)
            a0, a1, a2, a3, a4, a5, a6, a7 = _pv_nibbles(
                C32, C8, base, v_vals, v_scales, row, nmask, p.to(DT), m_i, a0, a1, a2, a3, a4, a5, a6,
                a7, D, BLOCK_N, ALIGN, DT, ASM, PREC, False, V_WORDS == 5)
        elif LAZY:
            p, m_i, l_i, acc_a, acc_b = _rescaled(s, m_i, l_i, acc_a, acc_b, LAZY)
            va, vb, v = _v_tile(C32, C8, C16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N,
                                ALIGN, DT, ASM, V_WORDS)
            pd = p.to(DT)
            acc_a = tl.dot(tl.trans(va), pd, acc=acc_a, input_precision=PREC)
            acc_b = tl.dot(tl.trans(vb), pd, acc=acc_b, input_precision=PREC)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            if L_DEFER:  # no cross-lane sum in the loop
                l_acc = l_acc * alpha[None, :] + p
            else:
                l_i = l_i * alpha + tl.sum(p, 0)
            if V_WORDS >= 4:
                a0, a1, a2, a3, a4, a5, a6, a7 = _pv_nibbles(
                    C32, C8, base, v_vals, v_scales, row, nmask, p.to(DT), alpha, a0, a1, a2, a3, a4, a5, a6,
                    a7, D, BLOCK_N, ALIGN, DT, ASM, PREC, True, V_WORDS == 5)
            else:
                va, vb, v = _v_tile(C32, C8, C16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N,
                                    ALIGN, DT, ASM, V_WORDS)
                acc_a, acc_b = _pv_acc(acc_a, acc_b, va, vb, v, p.to(DT), alpha, WHOLE, PREC)
            m_i = m_new
    if L_DEFER:
        l_i = tl.sum(l_acc, 0)
    if V_WORDS >= 4:  # the nibble positions' accumulators -> [heads, D] in natural column order
        on = _natural8(tl.trans(a0), tl.trans(a1), tl.trans(a2), tl.trans(a3), tl.trans(a4), tl.trans(a5),
                       tl.trans(a6), tl.trans(a7), G_PAD, D)
        if S == 1:
            on = on / l_i[:, None]
            if ROT_O:
                on = _fwht(on, G_PAD, D, LOG2D)
            tl.store(OUT + qrow * stride_ot + heads[:, None] * stride_oh + tl.arange(0, D)[None, :],
                     on.to(OUT.dtype.element_ty), mask=gmask[:, None])
        else:
            rowc = (b * KVH * G + heads) * S + split
            tl.store(ACC + rowc[:, None] * D + tl.arange(0, D)[None, :], on, mask=gmask[:, None])
            tl.store(ML + rowc * 2, m_i, mask=gmask)
            tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)
        return
    out_a = tl.trans(acc_a)  # [heads, columns]
    out_b = tl.trans(acc_b)
    if S == 1 and ROT_O:  # V stored rotated: the output rotated back here, in fp32 (halves, not WHOLE)
        if V_BITS == 4:  # even and odd columns
            on = tl.reshape(tl.join(out_a / l_i[:, None], out_b / l_i[:, None]), (G_PAD, D))
        else:  # first and second half
            on = tl.reshape(tl.permute(tl.join(out_a / l_i[:, None], out_b / l_i[:, None]), (0, 2, 1)), (G_PAD, D))
        on = _fwht(on, G_PAD, D, LOG2D)
        tl.store(OUT + qrow * stride_ot + heads[:, None] * stride_oh + tl.arange(0, D)[None, :],
                 on.to(OUT.dtype.element_ty), mask=gmask[:, None])
    elif S == 1:
        ob = OUT + qrow * stride_ot + heads[:, None] * stride_oh
        tl.store(ob + va_c[None, :], (out_a / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
        if not WHOLE:
            tl.store(ob + vb_c[None, :], (out_b / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
    else:  # partial state for decode._combine_kernel, rows (b * H + head) * S + split
        rowc = (b * KVH * G + heads) * S + split
        tl.store(ACC + rowc[:, None] * D + va_c[None, :], out_a, mask=gmask[:, None])
        if not WHOLE:
            tl.store(ACC + rowc[:, None] * D + vb_c[None, :], out_b, mask=gmask[:, None])
        tl.store(ML + rowc * 2, m_i, mask=gmask)
        tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)
