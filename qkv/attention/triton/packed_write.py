"""The quantizing write into packed int8/int4 pages, many (token, KV head) rows per program.

``packed._packed_write_kernel`` runs one single-warp program per (token, KV head) row: at a
mixed step's ~8k tokens x 8 KV heads that is 65k programs of 4 values a thread, and the int4
scale search (six candidates, each a correctly rounded division, a floor-based round half to
even and the error tree) issues ~3,000 instructions a thread: 125 us a launch on the H200
against the fp8 write's 8 (issue 16, session 9 profile). This kernel takes ``BLOCK_R`` rows
per program as one [BLOCK_R, D] tile (rotation and groups as tensors over all of them) and
forms each candidate's integers with a reciprocal instead of a division:

  ``rint(x / s)`` = ``rint(RN(x / s))`` (torch's ``(x / s).round()``, s an e5m3 value) from
  ``r = RN(1 / s)`` (once per group): ``t = x * r``, then two steps ``t = fma(fma(-t, s, x), r, t)``.
  The first makes ``t`` faithful (within an ulp of x / s); the second is Markstein's theorem
  (Handbook of Floating-Point Arithmetic, 2nd ed., Thm 4.10: y faithful, r = RN(1/s), the
  remainder x - s*y exact by one fma, then RN(y + r * rem) = RN(x / s)) in the absence of
  underflow; a quotient that small rounds to 0 either way. ``rint`` is round half to even in
  one instruction. So every stored byte equals ``kv_int.quantize``'s (tests/test_triton_packed.py
  checks the bytes, and on the GPU this quotient against torch's division over every bf16
  value and every e5m3 code).

The rest is the reference's arithmetic: the error ``x - q*s`` (q*s is exact: 4 significant
bits each, so an fma gives the same value) squared with one rounding and summed as
``kv_int.tree_sum``'s tree. Under Triton's interpreter (no libdevice, no true fma) the
quotient is a plain division (numpy's: correctly rounded).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from qkv.attention.triton.packed import SCALE_MAX, _e5m3, _mul, _rne, _scale
from qkv.attention.triton.page_rows import page_row


@triton.jit
def _rint_div(x, s, r, EXACT: tl.constexpr):
    """round-half-even(RN(x / s)) for s > 0 and r = RN(1 / s) (module doc)."""
    if EXACT:
        t = x * r
        t = tl.fma(tl.fma(-t, s, x), r, t)
        t = tl.fma(tl.fma(-t, s, x), r, t)
        return libdevice.rint(t)
    else:
        return _rne(x / s)


@triton.jit
def _tree16(e, R: tl.constexpr, NG: tl.constexpr):
    """[R, NG, 16] -> [R, NG]: kv_int.tree_sum's fixed tree (halves added elementwise)."""
    e = tl.sum(tl.reshape(e, (R, NG, 2, 8)), 2)
    e = tl.sum(tl.reshape(e, (R, NG, 2, 4)), 2)
    e = tl.sum(tl.reshape(e, (R, NG, 2, 2)), 2)
    return tl.sum(e, 2)


@triton.jit
def _int4_rows(x, VALS, SC, ok, R: tl.constexpr, D: tl.constexpr, EXACT: tl.constexpr):
    """x [R, D] (fp32) -> int4 bytes at VALS [R] (each row's first byte) and e5m3 codes at SC [R],
    rows ``ok`` only: kv_int._int4_groups' least-squares scale among six codes around absmax / 7."""
    NG: tl.constexpr = D // 16
    xg = tl.reshape(x, (R, NG, 16))
    absmax = tl.max(tl.abs(xg), 2)
    s0 = tl.minimum(tl.math.div_rn(absmax, tl.full(absmax.shape, 7.0, tl.float32)), 61440.0)
    bits = s0.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    c0 = tl.minimum(tl.maximum((bits + 64) >> 7, 0), 247)
    best = tl.full((R, NG), float("inf"), tl.float32)
    best_q = tl.zeros((R, NG, 16), tl.float32)
    best_c = tl.zeros((R, NG), tl.int32)
    for i in tl.static_range(6):  # kv_int.INT4_CANDIDATES: -4 .. 1
        c = tl.minimum(tl.maximum(c0 + (i - 4), 1), 247)
        s = _e5m3(c)
        r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        sb = s[:, :, None]
        q = tl.minimum(tl.maximum(_rint_div(xg, sb, r[:, :, None], EXACT), -8.0), 7.0)
        e = xg - q * sb  # (q * s exact: fused or not, one rounding)
        err = _tree16(_mul(e, e, EXACT), R, NG)
        take = err < best
        best = tl.where(take, err, best)
        best_q = tl.where(take[:, :, None], q, best_q)
        best_c = tl.where(take, c, best_c)
    lo, hi = tl.split(tl.reshape((best_q + 8.0).to(tl.int32), (R, D // 2, 2)))
    tl.store(VALS[:, None] + tl.arange(0, D // 2)[None, :], (lo | (hi << 4)).to(tl.uint8), mask=ok[:, None])
    tl.store(SC[:, None] + tl.arange(0, NG)[None, :], best_c.to(tl.uint8), mask=ok[:, None])


@triton.jit
def _int8_rows(x, VALS, SC16, ok, R: tl.constexpr, D: tl.constexpr, GRP: tl.constexpr):
    """x [R, D] (fp32) -> int8 bytes at VALS [R] and fp16 scales at SC16 [R] (packed._store_int8_x)."""
    NG: tl.constexpr = D // GRP
    xg = tl.reshape(x, (R, NG, GRP))
    s = _scale(tl.max(tl.abs(xg), 2), 127.0, SCALE_MAX)
    sf = s.to(tl.float32)[:, :, None]
    q = tl.where(sf > 0, tl.math.div_rn(xg, tl.where(sf > 0, sf, 1.0) + tl.zeros(xg.shape, tl.float32)), 0.0)
    q = tl.minimum(tl.maximum(_rne(q), -127.0), 127.0)
    tl.store(VALS[:, None] + tl.arange(0, D)[None, :], tl.reshape(q, (R, D)).to(tl.int8).to(tl.uint8, bitcast=True),
             mask=ok[:, None])
    tl.store(SC16[:, None] + tl.arange(0, NG)[None, :], s, mask=ok[:, None])


@triton.jit
def _fwht_rows(x, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr, RSQ: tl.constexpr):
    """x [R, D] (fp32): kv_int.hadamard's butterflies row by row (pairs h apart, sum first,
    difference second, h = 1, 2, 4, ..., each one fp32 rounding), then one multiply by RSQ.
    Each stage is two sums over a size-2 axis of the [R, D/2h, 2, h] view (a + b, and a + (-b)
    = a - b: the negation exact, one rounding), broadcast back: no permute, so the tile keeps
    its load layout (pairs within a thread add in registers, across lanes by one shuffle)."""
    sgn = tl.where(tl.arange(0, 2) == 0, 1.0, -1.0)
    for k in tl.static_range(LOG2D):
        y = tl.reshape(x, (R, D // (2 << k), 2, 1 << k))
        s = tl.sum(y, 2)
        d = tl.sum(y * sgn[None, None, :, None], 2)
        first = (tl.arange(0, 2) == 0)[None, None, :, None]
        x = tl.reshape(tl.where(first, s[:, :, None, :], d[:, :, None, :]), (R, D))
    return x * RSQ


@triton.jit
def _plane_rows(X, t, h, stride_t, stride_h, C8, C16, page, row, ok, vals_at, scales_at,
                R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, GRP: tl.constexpr, ROT: tl.constexpr,
                LOG2D: tl.constexpr, RSQ: tl.constexpr, EXACT: tl.constexpr):
    """One plane (K or V) of rows (token t, head h) -> its pages (byte offset ``page``, row ``row``)."""
    d = tl.arange(0, D)
    x = tl.load(X + (t * stride_t + h * stride_h)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
    if ROT:  # hadamard(x) as kv_pages.write forms it: rotated in fp32, rounded to x's dtype
        x = _fwht_rows(x.to(tl.float32), R, D, LOG2D, RSQ).to(X.dtype.element_ty)
    x = x.to(tl.float32)
    if BITS == 4:
        _int4_rows(x, C8 + page + vals_at + row * (D // 2), C8 + page + scales_at + row * (D // 16), ok, R, D, EXACT)
    else:
        _int8_rows(x, C8 + page + vals_at + row * D, C16 + (page + scales_at) // 2 + row * (D // GRP), ok, R, D, GRP)


@triton.jit
def packed_write_rows_kernel(K, V, C8, C16, SLOT, N, stride_kt, stride_kh, stride_vt, stride_vh, page_bytes,
                             k_vals, k_scales, v_vals, v_scales,
                             KVH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_R: tl.constexpr,
                             K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                             EXACT: tl.constexpr, ROT_K: tl.constexpr, ROT_V: tl.constexpr,
                             LOG2D: tl.constexpr, RSQ: tl.constexpr, HEAD_MAJOR: tl.constexpr = False):
    """Rows i = token * KVH + head of k/v [T, KVH, D], BLOCK_R a program; slot -1 skipped."""
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = i // KVH
    h = i % KVH
    slot = tl.load(SLOT + t, mask=i < N, other=-1)
    ok = slot >= 0
    slot = tl.where(ok, slot, 0)
    page = (slot // BS) * page_bytes
    row = page_row(slot % BS, h, KVH, BS, HEAD_MAJOR)
    _plane_rows(K, t, h, stride_kt, stride_kh, C8, C16, page, row, ok, k_vals, k_scales, BLOCK_R, D, K_BITS, K_GRP,
                ROT_K, LOG2D, RSQ, EXACT)
    _plane_rows(V, t, h, stride_vt, stride_vh, C8, C16, page, row, ok, v_vals, v_scales, BLOCK_R, D, V_BITS, V_GRP,
                ROT_V, LOG2D, RSQ, EXACT)
