"""Triton kernels over packed int8/int4 KV pages (kvcache/kv_pages.py): the quantizing write
and split-K decode attention that reads the packed bytes and their scales straight from the
pages (no dequantized copy of the cache: each tile is widened in registers).

int4 tiles load as 32-bit words and unpack with shifts into natural column order (one dot
per tile for K and one for V); each key's e5m3 codes load once and broadcast over its groups.

The write rounds exactly as ``kv_int.quantize`` does (correctly rounded divisions, products and
differences, round half to even, the fixed-tree error sum of the int4 scale search), so a key
stored by a decode step and one stored by the reference prefill path are the same bytes: prefix
hits and chunk sizes cannot change a score.

For bf16/fp16 queries on the GPU ``packed_decode`` runs ``packed_fast``'s kernel (tiles widened
in PTX, in halves, keys on the MMA's M dimension); this file's decode kernel serves fp32 queries
and Triton's interpreter.

Prefill and mixed steps run ``packed_prefill``'s kernel over the same pages (its one-token rows
this file's decode); they are not captured in CUDA graphs.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from qkv.attention.triton.decode import _combine_kernel, _scores, num_splits
from qkv.attention.triton.packed_fast import _fwht, fast_decode_kernel
from qkv.attention.triton.page_rows import page_row
from qkv.kvcache.kv_int import SCALE_MAX as _SCALE_MAX, hadamard

SCALE_MAX = tl.constexpr(_SCALE_MAX)  # a global a kernel reads must be a constexpr
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# int4 V read as 32-bit words into halves (3): 152.5 us against 180.7 as bytes at batch 32 x 8k (H200,
# session 7 round 2, 16-key tiles, 8 splits, fused); V_WORDS 0 keeps the bytes. 4 (eight dots of M = D/8,
# one per nibble position; D >= 128, else 3) with ONE_PAGE and K_WORDS, H200 session 14, launch order on:
# 384 rows x 1-2k keys 262.0 us against 286.0 (3 alone), 32 x 8k 136.4 against 152.1.
# 5 (V's words loaded keys-fastest, no transpose), H200, session 18, one call: over head-major pages
# (kv_pages.HEAD_MAJOR_BY_BITS, int4's default) 32 x 8k 112.3 us against 124.0, 384 rows x 1-2k keys
# 219 against 230; over token-major pages 136.2 against 135.8 and 250 against 256.
V_WORDS = 5
# (keys per tile, warps, stages) by the narrower plane's bits: single-warp programs (no
# cross-warp softmax reduction) with 16 splits were fastest at batch 32 x 8k on the H200:
# int4 184.5 us with 16-key tiles (220.6 with 128 keys and 4 warps), int8 275.6 us with 32.
# int4 3 stages with ONE_PAGE 2 (the entries a tile ahead let the pipeliner keep 2 tiles in flight;
# H200, session 15, in the same call: 32 x 8k 134.0 us against 136.0; 384 rows x 1-2k keys 255.9
# against 262.3; 1000/1000 run 12,882 out tok/s against 12,822).
FAST_TILING = {4: (16, 1, 3), 8: (16, 1, 2)}  # int8 16-key tiles: 233.2 us against 235.3 with 32 (session 7)
# Many (sequence, KV head) rows (one split each, e.g. the 1000 in / 1000 out run's 384 x 8): int4
# 32-key tiles, 361.2 us against 425.2 with 16 at 384 rows x 1-2k keys (224.2 / 246.6 at 1,070 keys;
# 8 rows of 16-key tiles were 162.6 / 151.6 at 32 x 8k, where 16 stay; H200, session 8). 3 stages
# were faster alone (275.0 us against 285.3, longest first) but slower in the engine's decode steps
# (41.77 and 41.83 s against 41.19 over the run's 1,953; session 13) with ONE_PAGE 1; with ONE_PAGE 2
# they are faster in both (decode steps 38.17 s against 38.47 for ONE_PAGE 1 at 2; session 15).
MANY_ROWS = 1024
# int8 32-key tiles with ONE_PAGE 2 (H200, session 15, same call, longest first): 384 rows x 1-2k keys
# 455 us against 600 (16-key tiles, ONE_PAGE 0) and 485 (32-key, 0); 1000/1000 run with 32-key tiles
# (ONE_PAGE 0) 10,525 out tok/s against 10,053.
FAST_TILING_MANY_ROWS = {4: (32, 1, 3), 8: (32, 1, 2)}
# By the narrower plane's bits (bf16 queries). int8: words, one fma a value (packed_fast.I8WF_ASM_BF16):
# 233.2 us against 276.7 (batch 32 x 8k, H200, session 7). int4: one fma a value pair (with V as bytes
# it was slower: 198.7 us against 183.4, 144 registers).
FUSED = {4: True, 8: True}  # int4 with V as words: 152.5 us fused, 155.2 not (round 2)
MAXNREG = None  # registers per thread, capped (None: the compiler's choice)
# > 0: the running max moves only when a tile's exceeds it by more than LAZY (log2 units); by bits
# as FUSED. int8: 272.0 us against 276.7 without (session 7); int4 (V as words): 174.5 against 171.1.
LAZY = {4: 0, 8: 8}
# The quantizing write rotates each row in registers (one kernel) instead of kv_int.hadamard's ~20
# torch ops over the step's K and V first (issue 16, session 9).
WRITE_ROT_IN_KERNEL = True
# The write's launch by its (token, KV head) row count: the first (at least this many rows,
# rows a program, warps) that applies. Rows > 0 run packed_write's kernel (a reciprocal-based
# int4 search and permute-free butterflies: 158 SASS instructions a value at 16 rows and 4
# warps against 383 here, sm_90 build; issue 16, session 9); rows 0 this file's one-row programs.
# Picked on the H200 (session 11, every tiling's bytes equal to the one-row kernel's): 65,600 rows
# (8,200 tokens x 8 heads) 8 rows x 4 warps 99.2 us against one-row 216.9 (fp8's write 32.5);
# 3,072 rows 2 x 1 29.6 us against 31.9 (fp8 27.9).
WRITE_TILES = ((34336, 8, 4), (0, 2, 1))
ROT_IN_KERNEL = True  # the fast kernel rotates the query and the output (rotated planes) in registers
# At least this many splits (fast kernel, long or unknown contexts; by bits): many rows of 1-2k
# keys leave single-split programs unevenly long (benchmarks/kv_int_engine_shape_bench.py).
MIN_SPLITS = {4: 1, 8: 1}
# Keys on M, not LAZY (issue 16, session 8): L_DEFER the softmax denominators as per-element partial
# sums, reduced across lanes once after the loop instead of once a tile.
L_DEFER = {4: False, 8: False}
# Fast kernel, keys on M, no window (issue 16, session 9): tiles aligned to pages (BLOCK_N divides the
# block size or is twice it) read their block-table entries as scalars (1), loaded a tile ahead (2).
# H200, session 14 (V_WORDS 3, no K_WORDS): 384 rows x 1-2k keys 284.2 us against 284.2; 32 x 8k 145.1
# against 151.9. Ahead (2, with K_WORDS): 269.1 against 282.1 for 1. By bits as FUSED (int8 untimed).
# int4 2 with 3 stages (FAST_TILING), session 15, same call: 384 rows x 1-2k keys 253.6 us (2 stages),
# 255.9 (3) against 262.3 for 1; 32 x 8k 133.9 / 134.0 against 136.0. The engine ran the 3-stage one.
# int8 2 (session 15): 32 x 8k 16-key tiles 225 us for 1 (2 stages), 229 for 2 (3 stages), 239 for 0;
# the many-row tiling above.
ONE_PAGE = {4: 2, 8: 2}
# int4 K loaded as words and scored as eight dots of depth D/8, one per nibble position (D >= 128;
# keys on M, not LAZY): no byte is split out of the words and no join repacks the widened values.
# H200, session 14, with ONE_PAGE 1: 282.1 us against 284.2; 32 x 8k 144.4 against 145.1.
K_WORDS = 1


@triton.jit
def _rne(x):
    """Round half to even (torch.round), in fp32: exact for |x| < 2^22."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _scale(absmax, QMAX: tl.constexpr, SMAX: tl.constexpr):
    """A group's fp16 scale from its absmax [NG], as kv_int.quantize."""
    return tl.minimum(tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32)), SMAX).to(tl.float16)


@triton.jit
def _quant(x, s, QMAX: tl.constexpr):
    """x [NG, W] over its groups' scales s [NG] -> the integers, in fp32."""
    sf = s.to(tl.float32)[:, None]
    q = tl.where(sf > 0, tl.math.div_rn(x, tl.where(sf > 0, sf, 1.0) + tl.zeros(x.shape, tl.float32)), 0.0)
    return tl.minimum(tl.maximum(_rne(q), -QMAX), QMAX)


@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    """a * b rounded once (mul.rn: never fused into an fma, as torch's separate ops are not).
    Triton's interpreter has no libdevice; its numpy ops are the same single roundings."""
    if EXACT:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _sub(a, b, EXACT: tl.constexpr):
    if EXACT:
        return libdevice.sub_rn(a, b)
    else:
        return a - b


@triton.jit
def _tree16(e, NG: tl.constexpr):
    """[NG, 16] -> [NG]: kv_int.tree_sum's fixed tree (halves added elementwise)."""
    e = tl.sum(tl.reshape(e, (NG, 2, 8)), 1)
    e = tl.sum(tl.reshape(e, (NG, 2, 4)), 1)
    e = tl.sum(tl.reshape(e, (NG, 2, 2)), 1)
    return tl.sum(e, 1)


@triton.jit
def _e5m3(c):
    """e5m3 codes (int32) -> their values in fp32 (the fp16 of bits ``c << 7``)."""
    return (c << 7).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _store_int4(X, VALS, SC, D: tl.constexpr, EXACT: tl.constexpr):
    """One vector of D elements at X -> int4 bytes at VALS and e5m3 codes at SC: the
    least-squares scale among six codes around absmax / 7, as kv_int._int4_groups."""
    _store_int4_x(tl.load(X + tl.arange(0, D)).to(tl.float32), VALS, SC, D, EXACT)


@triton.jit
def _store_int4_x(x, VALS, SC, D: tl.constexpr, EXACT: tl.constexpr):
    """``_store_int4`` of a vector x [D] already loaded (fp32)."""
    NG: tl.constexpr = D // 16
    HALF: tl.constexpr = D // 2
    x = tl.reshape(x, (NG, 16))
    absmax = tl.max(tl.abs(x), 1)
    s0 = tl.minimum(tl.math.div_rn(absmax, tl.full(absmax.shape, 7.0, tl.float32)), 61440.0)
    bits = s0.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    c0 = tl.minimum(tl.maximum((bits + 64) >> 7, 0), 247)
    best = tl.full((NG,), float("inf"), tl.float32)
    best_q = tl.zeros((NG, 16), tl.float32)
    best_c = tl.zeros((NG,), tl.int32)
    for i in tl.static_range(6):  # kv_int.INT4_CANDIDATES: -4 .. 1
        c = tl.minimum(tl.maximum(c0 + (i - 4), 1), 247)
        sb = _e5m3(c)[:, None] + tl.zeros((NG, 16), tl.float32)
        q = tl.minimum(tl.maximum(_rne(tl.math.div_rn(x, sb)), -8.0), 7.0)
        e = _sub(x, _mul(q, sb, EXACT), EXACT)
        err = _tree16(_mul(e, e, EXACT), NG)
        take = err < best
        best = tl.where(take, err, best)
        best_q = tl.where(take[:, None], q, best_q)
        best_c = tl.where(take, c, best_c)
    lo, hi = tl.split(tl.reshape((best_q + 8.0).to(tl.int32), (HALF, 2)))
    tl.store(VALS + tl.arange(0, HALF), (lo | (hi << 4)).to(tl.uint8))
    tl.store(SC + tl.arange(0, NG), best_c.to(tl.uint8))


@triton.jit
def _store_int8(X, VALS, SC16, D: tl.constexpr, GRP: tl.constexpr):
    """One vector of D elements at X -> int8 bytes at VALS and fp16 scales at SC16."""
    _store_int8_x(tl.load(X + tl.arange(0, D)).to(tl.float32), VALS, SC16, D, GRP)


@triton.jit
def _store_int8_x(x, VALS, SC16, D: tl.constexpr, GRP: tl.constexpr):
    """``_store_int8`` of a vector x [D] already loaded (fp32)."""
    NG: tl.constexpr = D // GRP
    d = tl.arange(0, D)
    xg = tl.reshape(x, (NG, GRP))
    s = _scale(tl.max(tl.abs(xg), 1), 127.0, SCALE_MAX)
    q = _quant(xg, s, 127.0)
    tl.store(VALS + d, tl.reshape(q, (D,)).to(tl.int8).to(tl.uint8, bitcast=True))
    tl.store(SC16 + tl.arange(0, NG), s)


@triton.jit
def _fwht_row(x, D: tl.constexpr, LOG2D: tl.constexpr, RSQ: tl.constexpr):
    """x [D] (fp32) -> kv_int.hadamard's result in fp32: the same butterflies in the same order
    (pairs h apart, sum first, difference second, h = 1, 2, 4, ...), each one fp32 rounding, then
    one multiply by RSQ = D ** -0.5 rounded to fp32 (torch's scalar), so equal bit for bit."""
    for k in tl.static_range(LOG2D):
        y = tl.permute(tl.reshape(x, (D // (2 << k), 2, 1 << k)), (0, 2, 1))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (D,))
    return x * RSQ


@triton.jit
def _row(X, D: tl.constexpr, ROT: tl.constexpr, LOG2D: tl.constexpr, RSQ: tl.constexpr):
    """The vector a plane stores, in fp32: X's row, or with ROT ``hadamard(x)`` as kv_pages.write
    forms it (rotated in fp32, rounded to x's dtype), so the bytes equal the reference's."""
    x = tl.load(X + tl.arange(0, D))
    if ROT:
        x = _fwht_row(x.to(tl.float32), D, LOG2D, RSQ).to(X.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _packed_write_kernel(K, V, C8, C16, SLOT, stride_kt, stride_kh, stride_vt, stride_vh, page_bytes,
                         k_vals, k_scales, v_vals, v_scales,
                         KVH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                         EXACT: tl.constexpr, ROT_K: tl.constexpr = False, ROT_V: tl.constexpr = False,
                         LOG2D: tl.constexpr = 7, RSQ: tl.constexpr = 1.0, HEAD_MAJOR: tl.constexpr = False):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        page = (slot // BS) * page_bytes
        row = page_row(slot % BS, h, KVH, BS, HEAD_MAJOR)
        x = _row(K + t * stride_kt + h * stride_kh, D, ROT_K, LOG2D, RSQ)
        if K_BITS == 4:
            _store_int4_x(x, C8 + page + k_vals + row * (D // 2), C8 + page + k_scales + row * (D // 16), D, EXACT)
        else:
            _store_int8_x(x, C8 + page + k_vals + row * D, C16 + (page + k_scales) // 2 + row * (D // K_GRP), D, K_GRP)
        x = _row(V + t * stride_vt + h * stride_vh, D, ROT_V, LOG2D, RSQ)
        if V_BITS == 4:
            _store_int4_x(x, C8 + page + v_vals + row * (D // 2), C8 + page + v_scales + row * (D // 16), D, EXACT)
        else:
            _store_int8_x(x, C8 + page + v_vals + row * D, C16 + (page + v_scales) // 2 + row * (D // V_GRP), D, V_GRP)


def _layout_args(kv_cache: torch.Tensor):
    lay = kv_cache.kv_layout
    kp, vp = lay.planes
    if lay.page_bytes % 4 or kp.values_at % 4 or vp.values_at % 4:
        raise NotImplementedError(f"the Triton packed kernels read pages as 32-bit words: page of "
                                  f"{lay.page_bytes} B, planes at {kp.values_at}/{vp.values_at}")
    for p in (kp, vp):
        if not p.fmt.is_int:
            raise NotImplementedError(f"the Triton packed kernels read int8/int4 planes only, not {p.fmt.name}")
    return lay, kp, vp


def write_packed(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                 rot_in_kernel: bool | None = None, rows: int | None = None, num_warps: int | None = None) -> None:
    """k/v [T, KVH, D] -> quantized into the packed pages; slot -1 rows are skipped in the kernel.
    Rotated planes: ``rot_in_kernel`` (default ``WRITE_ROT_IN_KERNEL``) rotates each row in the
    kernel's registers, else ``kv_int.hadamard`` runs first in torch (the same bytes). ``rows``
    (default by ``WRITE_TILES``): rows a program of ``packed_write``'s kernel (0: one-row programs
    here), ``num_warps`` its warps; all store the same bytes."""
    T, kvh, D = k.shape
    if T == 0:
        return
    lay, kp, vp = _layout_args(kv_cache)
    rot = WRITE_ROT_IN_KERNEL if rot_in_kernel is None else rot_in_kernel
    rot_k, rot_v = kp.rotated and rot, vp.rotated and rot
    if kp.rotated and not rot_k:  # (torch, row by row: the bytes equal kv_pages.write's)
        k = hadamard(k)
    if vp.rotated and not rot_v:
        v = hadamard(v)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    n = T * kvh
    tile = next((t for t in WRITE_TILES if n >= t[0]), (0, 0, 1))
    rows = tile[1] if rows is None else rows
    if rows:
        from qkv.attention.triton.packed_write import packed_write_rows_kernel

        packed_write_rows_kernel[(triton.cdiv(n, rows),)](
            k, v, kv_cache, kv_cache.view(torch.float16), slot_mapping, n, k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), lay.page_bytes, kp.values_at, kp.scales_at, vp.values_at, vp.scales_at,
            KVH=kvh, D=D, BS=lay.block_size, BLOCK_R=rows, K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D),
            V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D), EXACT=not INTERPRET, ROT_K=rot_k, ROT_V=rot_v,
            LOG2D=D.bit_length() - 1, RSQ=float(D ** -0.5), HEAD_MAJOR=lay.head_major,
            num_warps=num_warps or tile[2] or 4)
        return
    _packed_write_kernel[(T, kvh)](
        k, v, kv_cache, kv_cache.view(torch.float16), slot_mapping, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), lay.page_bytes, kp.values_at, kp.scales_at, vp.values_at, vp.scales_at,
        KVH=kvh, D=D, BS=lay.block_size, K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D),
        V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D), EXACT=not INTERPRET, ROT_K=rot_k, ROT_V=rot_v,
        LOG2D=D.bit_length() - 1, RSQ=float(D ** -0.5), HEAD_MAJOR=lay.head_major, num_warps=1)


@triton.jit
def _int4_tile(C32, C8, voff, soff, nmask, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr):
    """[BLOCK_N, D] of an int4 plane in natural column order, dequantized to DT. ``voff``: int32
    word offset of each key's packed row, ``soff``: byte offset of its e5m3 codes. Rows load as
    words (16-byte vectors where aligned); word j holds elements 8j..8j+7, element 8j+t in bits
    4t..4t+3, so the nibbles come out with shifts on a [BLOCK_N, D/8, 8] tile. The e5m3 codes
    (one per two words) load once per key. n * s is exact in bf16/fp16 (4 significant bits
    each), so the product is formed in DT: the reference's fp32 product, cast."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    w = tl.load(C32 + voff[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    c = tl.load(C8 + soff[:, None] + tl.arange(0, NG)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
    s = (c << 7).to(tl.int16).to(tl.float16, bitcast=True).to(DT)
    sw = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
    sh = tl.arange(0, 8) * 4
    nib = ((w[:, :, None] >> sh[None, None, :]) & 15) - 8
    return tl.reshape(nib.to(DT) * sw[:, :, None], (BLOCK_N, D))


@triton.jit
def _int8_tile(C32, C16, voff, soff, nmask, D: tl.constexpr, GRP: tl.constexpr, BLOCK_N: tl.constexpr,
               DT: tl.constexpr):
    """[BLOCK_N, D] of an int8 plane, dequantized (in fp32, then DT: as the reference).
    ``voff``: int32 word offset of each key's row, ``soff``: fp16 offset of its scales."""
    W: tl.constexpr = D // 4
    NG: tl.constexpr = D // GRP
    w = tl.load(C32 + voff[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    s = tl.load(C16 + soff[:, None] + tl.arange(0, NG)[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    sw = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, GRP // 4)), (BLOCK_N, W))
    sh = 24 - tl.arange(0, 4) * 8
    b = (w[:, :, None] << sh[None, None, :]) >> 24  # byte t, sign-extended (arithmetic shift)
    return tl.reshape(b.to(tl.float32) * sw[:, :, None], (BLOCK_N, D)).to(DT)


@triton.jit
def _tile(C32, C8, C16, base, vals_at, scales_at, row, nmask, BITS: tl.constexpr, GRP: tl.constexpr,
          D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr):
    """The [BLOCK_N, D] tile of one plane (K or V) for keys at page offsets ``base``, rows ``row``."""
    if BITS == 4:
        voff = tl.multiple_of((base + vals_at) // 4 + row * (D // 8), ALIGN)
        return _int4_tile(C32, C8, voff, base + scales_at + row * (D // 16), nmask, D, BLOCK_N, DT)
    else:
        voff = tl.multiple_of((base + vals_at) // 4 + row * (D // 4), ALIGN)
        return _int8_tile(C32, C16, voff, (base + scales_at) // 2 + row * (D // GRP), nmask, D, GRP, BLOCK_N, DT)


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _packed_decode_kernel(Q, C8, C16, C32, BT, NC, QSL, ACC, ML, OUT,
                          stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, page_bytes,
                          k_vals, k_scales, v_vals, v_scales, sm_scale, softcap, window, ring,
                          KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                          K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                          ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, HEAD_MAJOR: tl.constexpr = False):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
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

    g = tl.arange(0, G_PAD)
    gmask = g < G
    heads = kvh * G + g
    d = tl.arange(0, D)
    q = tl.load(Q + qrow * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        nmask = pos < hi
        pg = pos // BS
        if HAS_RING:
            pg = pg % ring
        blk = tl.load(BT + b * stride_bt + pg, mask=nmask, other=0).to(tl.int64)
        row = page_row(pos % BS, kvh, KVH, BS, HEAD_MAJOR)  # the token's row of this head in its page's planes
        base = blk * page_bytes
        k = _tile(C32, C8, C16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(C32, C8, C16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N, ALIGN, DT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v, input_precision=PREC)
        m_i = m_new
    if S == 1:
        ob = OUT + qrow * stride_ot + heads[:, None] * stride_oh
        tl.store(ob + d[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
    else:
        rowc = (b * KVH * G + heads) * S + split
        tl.store(ACC + rowc[:, None] * D + d[None, :], acc, mask=gmask[:, None])
        tl.store(ML + rowc * 2, m_i, mask=gmask)
        tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)


def launch_shape(B: int, kvh: int, D: int, nbits: int, max_seq_len: int | None, fast: bool,
                 block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                 splits: int | None = None) -> tuple[int, int, int, int]:
    """(keys per tile, warps, stages, splits) of a packed decode launch over B sequences of
    ``kvh`` KV heads (``nbits``: the narrower plane's), where the arguments leave them open.
    Each distinct result is a compiled kernel variant: engine/gpu.py ``warm_kernels`` compiles
    every one a run can pick (tests/test_warm_start.py checks it against this function)."""
    tiling = FAST_TILING[nbits] if fast else (64, 4, 3)
    if fast and B * kvh >= MANY_ROWS and nbits in FAST_TILING_MANY_ROWS:
        tiling = FAST_TILING_MANY_ROWS[nbits]
    if fast and D > 128:  # wider rows: 16-key tiles keep a single warp's registers from spilling (sm_90)
        tiling = (16,) + tiling[1:]
    block_n, num_warps, num_stages = block_n or tiling[0], num_warps or tiling[1], num_stages or tiling[2]
    # Splits to fill the SMs about twice over with programs of num_warps warps (counted as
    # 4-warp programs on 132 SMs: 1 warp, 8x the programs; batch 32 x 8 KV heads: 16 splits).
    # (int4: 8 splits at batch 32 x 8 KV heads, 152.5 us against 156.1 with 16, round 2)
    S = splits or num_splits(B, kvh, max_seq_len, block_n,
                             num_sms=132 * (4 if fast and nbits == 4 else 8) // num_warps)
    if not splits and fast and (max_seq_len is None or max_seq_len >= 16 * block_n):
        S = max(S, MIN_SPLITS[nbits])
    return block_n, num_warps, num_stages, S


def packed_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, num_computed: torch.Tensor,
                  scale: float, window: int | None = None, ring: int | None = None, softcap: float | None = None,
                  max_seq_len: int | None = None, query_start_loc: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, splits: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, fast: bool | None = None,
                  v_words: int | None = None, fused: bool | None = None, maxnreg: int | None = None,
                  lazy: int | None = None, l_defer: bool | None = None,
                  one_page: int | None = None, k_words: int | None = None, rotate: bool = True,
                  order: torch.Tensor | None = None) -> torch.Tensor:
    """``decode.paged_decode`` over packed pages: q [T, H, D]; sequence b's query is row
    ``query_start_loc[b]`` and sees keys ``[0, num_computed[b]]`` (this step's already written,
    by ``write_packed``). Returns ``out`` [T, H, D] in q's dtype.

    ``fast`` (default: bf16/fp16 queries on the GPU) runs ``packed_fast``'s kernel (keys on the
    MMA's M dimension, tiles widened in PTX), ``v_words`` (int4 V) its V tiles read as 32-bit
    words (1: in natural column order, 2: in the asm's register order; 0: as halves; 3: as words
    into halves; 4: eight dots, one per nibble position; 5: those dots over words loaded
    keys-fastest, no transpose), ``fused`` (int4, bf16 queries) one fma per widened value pair,
    ``lazy`` moves the running max only when a tile's exceeds it by more than ``lazy`` (log2
    units), ``l_defer`` sums the softmax denominators across lanes once, after the loop,
    ``one_page`` reads page-aligned tiles' block-table entries as scalars (2: a tile ahead),
    ``k_words`` scores int4 K as eight dots, one per nibble position, ``maxnreg`` caps the
    fast kernel's registers per thread (more programs per SM); all variants give the reference's values
    (tests/test_triton_packed.py). ``rotate=False``: q is already rotated (for rotated K) and
    ``out`` is left in the rotated space (for rotated V), for a caller that rotates it
    (packed_prefill's mixed steps). ``order`` (order.longest_first): the fast kernel's program b
    takes sequence order[b] (the same values, another start order)."""
    lay, kp, vp = _layout_args(kv_cache)
    B = num_computed.shape[0]
    _, H, D = q.shape
    kvh = kp.rows
    if D & (D - 1) or D < 32:
        raise NotImplementedError(f"the packed decode kernel needs a power-of-two head_dim >= 32, got {D}")
    G = H // kvh
    half = q.dtype in (torch.bfloat16, torch.float16)
    fast = (half and not INTERPRET) if fast is None else fast and (half or INTERPRET)
    v_words = int(fast and vp.fmt.bits == 4 and (V_WORDS if v_words is None else v_words))
    if v_words >= 4 and D < 128:  # (dots of M = D/8 >= 16 rows)
        v_words = 3
    nbits = min(kp.fmt.bits, vp.fmt.bits)
    fused = bool(FUSED[nbits] if fused is None else fused)
    # (the lazy rescale: V in halves or by nibble positions)
    lazy = int((LAZY[nbits] if lazy is None else lazy) or 0) if fast and v_words in (0, 3, 4, 5) else 0
    maxnreg = MAXNREG if maxnreg is None else maxnreg
    l_defer = bool(L_DEFER[nbits] if l_defer is None else l_defer) if fast and (not lazy or v_words >= 4) else False
    block_n, num_warps, num_stages, S = launch_shape(B, kvh, D, nbits, max_seq_len, fast, block_n, num_warps,
                                                     num_stages, splits)
    one_page = int((ONE_PAGE[nbits] if one_page is None else one_page) or 0) if (
        fast and window is None and (lay.block_size % block_n == 0 or block_n == 2 * lay.block_size)) else 0
    # (int4 K as eight dots of depth D/8: D >= 128)
    k_words = int((K_WORDS if k_words is None else k_words) or 0) if (
        fast and kp.fmt.bits == 4 and D >= 128) else 0
    G_PAD = max(8 if fast else 16, triton.next_power_of_2(G))  # (the fast kernel's heads are the MMA's N)
    rows = B * kvh * G * S if S > 1 else 1
    acc = torch.empty((rows, D), dtype=torch.float32, device=q.device)
    ml = torch.empty((rows, 2), dtype=torch.float32, device=q.device)
    if query_start_loc is None:
        query_start_loc = torch.arange(B + 1, device=q.device)
    # Rotated planes (kv_pages): the rotated query scores the rotated keys and the output is
    # rotated back; the fast kernel rotates both in registers (with splits, the merge rotates the
    # output), the others by a GEMM each here.
    rot_q = bool(fast and kp.rotated and rotate and ROT_IN_KERNEL)
    rot_o = bool(fast and vp.rotated and rotate and v_words in (0, 3, 4, 5) and ROT_IN_KERNEL)
    if kp.rotated and rotate and not rot_q:
        q = _rotate(q)
    if out is None or (vp.rotated and rotate and not rot_o):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Word offsets are multiples of ALIGN (<= 4 words: 16-byte vector loads) on every page.
    words = D * min(kp.fmt.bits, vp.fmt.bits) // 32  # the narrower plane's words per row
    align = math.gcd(lay.page_bytes // 4, kp.values_at // 4, vp.values_at // 4, words, 4)
    common = (block_table, num_computed, query_start_loc, acc, ml, out,
              q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1), lay.page_bytes,
              kp.values_at, kp.scales_at, vp.values_at, vp.scales_at, scale, softcap or 0.0, window or 0, ring or 1)
    consts = dict(KVH=kvh, G=G, G_PAD=G_PAD, D=D, BS=lay.block_size, BLOCK_N=block_n, S=S,
                  K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D), V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D),
                  ALIGN=align, HAS_WINDOW=window is not None, HAS_RING=ring is not None,
                  HAS_SOFTCAP=softcap is not None, IEEE=q.dtype == torch.float32, HEAD_MAJOR=lay.head_major,
                  num_warps=num_warps,
                  num_stages=num_stages)
    if fast:
        fast_decode_kernel[(B, kvh, S)](q, kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int32),
                                        *common, ASM=0 if INTERPRET else 2 if fused else 1,
                                        V_WORDS=v_words, LAZY=lazy,
                                        ROT_Q=rot_q, ROT_O=rot_o, LOG2D=D.bit_length() - 1,
                                        L_DEFER=l_defer, ONE_PAGE=one_page, K_WORDS=k_words,
                                        ORDER=order, HAS_ORDER=order is not None,
                                        **consts, **({"maxnreg": maxnreg} if maxnreg else {}))
    else:
        _packed_decode_kernel[(B, kvh, S)](q, kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int32),
                                           *common, **consts)
    if S > 1 and rot_o:
        _combine_rot_kernel[(B, H)](acc, ml, out, query_start_loc, out.stride(0), out.stride(1), H, D=D, S=S,
                                    S_PAD=triton.next_power_of_2(S), LOG2D=D.bit_length() - 1, num_warps=4)
    elif S > 1:
        _combine_kernel[(B, H)](acc, ml, out, query_start_loc, out.stride(0), out.stride(1), H, D=D, D_PAD=D,
                                S=S, S_PAD=triton.next_power_of_2(S), num_warps=4)
    return _rotate(out) if vp.rotated and rotate and not rot_o else out


@triton.jit
def _combine_rot_kernel(ACC, ML, OUT, QSL, stride_ot, stride_oh, H, D: tl.constexpr, S: tl.constexpr,
                        S_PAD: tl.constexpr, LOG2D: tl.constexpr):
    """decode._combine_kernel's merge of the splits' partial states, rotated back (V stored
    rotated) in fp32 before the one rounding to the output's dtype."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    qrow = tl.load(QSL + b)
    if tl.load(QSL + b + 1) - qrow != 1:
        return
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    smask = s < S
    row = (b * H + h) * S + s
    m = tl.load(ML + row * 2, mask=smask, other=float("-inf"))
    l = tl.load(ML + row * 2 + 1, mask=smask, other=0.0)
    w = tl.where(m > float("-inf"), tl.exp2(m - tl.max(m, 0)), 0.0)
    acc = tl.load(ACC + row[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    out = tl.reshape(_fwht(tl.reshape(out, (1, D)), 1, D, LOG2D), (D,))
    tl.store(OUT + qrow * stride_ot + h * stride_oh + d, out.to(OUT.dtype.element_ty))


_H: dict = {}


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """``kv_int.hadamard`` as one fp32 GEMM (a query or an output: no stored byte depends on it)."""
    D = x.shape[-1]
    key = (D, x.device)
    if key not in _H:
        _H[key] = hadamard(torch.eye(D, device=x.device))
    return (x.float() @ _H[key]).to(x.dtype)


def check_supported(packed, specs) -> None:
    """Refuse, by name, a packed cache these kernels cannot read (ValueError naming kv_dtype)."""
    if not (packed.k.is_int and packed.v.is_int):
        raise ValueError(f"kv_dtype {packed.label}: the Triton backend reads int8/int4 pages only "
                         f"(a float plane beside an integer one needs attention_backend='reference')")
    for s in specs:
        if s.kind == "mla":  # mla_packed's kernels, or the reference where they do not apply
            continue
        if getattr(s, "dilation", 1) > 1:
            raise ValueError(f"kv_dtype {packed.label}: the packed decode kernel has no dilated windows; "
                             f"use attention_backend='reference' or a float kv_dtype")
        if s.head_dim & (s.head_dim - 1) or s.head_dim < 32:
            raise ValueError(f"kv_dtype {packed.label}: the packed decode kernel needs a power-of-two "
                             f"head_dim >= 32, got {s.head_dim}")
