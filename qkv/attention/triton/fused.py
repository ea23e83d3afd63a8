"""Fused elementwise ops of the decode hot path: RMSNorm, neox RoPE on q and k (with Qwen3's
per-head q/k RMSNorm first, in the same launch), SiLU-and-mul.

In eager torch each of these is 5 to 15 tiny kernels; at batch 1 a Llama-8B step would spend
more time launching them than reading weights. Each is one kernel here, computing exactly
what the torch version in ``qkv.model.layers`` computes (fp32 math, same rounding points).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkv.attention.triton import pdl
from qkv.attention.triton.gemv import linear, norm_linear, silu_mul_linear  # noqa: F401  (re-exported)
from qkv.attention.triton.gate_up_silu import applies as gate_up_silu_applies, gate_up_silu  # noqa: F401
from qkv.attention.triton.tail_norm import applies as tail_applies, res_norm_linear  # noqa: F401


# q/k RMSNorm and RoPE in one launch (``qk_norm_rope``); QKV_FUSE_QK_NORM_ROPE=0: three launches.
FUSE_QK_NORM_ROPE = os.environ.get("QKV_FUSE_QK_NORM_ROPE", "1") != "0"
# In decode steps over a float cache, the same launch also writes K and V (triton/qk_decode.py);
# QKV_FUSE_KV_WRITE=0: the attention backend writes them (one launch more per layer).
FUSE_KV_WRITE = os.environ.get("QKV_FUSE_KV_WRITE", "1") != "0"


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, N, eps, offset,
                     BLOCK: tl.constexpr, HAS_OFFSET: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.sync(PDL)  # the first statement: pdl.py's contract
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    if HAS_OFFSET:
        y = x * rstd * (offset + w.to(tl.float32))
    else:  # torch: weight * (normalized.to(dtype)), rounded to dtype
        y = (x * rstd).to(Y.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N]; a new tensor in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    N = shape[-1]
    BLOCK = triton.next_power_of_2(N)
    if x2.shape[0]:
        mode, kw = pdl.launch(x2.device)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), N, eps, offset,
                                         BLOCK=BLOCK, HAS_OFFSET=bool(offset), num_warps=8 if BLOCK >= 2048 else 4,
                                         PDL=mode, **kw)
    return y.view(shape)


@triton.jit
def _add_rms_norm_kernel(X, R, W, Y, RO, stride_x, stride_r, stride_y, stride_ro, N, eps, offset,
                         BLOCK: tl.constexpr, HAS_OFFSET: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.sync(PDL)  # the first statement: pdl.py's contract
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (r + x).to(RO.dtype.element_ty)  # the residual stream, rounded as torch's add rounds it
    tl.store(RO + row * stride_ro + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(s * s, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    if HAS_OFFSET:
        y = s * rstd * (offset + w.to(tl.float32))
    else:
        y = (s * rstd).to(Y.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) for 2-D x and residual [T, N]; new tensors."""
    T, N = x.shape
    y = torch.empty_like(x)
    ro = torch.empty_like(residual)
    BLOCK = triton.next_power_of_2(N)
    if T:
        mode, kw = pdl.launch(x.device)
        _add_rms_norm_kernel[(T,)](x, residual, weight, y, ro, x.stride(0), residual.stride(0), y.stride(0),
                                   ro.stride(0), N, eps, offset, BLOCK=BLOCK, HAS_OFFSET=bool(offset),
                                   num_warps=8 if BLOCK >= 2048 else 4, PDL=mode, **kw)
    return y, ro


@triton.jit
def _rope_kernel(X, Y, COS, SIN, POS, stride_xt, stride_xh, stride_yt, stride_yh, stride_c, NH,
                 HALF: tl.constexpr, H_PAD: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.sync(PDL)  # the first statement: pdl.py's contract
    t = tl.program_id(0)
    _rope_rows(X, Y, COS, SIN, POS, t, stride_xt, stride_xh, stride_yt, stride_yh, stride_c, NH, HALF, H_PAD)


@triton.jit
def _rope2_kernel(X1, Y1, X2, Y2, COS, SIN, POS, s1t, s1h, o1t, o1h, s2t, s2h, o2t, o2h, stride_c, NH1, NH2,
                  HALF: tl.constexpr, H1_PAD: tl.constexpr, H2_PAD: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.sync(PDL)  # the first statement: pdl.py's contract
    t = tl.program_id(0)
    _rope_rows(X1, Y1, COS, SIN, POS, t, s1t, s1h, o1t, o1h, stride_c, NH1, HALF, H1_PAD)
    _rope_rows(X2, Y2, COS, SIN, POS, t, s2t, s2h, o2t, o2h, stride_c, NH2, HALF, H2_PAD)


@triton.jit
def _rope_rows(X, Y, COS, SIN, POS, t, stride_xt, stride_xh, stride_yt, stride_yh, stride_c, NH,
               HALF: tl.constexpr, H_PAD: tl.constexpr):
    pos = tl.load(POS + t)
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF)
    hmask = (h < NH)[:, None]
    cos1 = tl.load(COS + pos * stride_c + i).to(tl.float32)[None, :]
    cos2 = tl.load(COS + pos * stride_c + HALF + i).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + pos * stride_c + i).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + pos * stride_c + HALF + i).to(tl.float32)[None, :]
    base = X + t * stride_xt + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(base, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hmask, other=0.0).to(tl.float32)
    y1 = x1 * cos1 - x2 * sin1
    y2 = x2 * cos2 + x1 * sin2
    out = Y + t * stride_yt + h[:, None] * stride_yh + i[None, :]
    tl.store(out, y1.to(Y.dtype.element_ty), mask=hmask)
    tl.store(out + HALF, y2.to(Y.dtype.element_ty), mask=hmask)


def rope_qk(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor,
            k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope`` of q and k in one launch (half the launches of the decode hot path's RoPE)."""
    T, NH1, D = q.shape
    NH2 = k.shape[1]
    yq = torch.empty((T, NH1, D), dtype=q.dtype, device=q.device)
    yk = torch.empty((T, NH2, D), dtype=k.dtype, device=k.device)
    if T:
        mode, kw = pdl.launch(q.device)
        _rope2_kernel[(T,)](q, yq, k, yk, cos, sin, positions, q.stride(0), q.stride(1), yq.stride(0), yq.stride(1),
                            k.stride(0), k.stride(1), yk.stride(0), yk.stride(1), cos.stride(0), NH1, NH2,
                            HALF=D // 2, H1_PAD=triton.next_power_of_2(NH1), H2_PAD=triton.next_power_of_2(NH2),
                            num_warps=4, PDL=mode, **kw)
    return yq, yk


def rope(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Neox RoPE of x [T, heads, dim] (any row/head strides, unit dim stride) -> new contiguous tensor."""
    T, NH, D = x.shape
    y = torch.empty((T, NH, D), dtype=x.dtype, device=x.device)
    if T:
        mode, kw = pdl.launch(x.device)
        _rope_kernel[(T,)](x, y, cos, sin, positions, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                           cos.stride(0), NH, HALF=D // 2, H_PAD=triton.next_power_of_2(NH), num_warps=4, PDL=mode,
                           **kw)
    return y


@triton.jit
def _silu_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    pdl.sync(PDL)  # the first statement: pdl.py's contract
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    a = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)  # torch rounds silu's output first
    tl.store(Y + row * stride_y + cols, (a * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2N] = [gate | up] -> silu(gate) * up [T, N]."""
    T, N2 = x.shape
    N = N2 // 2
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    BLOCK = 1024
    if T:
        mode, kw = pdl.launch(x.device)
        _silu_mul_kernel[(T, triton.cdiv(N, BLOCK))](x, y, x.stride(0), y.stride(0), N, BLOCK=BLOCK, num_warps=4,
                                                     PDL=mode, **kw)
    return y


@triton.jit
def _qk_norm_rope_kernel(Q, K, V, YQ, YK, QW, KW, COS, SIN, POS, KC, VC, SLOT, sqt, sqh, skt, skh, svt,
                         oqt, oqh, okt, okh, stride_c, stride_cs, stride_ch, NQ, NK, eps,
                         HALF: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
                         WRITE: tl.constexpr, W_PAD: tl.constexpr, PDL: tl.constexpr = 0, PRE: tl.constexpr = False,
                         NORM: tl.constexpr = True):
    # ``NORM=False``: RoPE only (a model without q/k norms, Llama): QW/KW are not read.
    # ``PRE`` (a CUDA graph's decode step over fixed RoPE tables): positions and slots are static
    # inputs, so they, the tables' rows and the norm weights load before the PDL wait (pdl.py).
    if not PRE:
        pdl.sync(PDL)
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)  # (positions when not WRITE: read, never used)
    pos = tl.load(POS + t)
    i = tl.arange(0, HALF)
    cos1 = tl.load(COS + pos * stride_c + i).to(tl.float32)[None, :]
    cos2 = tl.load(COS + pos * stride_c + HALF + i).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + pos * stride_c + i).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + pos * stride_c + HALF + i).to(tl.float32)[None, :]
    if NORM:
        qw1 = tl.load(QW + i).to(tl.float32)[None, :]
        qw2 = tl.load(QW + HALF + i).to(tl.float32)[None, :]
        kw1 = tl.load(KW + i).to(tl.float32)[None, :]
        kw2 = tl.load(KW + HALF + i).to(tl.float32)[None, :]
    else:  # unused
        qw1 = cos1
        qw2 = cos1
        kw1 = cos1
        kw2 = cos1
    if PRE:
        pdl.sync(PDL)
    _norm_rope_rows(Q + t * sqt, YQ + t * oqt, qw1, qw2, cos1, cos2, sin1, sin2, sqh, oqh, NQ, eps, HALF, HQ_PAD,
                    KC, slot, stride_cs, stride_ch, False, NORM)
    _norm_rope_rows(K + t * skt, YK + t * okt, kw1, kw2, cos1, cos2, sin1, sin2, skh, okh, NK, eps, HALF, HK_PAD,
                    KC, slot, stride_cs, stride_ch, WRITE, NORM)
    if WRITE:
        if slot >= 0:  # V as it is, heads contiguous (kv_write's _store_row); -1: store nothing
            w = tl.arange(0, W_PAD)
            wm = w < NK * 2 * HALF
            tl.store(VC + slot.to(tl.int64) * stride_cs + w,
                     tl.load(V + t * svt + w, mask=wm).to(VC.dtype.element_ty), mask=wm)


@triton.jit
def _norm_rope_rows(X, Y, w1, w2, cos1, cos2, sin1, sin2, stride_xh, stride_yh, NH, eps,
                    HALF: tl.constexpr, H_PAD: tl.constexpr, C, slot, stride_cs, stride_ch, WRITE: tl.constexpr,
                    NORM: tl.constexpr = True):
    """RMSNorm of each head (``_rms_norm_kernel``'s math and rounding, no offset; weight halves
    w1, w2 [1, HALF] in fp32), then neox RoPE of the rounded result (``_rope_rows``'s, this
    token's table rows given); ``WRITE``: also stored at cache ``slot``. ``NORM=False``: RoPE
    of x as it is (``_rope_rows``'s math)."""
    h = tl.arange(0, H_PAD)
    i = tl.arange(0, HALF)
    hmask = (h < NH)[:, None]
    base = X + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(base, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=hmask, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        n1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
        n2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    else:
        n1 = x1
        n2 = x2
    y1 = (n1 * cos1 - n2 * sin1).to(dt)
    y2 = (n2 * cos2 + n1 * sin2).to(dt)
    out = Y + h[:, None] * stride_yh + i[None, :]
    tl.store(out, y1, mask=hmask)
    tl.store(out + HALF, y2, mask=hmask)
    if WRITE:
        if slot >= 0:
            c = C + slot.to(tl.int64) * stride_cs + h[:, None] * stride_ch + i[None, :]
            tl.store(c, y1.to(C.dtype.element_ty), mask=hmask)
            tl.store(c + HALF, y2.to(C.dtype.element_ty), mask=hmask)


def qk_norm_rope(positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, v: torch.Tensor | None = None,
                 kv_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                 static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_qk(..., rms_norm(q, q_weight), rms_norm(k, k_weight))`` (per-head norms over the
    head dim, no offset) in one launch: q [T, H, D], k [T, KVH, D], any row/head strides.
    With ``kv_cache`` [2, blocks, bs, KVH, D] (a float cache of k's dtype), ``v`` and
    ``slot_mapping``: also ``kv_write.write_kv(kv_cache, rotated k, v, slot_mapping)``.
    ``static``: positions, slots and the tables are inputs no kernel of the step writes (a CUDA
    graph with fixed tables): read before the PDL wait. ``q_weight=None``: no norms, RoPE only
    (``rope_qk``'s math; with the cache, Llama's RoPE and KV write in one launch)."""
    T, NQ, D = q.shape
    norm = q_weight is not None
    if not norm:
        q_weight = k_weight = cos  # not read
    NK = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and D % 2 == 0
    yq = torch.empty((T, NQ, D), dtype=q.dtype, device=q.device)
    yk = torch.empty((T, NK, D), dtype=k.dtype, device=k.device)
    write = kv_cache is not None
    if write:
        kc, vc = kv_cache[0], kv_cache[1]
        assert kc.dtype == k.dtype and kc.stride(3) == 1 and kc.stride(2) == D and v.stride(2) == 1 and v.stride(1) == D
        sv, cs, ch, slots = v.stride(0), kc.stride(1), kc.stride(2), slot_mapping
    else:
        kc = vc = v = yk  # unused
        slots = positions
        sv = cs = ch = 0
    if T:
        mode, kw = pdl.launch(q.device)
        _qk_norm_rope_kernel[(T,)](q, k, v, yq, yk, q_weight, k_weight, cos, sin, positions, kc, vc, slots,
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), sv, yq.stride(0),
                                   yq.stride(1), yk.stride(0), yk.stride(1), cos.stride(0), cs, ch, NQ, NK, eps,
                                   HALF=D // 2, HQ_PAD=triton.next_power_of_2(NQ),
                                   HK_PAD=triton.next_power_of_2(NK), WRITE=write,
                                   W_PAD=triton.next_power_of_2(NK * D), num_warps=4, PDL=mode, PRE=static, NORM=norm,
                                   **kw)
    return yq, yk
