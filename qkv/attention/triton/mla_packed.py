"""MLA over int8/int4 latent pages (``kvcache/kv_pages.py``): the quantizing row write and the
absorbed decode kernel, which widens each tile of packed rows in registers (no dequantized
copy of the cache).

A latent row ``[c_KV (R) | k_rope (P)]`` is one plane of ``R + P`` values, unrotated, in groups
of ``gcd(R + P, group)``; for powers of two R > P that group divides both parts, so the row is
handled as two vectors (R and P wide, each a power of two, as Triton's ranges need) whose
bytes and scales sit where the whole row's would: the write stores ``kv_pages.write``'s bytes
and the decode kernel reads them as ``kv_pages.read`` does (``packed._int4_tile``/``_int8_tile``).

Steps with prompt tokens (``mla_step.mla_extend``) up-project their keys' latents anyway: the
prefix rows they need are gathered through ``kv_pages.read`` (dequantized, as the up-projection
consumes them), their decodes run the kernel here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton.packed import INTERPRET, _int4_tile, _int8_tile, _store_int4, _store_int8
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


@triton.jit
def _row_tiles(C32, C8, C16, base, vals_at, scales_at, row, nmask, R: tl.constexpr, P: tl.constexpr,
               BITS: tl.constexpr, GRP: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr):
    """The [BLOCK_N, R] latent and [BLOCK_N, P] rope tiles of the rows at page offsets ``base``."""
    if BITS == 4:
        voff = (base + vals_at) // 4 + row * ((R + P) // 8)
        soff = base + scales_at + row * ((R + P) // 16)
        lat = _int4_tile(C32, C8, voff, soff, nmask, R, BLOCK_N, DT)
        rope = _int4_tile(C32, C8, voff + R // 8, soff + R // 16, nmask, P, BLOCK_N, DT)
    else:
        voff = (base + vals_at) // 4 + row * ((R + P) // 4)
        soff = (base + scales_at) // 2 + row * ((R + P) // GRP)
        lat = _int8_tile(C32, C16, voff, soff, nmask, R, GRP, BLOCK_N, DT)
        rope = _int8_tile(C32, C16, voff + R // 4, soff + R // GRP, nmask, P, GRP, BLOCK_N, DT)
    return lat, rope


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def _mla_packed_decode_kernel(QL, QR, C8, C16, C32, BT, NC, ACC, ML,
                              stride_qlt, stride_qlh, stride_qrt, stride_qrh, stride_bt, H, sm_scale,
                              page_bytes, vals_at, scales_at,
                              R: tl.constexpr, P: tl.constexpr, BS: tl.constexpr, BITS: tl.constexpr,
                              GRP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                              S: tl.constexpr, IEEE: tl.constexpr):
    # As mla._mla_decode_kernel_fp8 (tiles loaded to registers and widened there), every
    # program leaving fp32 partials for _combine_kernel.
    b = tl.program_id(0)
    hblk = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    per_split = tl.cdiv(tl.cdiv(seq_len, S), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    DT = QL.dtype.element_ty
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
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
        lat, rope = _row_tiles(C32, C8, C16, blk * page_bytes, vals_at, scales_at, pos % BS, nmask,
                               R, P, BITS, GRP, BLOCK_N, DT)
        s = (tl.dot(ql, tl.trans(lat), input_precision=PREC)
             + tl.dot(qr, tl.trans(rope), input_precision=PREC))
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), lat, input_precision=PREC).to(tl.float32)
        m_i = m_new
    row = (b * H + h) * S + split
    tl.store(ACC + row[:, None] * R + r[None, :], acc, mask=hmask[:, None])
    tl.store(ML + row * 2, m_i, mask=hmask)
    tl.store(ML + row * 2 + 1, l_i, mask=hmask)


def launch_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                  num_computed: torch.Tensor, acc: torch.Tensor, ml: torch.Tensor, scale: float, block_h: int,
                  splits: int, block_n: int, num_warps: int) -> None:
    """The kernel's launch for ``mla.mla_decode`` (which sizes the tiles, allocates the fp32
    partials ``acc``/``ml`` and merges them): q_lat [B, H, R], q_rope [B, H, P] in the compute
    dtype; keys ``[0, num_computed[b]]``, this step's row already written by ``write_latent``."""
    lay = kv_cache.kv_layout
    p = lay.planes[0]
    B, H, R = q_lat.shape
    P = q_rope.shape[2]
    _mla_packed_decode_kernel[(B, triton.cdiv(H, block_h), splits)](
        q_lat, q_rope, kv_cache, kv_cache.view(torch.float16), kv_cache.view(torch.int32), block_table,
        num_computed, acc, ml, q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        block_table.stride(0), H, scale, lay.page_bytes, p.values_at, p.scales_at,
        R=R, P=P, BS=lay.block_size, BITS=p.fmt.bits, GRP=p.fmt.group_for(R + P), BLOCK_H=block_h,
        BLOCK_N=block_n, S=splits, IEEE=q_lat.dtype == torch.float32, num_warps=num_warps)
