"""MLA over int8/int4 latent pages (``kvcache/kv_pages.py``): the quantizing row write and the
absorbed decode kernel, which widens each tile of packed rows in registers (no dequantized
copy of the cache).

A latent row ``[c_KV (R) | k_rope (P)]`` is one plane of ``R + P`` values, unrotated, in groups
of ``gcd(R + P, group)``; for powers of two R > P that group divides both parts, so the row is
handled as two vectors (R and P wide, each a power of two, as Triton's ranges need) whose
bytes and scales sit where the whole row's would: the write stores ``kv_pages.write``'s bytes
and the decode kernel reads them as ``kv_pages.read`` does.

The decode kernel is the pipelined bf16 kernel's shape (``mla._mla_decode_kernel``: one
program per sequence, head block and split; block table read ahead; one split writes the
output) over packed rows: each tile's rows load as 32-bit words (no byte repacking), the next
tile's while this one is computed (``PREFETCH``), and widen in PTX (``I4F_ASM``: one fused
fma per int4 pair; ``I8W_ASM_BF16``: int8 under an fp32 exponent) into the values
``kv_pages.read`` returns, each word's values side by side in its thread and joined into
natural column order, or into 2 or 4 column classes (variant ``chunks``: one dot each, independent
MMA chains). The scales load once per row and group. Without PTX (Triton's interpreter, fp32
queries) Triton ops widen to the same values. tests/test_mla_packed_asm.py runs the PTX in an
emulator against the reference dequantization.

Steps with prompt tokens (``mla_step.mla_extend``) up-project their keys' latents anyway: the
prefix rows they need are gathered through ``kv_pages.read`` (dequantized, as the up-projection
consumes them), their decodes run the kernel here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton.packed import INTERPRET, _store_int4, _store_int8
from qkv.attention.triton.packed_widen import I4W_ASM_F16, I4WF_ASM_BF16, _bytes_ops, _nibbles_ops
from qkv.kvcache.kv_pages import layout_of


def kernels_read(kv_cache: torch.Tensor, R: int, P: int) -> bool:
    """True when the kernels below read this packed latent cache: an int8/int4 latent, R > P
    powers of two, int4 in groups of 16. Otherwise the caller runs the reference."""
    lay = layout_of(kv_cache)
    if lay is None or len(lay.planes) != 1:
        return False
    fmt = lay.planes[0].fmt
    pow2 = R & (R - 1) == 0 and P & (P - 1) == 0 and R > P >= 4
    if not (fmt.is_int and pow2) or lay.page_bytes % 4:  # pages are read as 32-bit words
        return False
    g = fmt.group_for(R + P)
    return (g == 16 and P >= 16) if fmt.bits == 4 else (P % g == 0 and P >= 4)


@triton.jit
def _latent_write_kernel(X, C8, C16, SLOT, stride_xt, page_bytes, vals_at, scales_at,
                         R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr,
                         GRP: tl.constexpr, EXACT: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    if slot >= 0:  # padding rows of a CUDA graph have slot -1
        page = (slot // BS) * page_bytes
        row = slot % BS
        x = X + t * stride_xt
        if BITS == 4:
            vals = C8 + page + vals_at + row * ((R + P) // 2)
            sc = C8 + page + scales_at + row * ((R + P) // 16)
            _store_int4(x, vals, sc, R, EXACT)
            _store_int4(x + R, vals + R // 2, sc + R // 16, P, EXACT)
        else:
            vals = C8 + page + vals_at + row * (R + P)
            sc = C16 + (page + scales_at) // 2 + row * ((R + P) // GRP)
            _store_int8(x, vals, sc, R, GRP)
            _store_int8(x + R, vals + R, sc + R // GRP, P, GRP)


def write_latent(kv_cache: torch.Tensor, rows: torch.Tensor, R: int, slot_mapping: torch.Tensor) -> None:
    """rows [T, R + P] -> quantized into the packed latent pages at ``slot_mapping`` (-1: skipped).
    The bytes equal ``kv_pages.write``'s (tests/test_mla_packed.py)."""
    T, W = rows.shape
    if T == 0:
        return
    lay = kv_cache.kv_layout
    p = lay.planes[0]
    rows = rows.contiguous()
    _latent_write_kernel[(T,)](rows, kv_cache, kv_cache.view(torch.float16), slot_mapping, rows.stride(0),
                               lay.page_bytes, p.values_at, p.scales_at, R=R, P=W - R, BS=lay.block_size,
                               BITS=p.fmt.bits, GRP=p.fmt.group_for(W), EXACT=not INTERPRET, num_warps=1)


# The decode kernel's variants (``launch_decode`` arguments; benchmarks/mla_packed_bench.py
# --sweep times them): PREFETCH (1 or 2) loads the next tile's (and the one after's) packed
# words into registers while this one is widened (their pages' block-table entries a tile
# earlier, so no load waits on another);
# ROWS_ON_M puts the tile's rows on the MMA's M dimension (scores as lat @ q^T: the tile is the
# A operand of one dot and the B of the other, as mla._mla_decode_kernel), else the heads;
# F16 computes the dots in fp16 for bf16 queries (int8 widens in half the instructions; the
# values must then fit fp16's range: |v * s| < 65504).
# Defaults by the plane's bits, from sweeps 1-2 on an H200 (2026-12-03, docs/benchmarks.md):
# heads on M and 4 chunks were fastest or within 1% at 64 x 8k, 1 x 8k and 128 x 640 for both
# formats (int8 in fp16: 7% faster again, opt-in: f16=1). int4 takes 64-row tiles when a
# sequence has 2-16 splits (64 x 8k: 186.0 us against 208.0 with 32).
VARIANT = {4: dict(prefetch=1, rows_on_m=0, f16=0, chunks=4),
           8: dict(prefetch=1, rows_on_m=0, f16=0, chunks=4)}
TILES = {4: (32, 4, 1), 8: (32, 4, 1)}  # (rows per tile, warps, stages) by bits
# Latents too narrow for the defaults' chunks (a dot needs K >= 16: R / chunks < 16, the tests'
# tiny models) run the previous defaults, which passed the GPU tests at those shapes (one chunk,
# int8 with rows on M, 32-row tiles).
NARROW = {4: dict(prefetch=1, rows_on_m=0, f16=0, chunks=1),
          8: dict(prefetch=1, rows_on_m=1, f16=0, chunks=1)}


def narrow(R: int, bits: int) -> bool:
    """Whether a latent of width ``R`` is too narrow for ``VARIANT``'s chunks (see ``NARROW``)."""
    return R // VARIANT[bits]["chunks"] < 16

# int8 by words: pack=2 over two 32-bit words w0, w1 (4 bytes each, in one group: fp32 scales
# s0, s1); output m holds byte m of both words (bf16x2/f16x2: w0's low, w1's high), widened as
# packed_widen's int8 asm: byte ^ 0x80 permuted under an fp32 exponent, minus 2^23 + 128 (the
# signed byte, exact), times the scale, rounded once to DT (the reference's fp32 product, cast).
_I8W_ASM = "\n".join(
    ["{", ".reg .b32 w8a, w8b, w8f, w8g, w8hi;", "mov.b32 w8hi, 0x4B000000;",
     "xor.b32 w8a, $4, 0x80808080;", "xor.b32 w8b, $5, 0x80808080;"]
    + [line for m in range(4) for line in (
        f"prmt.b32 w8f, w8a, w8hi, 0x744{m};", f"prmt.b32 w8g, w8b, w8hi, 0x744{m};",
        "sub.rn.f32 w8f, w8f, 0f4B000080;", "sub.rn.f32 w8g, w8g, 0f4B000080;",
        "mul.rn.f32 w8f, w8f, $6;", "mul.rn.f32 w8g, w8g, $7;", f"cvt.rn.T.f32 ${m}, w8g, w8f;")]
    + ["}"])
I8W_ASM_BF16 = tl.constexpr(_I8W_ASM.replace(".T", ".bf16x2"))
# int4 by words in bf16, one fma per value pair (packed_widen.I4W_ASM takes two): the nibble
# OR'd under 0x4300 reads as 128 + n; (128 + n) * s - 136 * s ($11: -136 s, exact: 6
# significant bits) is (n - 8) * s exactly (8 significant bits), so the fused fma rounds nothing.
# As I4W_ASM, output m holds nibble m of both words ($8, $9; scales $10). The decode kernel's.
I4F_ASM = I4WF_ASM_BF16
# int8 by words in fp16 (the F16 variant: the dots in fp16): byte m of both words gathered
# into one register's halves under 0x64 (1024 + u, u = byte ^ 0x80); one paired fma takes
# 1152 off (the signed byte, exact), one paired multiply applies the fp16 scales ($6: both
# words'): v * s rounded once (exact in fp32 first: 8 x 11 significant bits), as the reference's
# fp32 product cast to fp16.
I8H_ASM = tl.constexpr("\n".join(
    ["{", ".reg .b32 h8a, h8b, h8t, h8one, h8off;", "mov.b32 h8one, 0x3C003C00;", "mov.b32 h8off, 0xE480E480;",
     "xor.b32 h8a, $4, 0x80808080;", "xor.b32 h8b, $5, 0x80808080;"]
    + [line for m in range(4) for line in (
        f"prmt.b32 h8t, h8a, h8b, 0x{4 + m}0{m};", "lop3.b32 h8t, h8t, 0x00FF00FF, 0x64006400, 0xea;",
        "fma.rn.f16x2 h8t, h8t, h8one, h8off;", f"mul.rn.f16x2 ${m}, h8t, $6;")]
    + ["}"]))


@triton.jit
def _raw_tile(C32, C16, C8, base, row, nmask, vals_at, scales_at, R: tl.constexpr, P: tl.constexpr,
              BITS: tl.constexpr, GRP: tl.constexpr):
    """The packed rows at page offsets ``base``, rows ``row`` (masked rows read zeros, whose
    scales are zero), as 32-bit words (a register holds 4 or 8 values, none is repacked):
    latent and rope words [N, R*BITS/32], [N, P*BITS/32] and their scales, each loaded once:
    int4: e5m3 codes [N, R/16], [N, P/16]; int8: fp16 [N, R/GRP], [N, P/GRP]."""
    W: tl.constexpr = (R + P) * BITS // 32
    LW: tl.constexpr = R * BITS // 32
    vo = tl.multiple_of((base + vals_at) // 4 + row * W, 4)
    xl = tl.load(C32 + vo[:, None] + tl.arange(0, LW)[None, :], mask=nmask[:, None], other=0)
    xr = tl.load(C32 + vo[:, None] + LW + tl.arange(0, P * BITS // 32)[None, :], mask=nmask[:, None], other=0)
    if BITS == 4:
        so = base + scales_at + row * ((R + P) // 16)
        sl = tl.load(C8 + so[:, None] + tl.arange(0, R // 16)[None, :], mask=nmask[:, None], other=0)
        sr = tl.load(C8 + so[:, None] + R // 16 + tl.arange(0, P // 16)[None, :], mask=nmask[:, None], other=0)
    else:
        so = (base + scales_at) // 2 + row * ((R + P) // GRP)
        sl = tl.load(C16 + so[:, None] + tl.arange(0, R // GRP)[None, :], mask=nmask[:, None], other=0.0)
        sr = tl.load(C16 + so[:, None] + R // GRP + tl.arange(0, P // GRP)[None, :], mask=nmask[:, None],
                     other=0.0)
    return xl, xr, sl, sr


@triton.jit
def _word_scales(s, D: tl.constexpr, BITS: tl.constexpr, GRP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each word's scale [N, D*BITS/32] (fp32) from a part's scales as ``_raw_tile`` loads them
    (int4: e5m3 codes, one per 2 words; int8: fp16, one per GRP/4 words)."""
    if BITS == 4:
        c = tl.reshape(tl.broadcast_to(s.to(tl.int32)[:, :, None], (BLOCK_N, D // 16, 2)), (BLOCK_N, D // 8))
        return (c << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        NG: tl.constexpr = D // GRP
        return tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, NG, GRP // 4)), (BLOCK_N, D // 4))


@triton.jit
def _group(o0, o1, o2, o3, o4, o5, o6, o7, BITS: tl.constexpr, CH: tl.constexpr):
    """A part's widened outputs (int4: o0..o7, nibble m of each word; int8: o0..o3, byte m)
    joined into CH chunks (the rest repeat the first): each chunk's values of a word side by
    side in its thread (no data movement). CH 1: natural column order; int4 CH 2: the even and
    the odd columns, CH 4: columns = j mod 4; int8 CH 2: columns = j mod 2, CH 4: byte j.
    (Nested joins: join(join(a, b), join(c, d)) lays out a, c, b, d.)"""
    if BITS == 4:
        if CH == 1:
            t0 = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
            t1 = t0
            t2 = t0
            t3 = t0
        elif CH == 2:
            t0 = tl.join(tl.join(o0, o4), tl.join(o2, o6))
            t1 = tl.join(tl.join(o1, o5), tl.join(o3, o7))
            t2 = t0
            t3 = t0
        else:
            t0 = tl.join(o0, o4)
            t1 = tl.join(o1, o5)
            t2 = tl.join(o2, o6)
            t3 = tl.join(o3, o7)
    else:
        if CH == 1:
            t0 = tl.join(tl.join(o0, o2), tl.join(o1, o3))
            t1 = t0
            t2 = t0
            t3 = t0
        elif CH == 2:
            t0 = tl.join(o0, o2)
            t1 = tl.join(o1, o3)
            t2 = t0
            t3 = t0
        else:
            t0 = o0
            t1 = o1
            t2 = o2
            t3 = o3
    return t0, t1, t2, t3


@triton.jit
def _cols(D: tl.constexpr, BITS: tl.constexpr, CH: tl.constexpr):
    """The columns of ``_widen``'s CH chunks of a D-wide part (the same joins over indices)."""
    V: tl.constexpr = 32 // BITS  # values per word
    w = V * tl.arange(0, D // V)
    if BITS == 4:
        c0, c1, c2, c3 = _group(w, w + 1, w + 2, w + 3, w + 4, w + 5, w + 6, w + 7, BITS, CH)
    else:
        c0, c1, c2, c3 = _group(w, w + 1, w + 2, w + 3, w, w, w, w, BITS, CH)
    return (tl.reshape(c0, (D // CH,)), tl.reshape(c1, (D // CH,)), tl.reshape(c2, (D // CH,)),
            tl.reshape(c3, (D // CH,)))


@triton.jit
def _opaque(t, ASM: tl.constexpr):
    """t, through a no-op Triton cannot see into: its dot lowering would otherwise trace the
    tile back through the joins to the word loads and pick mixed-precision operand layouts
    (kWidth 4: no ldmatrix, 1.5x the instructions)."""
    if ASM:
        t = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=t.dtype, is_pure=False, pack=2)
    return t


@triton.jit
def _widen(w, s, D: tl.constexpr, BITS: tl.constexpr, GRP: tl.constexpr, BLOCK_N: tl.constexpr,
           DT: tl.constexpr, ASM: tl.constexpr, CH: tl.constexpr):
    """One part (latent or rope) of a tile: words ``w`` [N, D*BITS/32] and scales ``s`` (as
    ``_raw_tile``) -> CH chunks [N, D/CH] in DT, columns as ``_cols`` (CH 1: the whole part in
    natural order; the rest of the four repeat the first). The values are the reference's
    (int4: n * s, exact; int8: the fp32 product rounded once). ``ASM``: widened in PTX."""
    sw = _word_scales(s, D, BITS, GRP, BLOCK_N)
    if BITS == 4:
        if ASM:
            if DT == tl.bfloat16:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                    I4F_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, sw.to(DT), (sw * -136.0).to(DT)],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
            else:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                    I4W_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw.to(DT)], dtype=(tl.float16,) * 8,
                    is_pure=True, pack=2)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_ops(w, sw, DT)
        t0, t1, t2, t3 = _group(o0, o1, o2, o3, o4, o5, o6, o7, BITS, CH)
    else:
        if ASM:
            if DT == tl.bfloat16:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(I8W_ASM_BF16, "=r,=r,=r,=r,r,r,r,r", [w, sw],
                                                           dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
            else:
                o0, o1, o2, o3 = tl.inline_asm_elementwise(I8H_ASM, "=r,=r,=r,=r,r,r,r", [w, sw.to(tl.float16)],
                                                           dtype=(tl.float16,) * 4, is_pure=True, pack=2)
        else:
            o0, o1, o2, o3 = _bytes_ops(w, sw, DT)
        t0, t1, t2, t3 = _group(o0, o1, o2, o3, o0, o0, o0, o0, BITS, CH)
    shape: tl.constexpr = (BLOCK_N, D // CH)
    t0 = _opaque(tl.reshape(t0, shape), ASM)
    if CH == 1:
        return t0, t0, t0, t0
    t1 = _opaque(tl.reshape(t1, shape), ASM)
    if CH == 2:
        return t0, t1, t0, t0
    return t0, t1, _opaque(tl.reshape(t2, shape), ASM), _opaque(tl.reshape(t3, shape), ASM)


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _mla_packed_decode_kernel(QL, QR, C32, C16, C8, BT, NC, ACC, ML, OUT,
                              stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_bt, stride_ot, stride_oh,
                              H, sm_scale, page_bytes, vals_at, scales_at,
                              R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr,
                              GRP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                              S: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
                              ROWS_ON_M: tl.constexpr, F16: tl.constexpr, CH: tl.constexpr):
    # As mla._mla_decode_kernel, with each tile's packed words loaded to registers (a tile is
    # a quarter to a half of a bf16 tile's bytes; PREFETCH: 1 or 2 tiles ahead) and widened there,
    # in PTX (ASM) or Triton ops (the interpreter). The scales load once per row and group.
    b = tl.program_id(0)
    hblk = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    per_split = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    DT = tl.float16 if F16 else QL.dtype.element_ty  # the dots' inputs
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    p_ = tl.arange(0, P)
    RC: tl.constexpr = R // CH
    ca0, ca1, ca2, ca3 = _cols(R, BITS, CH)  # the latent's chunks (CH: independent dot chains)
    ql = QL + b * stride_qlt + h[None, :] * stride_qlh
    qr = QR + b * stride_qrt + h[None, :] * stride_qrh
    q0 = tl.load(ql + ca0[:, None], mask=hmask[None, :], other=0.0).to(DT)  # [RC, BLOCK_H]
    q1 = q0
    q2 = q0
    q3 = q0
    if CH >= 2:
        q1 = tl.load(ql + ca1[:, None], mask=hmask[None, :], other=0.0).to(DT)
    if CH == 4:
        q2 = tl.load(ql + ca2[:, None], mask=hmask[None, :], other=0.0).to(DT)
        q3 = tl.load(ql + ca3[:, None], mask=hmask[None, :], other=0.0).to(DT)
    qrt = tl.load(qr + p_[:, None], mask=hmask[None, :], other=0.0).to(DT)
    # (opaque: the chunks' column indices come from joins, which Triton's dot lowering reads
    # as narrower loads, as in _opaque)
    q0 = _opaque(q0, ASM)
    q1 = _opaque(q1, ASM)
    q2 = _opaque(q2, ASM)
    q3 = _opaque(q3, ASM)
    if not ROWS_ON_M:
        q0 = tl.trans(q0)
        q1 = tl.trans(q1)
        q2 = tl.trans(q2)
        q3 = tl.trans(q3)
        qrt = tl.trans(qrt)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, RC], tl.float32)
    acc1 = tl.zeros([BLOCK_H, RC], tl.float32)
    acc2 = tl.zeros([BLOCK_H, RC], tl.float32)
    acc3 = tl.zeros([BLOCK_H, RC], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 below
    bt = BT + b * stride_bt
    pos = lo + tl.arange(0, BLOCK_N)
    blk_next = tl.load(bt + pos // BS, mask=pos < hi, other=0).to(tl.int64)
    if PREFETCH:  # tile lo's words in flight (and lo + BLOCK_N's with PREFETCH 2)
        xl, xr, sl, sr = _raw_tile(C32, C16, C8, blk_next * page_bytes, pos % BS, pos < hi, vals_at, scales_at,
                                   R, P, BITS, GRP)
        pos = pos + BLOCK_N
        blk_next = tl.load(bt + pos // BS, mask=pos < hi, other=0).to(tl.int64)
        if PREFETCH == 2:
            yl, yr, tsl, tsr = _raw_tile(C32, C16, C8, blk_next * page_bytes, pos % BS, pos < hi, vals_at,
                                         scales_at, R, P, BITS, GRP)
            pos = pos + BLOCK_N
            blk_next = tl.load(bt + pos // BS, mask=pos < hi, other=0).to(tl.int64)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        nmask = pos < hi
        if PREFETCH:  # this tile's words arrived during the last PREFETCH; issue those PREFETCH ahead
            cxl, cxr, csl, csr = xl, xr, sl, sr
            nxt = pos + PREFETCH * BLOCK_N
            if PREFETCH == 2:
                xl, xr, sl, sr = yl, yr, tsl, tsr
                yl, yr, tsl, tsr = _raw_tile(C32, C16, C8, blk_next * page_bytes, nxt % BS, nxt < hi, vals_at,
                                             scales_at, R, P, BITS, GRP)
            else:
                xl, xr, sl, sr = _raw_tile(C32, C16, C8, blk_next * page_bytes, nxt % BS, nxt < hi, vals_at,
                                           scales_at, R, P, BITS, GRP)
            blk_next = tl.load(bt + (nxt + BLOCK_N) // BS, mask=nxt + BLOCK_N < hi, other=0).to(tl.int64)
        else:
            blk = blk_next
            blk_next = tl.load(bt + (pos + BLOCK_N) // BS, mask=pos + BLOCK_N < hi, other=0).to(tl.int64)
            cxl, cxr, csl, csr = _raw_tile(C32, C16, C8, blk * page_bytes, pos % BS, nmask, vals_at, scales_at,
                                           R, P, BITS, GRP)
        c0, c1, c2, c3 = _widen(cxl, csl, R, BITS, GRP, BLOCK_N, DT, ASM, CH)
        rope = _widen(cxr, csr, P, BITS, GRP, BLOCK_N, DT, ASM, 1)[0]
        # one dot per chunk, each its own accumulator (an MMA chain CH times shorter), summed
        if ROWS_ON_M:  # scores [BLOCK_N, BLOCK_H], transposed
            st = tl.dot(c0, q0, input_precision=PREC) + tl.dot(rope, qrt, input_precision=PREC)
            if CH >= 2:
                st += tl.dot(c1, q1, input_precision=PREC)
            if CH == 4:
                st += tl.dot(c2, q2, input_precision=PREC) + tl.dot(c3, q3, input_precision=PREC)
            s = tl.trans(st)
        else:
            s = tl.dot(q0, tl.trans(c0), input_precision=PREC) + tl.dot(qrt, tl.trans(rope), input_precision=PREC)
            if CH >= 2:
                s += tl.dot(q1, tl.trans(c1), input_precision=PREC)
            if CH == 4:
                s += (tl.dot(q2, tl.trans(c2), input_precision=PREC)
                      + tl.dot(q3, tl.trans(c3), input_precision=PREC))
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pd = p.to(DT)
        acc0 = tl.dot(pd, c0, acc=acc0 * alpha[:, None], input_precision=PREC)
        if CH >= 2:
            acc1 = tl.dot(pd, c1, acc=acc1 * alpha[:, None], input_precision=PREC)
        if CH == 4:
            acc2 = tl.dot(pd, c2, acc=acc2 * alpha[:, None], input_precision=PREC)
            acc3 = tl.dot(pd, c3, acc=acc3 * alpha[:, None], input_precision=PREC)
        m_i = m_new
    if S == 1:  # the whole sequence in one program: the output, no merge
        o = OUT + b * stride_ot + h[:, None] * stride_oh
        ot = OUT.dtype.element_ty
        tl.store(o + ca0[None, :], (acc0 / l_i[:, None]).to(ot), mask=hmask[:, None])
        if CH >= 2:
            tl.store(o + ca1[None, :], (acc1 / l_i[:, None]).to(ot), mask=hmask[:, None])
        if CH == 4:
            tl.store(o + ca2[None, :], (acc2 / l_i[:, None]).to(ot), mask=hmask[:, None])
            tl.store(o + ca3[None, :], (acc3 / l_i[:, None]).to(ot), mask=hmask[:, None])
    else:
        row = (b * H + h) * S + split
        a = ACC + row[:, None] * R
        tl.store(a + ca0[None, :], acc0, mask=hmask[:, None])
        if CH >= 2:
            tl.store(a + ca1[None, :], acc1, mask=hmask[:, None])
        if CH == 4:
            tl.store(a + ca2[None, :], acc2, mask=hmask[:, None])
            tl.store(a + ca3[None, :], acc3, mask=hmask[:, None])
        tl.store(ML + row * 2, m_i, mask=hmask)
        tl.store(ML + row * 2 + 1, l_i, mask=hmask)


def default_tiles(programs: int, bits: int, splits: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  R: int | None = None) -> tuple[int, int, int, int]:
    """(splits, BLOCK_N, warps, stages) for ``programs`` (sequence, head block) pairs over int8
    (``bits`` 8) or int4 latent pages, each as given unless None: the splits as the bf16
    kernel's (about one wave at two programs per SM, one split from 128 programs on)."""
    if not splits:
        splits = 1 if programs >= 128 else min(64, triton.next_power_of_2(2 * 132 // programs + 1) // 2)
    bn, nw, ns = TILES[bits]
    if bits == 4 and 1 < splits <= 16 and not (R is not None and narrow(R, bits)):
        bn = 64
    return splits, block_n or bn, num_warps or nw, num_stages or ns


def launch_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                  num_computed: torch.Tensor, acc: torch.Tensor, ml: torch.Tensor, out: torch.Tensor, scale: float,
                  block_h: int, splits: int, block_n: int, num_warps: int, num_stages: int,
                  variant: dict | None = None) -> None:
    """The kernel's launch for ``mla.mla_decode`` (which sizes the tiles with ``default_tiles``,
    allocates the output and, for more than one split, the fp32 partials ``acc``/``ml`` and
    merges them): q_lat [B, H, R], q_rope [B, H, P] in the compute dtype; keys
    ``[0, num_computed[b]]``, this step's row already written by ``write_latent``. ``variant``:
    ``VARIANT``'s keys, to time the others (widened by Triton ops under the interpreter, by
    PTX for bf16/fp16 queries on the GPU)."""
    lay = kv_cache.kv_layout
    p = lay.planes[0]
    B, H, R = q_lat.shape
    P = q_rope.shape[2]
    base = NARROW if narrow(R, p.fmt.bits) else VARIANT
    v = {**base[p.fmt.bits], **(variant or {})}
    asm = v.get("asm", not INTERPRET and q_lat.dtype in (torch.bfloat16, torch.float16))
    _mla_packed_decode_kernel[(B, triton.cdiv(H, block_h), splits)](
        q_lat, q_rope, kv_cache.view(torch.int32), kv_cache.view(torch.float16), kv_cache, block_table, num_computed, acc, ml, out,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), H, scale, lay.page_bytes, p.values_at, p.scales_at,
        R=R, P=P, BS=lay.block_size, BITS=p.fmt.bits, GRP=p.fmt.group_for(R + P), BLOCK_H=block_h,
        BLOCK_N=block_n, S=splits, IEEE=q_lat.dtype == torch.float32, ASM=bool(asm),
        PREFETCH=int(v["prefetch"]), ROWS_ON_M=bool(v["rows_on_m"]),
        F16=bool(v["f16"]) and q_lat.dtype != torch.float32, CH=int(v["chunks"]), num_warps=num_warps, num_stages=num_stages)
