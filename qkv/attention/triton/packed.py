"""Triton kernels over packed int8/int4 KV pages (kvcache/kv_pages.py): the quantizing write
and split-K decode attention that reads the packed bytes and their scales straight from the
pages (no dequantized copy of the cache: each tile is widened in registers).

int4 tiles stay split in even and odd head-dim columns (a byte's low and high nibble): the
query is loaded the same way and ``q.k = q_even.k_lo + q_odd.k_hi``, and V's even and odd
output columns accumulate apart and are stored interleaved. Nothing is shuffled in registers.

The write rounds exactly as ``kv_int.quantize`` does (correctly rounded divisions, round half
to even, the fp16 scale), so a key stored by a decode step and one stored by the reference
prefill path are the same bytes: prefix hits and chunk sizes cannot change a score.

Prefill and mixed steps run ``reference.packed_attention`` (torch on the device; it gathers the
visible keys of the step's sequences, dequantized) and are not captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton.decode import _combine_kernel, _scores, num_splits
from qkv.kvcache.kv_int import SCALE_MAX as _SCALE_MAX, hadamard

SCALE_MAX = tl.constexpr(_SCALE_MAX)  # a global a kernel reads must be a constexpr


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
def _store_plane(X, VALS, SC, D: tl.constexpr, BITS: tl.constexpr, GRP: tl.constexpr):
    """One vector of D elements at X -> packed bytes at VALS and fp16 scales at SC."""
    NG: tl.constexpr = D // GRP
    if BITS == 8:
        d = tl.arange(0, D)
        x = tl.load(X + d).to(tl.float32)
        xg = tl.reshape(x, (NG, GRP))
        s = _scale(tl.max(tl.abs(xg), 1), 127.0, SCALE_MAX)
        q = _quant(xg, s, 127.0)
        tl.store(VALS + d, tl.reshape(q, (D,)).to(tl.int8).to(tl.uint8, bitcast=True))
        tl.store(SC + tl.arange(0, NG), s)
    else:
        HALF: tl.constexpr = D // 2
        i = tl.arange(0, HALF)
        xe = tl.reshape(tl.load(X + 2 * i).to(tl.float32), (NG, GRP // 2))
        xo = tl.reshape(tl.load(X + 2 * i + 1).to(tl.float32), (NG, GRP // 2))
        s = _scale(tl.maximum(tl.max(tl.abs(xe), 1), tl.max(tl.abs(xo), 1)), 7.0, SCALE_MAX)
        qe, qo = _quant(xe, s, 7.0), _quant(xo, s, 7.0)
        byte = (qe + 8.0).to(tl.int32) | ((qo + 8.0).to(tl.int32) << 4)
        tl.store(VALS + i, tl.reshape(byte, (HALF,)).to(tl.uint8))
        tl.store(SC + tl.arange(0, NG), s)


@triton.jit
def _packed_write_kernel(K, V, C8, C16, SLOT, stride_kt, stride_kh, stride_vt, stride_vh, page_bytes,
                         k_vals, k_scales, v_vals, v_scales,
                         KVH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                         K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        page = (slot // BS) * page_bytes
        row = (slot % BS) * KVH + h
        _store_plane(K + t * stride_kt + h * stride_kh, C8 + page + k_vals + row * (D * K_BITS // 8),
                     C16 + (page + k_scales) // 2 + row * (D // K_GRP), D, K_BITS, K_GRP)
        _store_plane(V + t * stride_vt + h * stride_vh, C8 + page + v_vals + row * (D * V_BITS // 8),
                     C16 + (page + v_scales) // 2 + row * (D // V_GRP), D, V_BITS, V_GRP)


def _layout_args(kv_cache: torch.Tensor):
    lay = kv_cache.kv_layout
    kp, vp = lay.planes
    for p in (kp, vp):
        if not p.fmt.is_int:
            raise NotImplementedError(f"the Triton packed kernels read int8/int4 planes only, not {p.fmt.name}")
    return lay, kp, vp


def write_packed(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k/v [T, KVH, D] -> quantized into the packed pages; slot -1 rows are skipped in the kernel."""
    T, kvh, D = k.shape
    if T == 0:
        return
    lay, kp, vp = _layout_args(kv_cache)
    if kp.rotated:  # (torch, row by row: the bytes equal kv_pages.write's)
        k = hadamard(k)
    if vp.rotated:
        v = hadamard(v)
    _packed_write_kernel[(T, kvh)](
        k, v, kv_cache, kv_cache.view(torch.float16), slot_mapping, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), lay.page_bytes, kp.values_at, kp.scales_at, vp.values_at, vp.scales_at,
        KVH=kvh, D=D, BS=lay.block_size, K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D),
        V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D), num_warps=1)


@triton.jit
def _load_half(C8, C16, vals, scales, nmask, D: tl.constexpr, GRP: tl.constexpr, HI: tl.constexpr,
               DT: tl.constexpr):
    """[BLOCK_N, D/2] of an int4 tile (HI: the high nibbles = odd columns), dequantized to DT.
    ``vals``: byte offset of each key's packed row, ``scales``: fp16 offset of its scales."""
    HALF: tl.constexpr = D // 2
    i = tl.arange(0, HALF)
    b = tl.load(C8 + vals[:, None] + i[None, :], mask=nmask[:, None], other=8).to(tl.int32)
    nib = (b >> 4) if HI else (b & 15)
    s = tl.load(C16 + scales[:, None] + i[None, :] // (GRP // 2), mask=nmask[:, None], other=0.0)
    return ((nib - 8).to(tl.float32) * s.to(tl.float32)).to(DT)


@triton.jit
def _load_full(C8, C16, vals, scales, nmask, D: tl.constexpr, GRP: tl.constexpr, DT: tl.constexpr):
    """[BLOCK_N, D] of an int8 tile, dequantized to DT (offsets as ``_load_half``)."""
    d = tl.arange(0, D)
    b = tl.load(C8 + vals[:, None] + d[None, :], mask=nmask[:, None], other=0)
    s = tl.load(C16 + scales[:, None] + d[None, :] // GRP, mask=nmask[:, None], other=0.0)
    return (b.to(tl.int8, bitcast=True).to(tl.float32) * s.to(tl.float32)).to(DT)


@triton.jit
def _packed_decode_kernel(Q, C8, C16, BT, NC, QSL, ACC, ML, OUT,
                          stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, page_bytes,
                          k_vals, k_scales, v_vals, v_scales, sm_scale, softcap, window, ring,
                          KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                          BS: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                          K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                          HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          IEEE: tl.constexpr):
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
    HALF: tl.constexpr = D // 2

    g = tl.arange(0, G_PAD)
    gmask = g < G
    heads = kvh * G + g
    qbase = Q + qrow * stride_qt + heads[:, None] * stride_qh
    i = tl.arange(0, HALF)
    d = tl.arange(0, D)
    if K_BITS == 4:
        q_e = tl.load(qbase + 2 * i[None, :], mask=gmask[:, None], other=0.0)
        q_o = tl.load(qbase + 2 * i[None, :] + 1, mask=gmask[:, None], other=0.0)
    else:
        q = tl.load(qbase + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    if V_BITS == 4:
        acc_e = tl.zeros([G_PAD, HALF], tl.float32)
        acc_o = tl.zeros([G_PAD, HALF], tl.float32)
    else:
        acc = tl.zeros([G_PAD, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        nmask = pos < hi
        pg = pos // BS
        if HAS_RING:
            pg = pg % ring
        blk = tl.load(BT + b * stride_bt + pg, mask=nmask, other=0).to(tl.int64)
        row = (pos % BS) * KVH + kvh  # the token's row of this head in its page's planes
        base = blk * page_bytes
        kv_off = base + k_vals + row * (D * K_BITS // 8)
        ks_off = (base + k_scales) // 2 + row * (D // K_GRP)
        if K_BITS == 4:
            klo = _load_half(C8, C16, kv_off, ks_off, nmask, D, K_GRP, False, DT)
            khi = _load_half(C8, C16, kv_off, ks_off, nmask, D, K_GRP, True, DT)
            s = tl.dot(q_e, tl.trans(klo), input_precision=PREC) + tl.dot(q_o, tl.trans(khi), input_precision=PREC)
        else:
            k = _load_full(C8, C16, kv_off, ks_off, nmask, D, K_GRP, DT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
        s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pd = p.to(DT)
        vv_off = base + v_vals + row * (D * V_BITS // 8)
        vs_off = (base + v_scales) // 2 + row * (D // V_GRP)
        if V_BITS == 4:
            vlo = _load_half(C8, C16, vv_off, vs_off, nmask, D, V_GRP, False, DT)
            vhi = _load_half(C8, C16, vv_off, vs_off, nmask, D, V_GRP, True, DT)
            acc_e = acc_e * alpha[:, None] + tl.dot(pd, vlo, input_precision=PREC)
            acc_o = acc_o * alpha[:, None] + tl.dot(pd, vhi, input_precision=PREC)
        else:
            v = _load_full(C8, C16, vv_off, vs_off, nmask, D, V_GRP, DT)
            acc = acc * alpha[:, None] + tl.dot(pd, v, input_precision=PREC)
        m_i = m_new
    if V_BITS == 4:  # (the two halves go out interleaved: even columns, then odd ones)
        cols_e, cols_o = 2 * i, 2 * i + 1
        if S == 1:
            ob = OUT + qrow * stride_ot + heads[:, None] * stride_oh
            tl.store(ob + cols_e[None, :], (acc_e / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
            tl.store(ob + cols_o[None, :], (acc_o / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
        else:
            rowc = (b * KVH * G + heads) * S + split
            tl.store(ACC + rowc[:, None] * D + cols_e[None, :], acc_e, mask=gmask[:, None])
            tl.store(ACC + rowc[:, None] * D + cols_o[None, :], acc_o, mask=gmask[:, None])
    else:
        if S == 1:
            ob = OUT + qrow * stride_ot + heads[:, None] * stride_oh
            tl.store(ob + d[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
        else:
            rowc = (b * KVH * G + heads) * S + split
            tl.store(ACC + rowc[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    if S > 1:
        rowc = (b * KVH * G + heads) * S + split
        tl.store(ML + rowc * 2, m_i, mask=gmask)
        tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)


def packed_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, num_computed: torch.Tensor,
                  scale: float, window: int | None = None, ring: int | None = None, softcap: float | None = None,
                  max_seq_len: int | None = None, query_start_loc: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, splits: int | None = None, block_n: int = 64,
                  num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """``decode.paged_decode`` over packed pages: q [T, H, D]; sequence b's query is row
    ``query_start_loc[b]`` and sees keys ``[0, num_computed[b]]`` (this step's already written,
    by ``write_packed``). Returns ``out`` [T, H, D] in q's dtype."""
    lay, kp, vp = _layout_args(kv_cache)
    B = num_computed.shape[0]
    _, H, D = q.shape
    kvh = kp.rows
    if D & (D - 1) or D < 32:
        raise NotImplementedError(f"the packed decode kernel needs a power-of-two head_dim >= 32, got {D}")
    G = H // kvh
    S = splits or num_splits(B, kvh, max_seq_len, block_n)
    G_PAD = max(16, triton.next_power_of_2(G))
    rows = B * kvh * G * S if S > 1 else 1
    acc = torch.empty((rows, D), dtype=torch.float32, device=q.device)
    ml = torch.empty((rows, 2), dtype=torch.float32, device=q.device)
    if query_start_loc is None:
        query_start_loc = torch.arange(B + 1, device=q.device)
    if kp.rotated:  # scores of the rotated query against the rotated keys (kv_pages): one GEMM
        q = _rotate(q)
    if out is None or vp.rotated:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _packed_decode_kernel[(B, kvh, S)](
        q, kv_cache, kv_cache.view(torch.float16), block_table, num_computed, query_start_loc, acc, ml, out,
        q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1), lay.page_bytes,
        kp.values_at, kp.scales_at, vp.values_at, vp.scales_at, scale, softcap or 0.0, window or 0, ring or 1,
        KVH=kvh, G=G, G_PAD=G_PAD, D=D, BS=lay.block_size, BLOCK_N=block_n, S=S,
        K_BITS=kp.fmt.bits, K_GRP=kp.fmt.group_for(D), V_BITS=vp.fmt.bits, V_GRP=vp.fmt.group_for(D),
        HAS_WINDOW=window is not None, HAS_RING=ring is not None, HAS_SOFTCAP=softcap is not None,
        IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    if S > 1:
        _combine_kernel[(B, H)](acc, ml, out, query_start_loc, out.stride(0), out.stride(1), H, D=D, D_PAD=D,
                                S=S, S_PAD=triton.next_power_of_2(S), num_warps=4)
    return _rotate(out) if vp.rotated else out


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
        if s.kind == "mla":
            raise ValueError(f"kv_dtype {packed.label}: the Triton MLA backend has no int8/int4 latent kernel; "
                             f"use attention_backend='reference'")
        if getattr(s, "dilation", 1) > 1:
            raise ValueError(f"kv_dtype {packed.label}: the packed decode kernel has no dilated windows; "
                             f"use attention_backend='reference' or a float kv_dtype")
        if s.head_dim & (s.head_dim - 1) or s.head_dim < 32:
            raise ValueError(f"kv_dtype {packed.label}: the packed decode kernel needs a power-of-two "
                             f"head_dim >= 32, got {s.head_dim}")
