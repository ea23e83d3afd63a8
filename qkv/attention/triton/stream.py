"""The residual stream at batch 1 with its RMSNorm statistics carried between the GEMVs.

At Llama-8B's hidden size (4096) the norm cannot run as the whole-row prologue of the next
projection (``gemv.norm_linear``: a 4 x 4096 weight tile plus the row in registers), so each
layer ran two norm kernels of its own, each a serial step of a decode step whose time is the
sum of its kernels' latencies. Here the two GEMVs that end a residual branch (``o_proj``, the
SiLU + ``down_proj``) add the branch into the stream in their epilogue: each program stores
its rows of ``s = r + y`` (rounded as torch's add) and the sum of their squares (one fp32 a
program, in ``P``). The projection after the norm (qkv, gate/up) then needs no prologue over
the row: after the PDL wait it sums ``P`` (a few KB from L2) into ``rstd`` and normalizes
each chunk of ``s`` as it multiplies it, so it streams its weight in K-chunks like any GEMV.
The norm's math and rounding are ``fused._add_rms_norm_kernel``'s; only the order in which the
squares are summed differs (per program, then across programs).

Switch: ``QKV_GEMV_STREAM`` = ``1`` (where the whole-row norm prologue does not apply, rows
wider than ``gemv.NORM_MAX_K``), ``all`` (every row width; tests), ``0`` (off, the default:
on an H200 the Llama-8B step was slower with it than with the norm kernels and plain Triton
GEMVs, 230.6 against 237.0 tok/s; each normed program reads the sums, the stream and the norm
weight from L2, 2.5x the vector bytes of a plain GEMV program; docs/benchmarks.md).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qkv.attention.triton import gemv, pdl
from qkv.attention.triton.gemv import _prefetch_chunk, _prefetch_start, _silu_x, _v_chunk, _w_chunk

_MODE = os.environ.get("QKV_GEMV_STREAM", "0").strip().lower()
ON = _MODE != "0"
ALL_WIDTHS = _MODE == "all"


class Stream(NamedTuple):
    """The residual stream ``s`` [1, K] and its per-program sums of squares ``p`` [programs] (fp32)."""
    s: torch.Tensor
    p: torch.Tensor


@triton.jit
def _res_gemv_kernel(X, W, R, S, P, N, stride_w, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = 0,
                 EVICT: tl.constexpr = False):
    """s = r + x W^T (``SILU``: x = silu(g) * u of X = [g | u]); P[pid] = sum of s^2 over its rows."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    if PREFETCH > 0:
        _prefetch_start(W, n, stride_w, N, K, BLOCK_K, PREFETCH)
    w = _w_chunk(W, n, 0, k, stride_w, N, K, EVEN, EVICT)
    pdl.sync(PDL)
    if SILU:
        acc = w.to(tl.float32) * _silu_x(X, 0, k, K, EVEN)[None, :]
    else:
        acc = w.to(tl.float32) * _v_chunk(X, 0, k, K, EVEN).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if PREFETCH > 0 and PREFETCH * BLOCK_K < K:  # chunk k0 + PREFETCH - 1 chunks ahead (gemv.py)
            if k0 + (PREFETCH - 1) * BLOCK_K < K:
                _prefetch_chunk(W, n, k0 + (PREFETCH - 1) * BLOCK_K, stride_w, N, K, BLOCK_K)
        if SILU:
            x = _silu_x(X, k0, k, K, EVEN)
        else:
            x = _v_chunk(X, k0, k, K, EVEN).to(tl.float32)
        acc += _w_chunk(W, n, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * x[None, :]
    nm = n < N
    y = tl.sum(acc, 1).to(S.dtype.element_ty).to(tl.float32)  # the branch's output, rounded
    s = (tl.load(R + n, mask=nm, other=0.0).to(tl.float32) + y).to(S.dtype.element_ty)
    tl.store(S + n, s, mask=nm)
    sf = tl.where(nm, s.to(tl.float32), 0.0)
    tl.store(P + pid, tl.sum(sf * sf, 0))


@triton.jit
def _normed_gemv_kernel(S, P, NW, W, Y, N, stride_w, eps, K: tl.constexpr, NP: tl.constexpr,
                        NP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                        PDL: tl.constexpr, PREFETCH: tl.constexpr = 0,
                 EVICT: tl.constexpr = False):
    """y = rmsnorm(s) W^T with rmsnorm's statistics from the producer's sums P[:NP]."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    if PREFETCH > 0:
        _prefetch_start(W, n, stride_w, N, K, BLOCK_K, PREFETCH)
    w = _w_chunk(W, n, 0, k, stride_w, N, K, EVEN, EVICT)
    nw = _v_chunk(NW, 0, k, K, EVEN).to(tl.float32)
    pdl.sync(PDL)
    i = tl.arange(0, NP_PAD)
    rstd = tl.rsqrt(tl.sum(tl.load(P + i, mask=i < NP, other=0.0), 0) / K + eps)
    dt = Y.dtype.element_ty
    h = ((_v_chunk(S, 0, k, K, EVEN).to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
    acc = w.to(tl.float32) * h[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if PREFETCH > 0 and PREFETCH * BLOCK_K < K:
            if k0 + (PREFETCH - 1) * BLOCK_K < K:
                _prefetch_chunk(W, n, k0 + (PREFETCH - 1) * BLOCK_K, stride_w, N, K, BLOCK_K)
        nw = _v_chunk(NW, k0, k, K, EVEN).to(tl.float32)
        h = ((_v_chunk(S, k0, k, K, EVEN).to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
        acc += _w_chunk(W, n, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * h[None, :]
    tl.store(Y + n, tl.sum(acc, 1).to(dt), mask=n < N)


@triton.jit
def _start_kernel(X, P, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """P[0] = sum of x^2 over the row: the first layer's stream is its input as it is."""
    pdl.sync(PDL)
    i = tl.arange(0, BLOCK)
    x = tl.load(X + i, mask=i < K, other=0.0).to(tl.float32)
    tl.store(P, tl.sum(x * x, 0))


def start(x: torch.Tensor) -> Stream:
    """The stream of the first layer: ``x`` (one row) and its sum of squares, one small launch
    (instead of a norm kernel and a projection that cannot take the norm)."""
    p = torch.empty((1,), dtype=torch.float32, device=x.device)
    mode, kw = pdl.launch(x.device)
    K = x.shape[1]
    _start_kernel[(1,)](x, p, K=K, BLOCK=triton.next_power_of_2(K), PDL=mode, num_warps=8 if K > 2048 else 4, **kw)
    return Stream(x, p)


def _row(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and w.stride(1) == 1 and w.dtype == x.dtype


def applies(x: torch.Tensor, hidden: int, *layers: torch.nn.Module) -> bool:
    """Whether a layer's stream of width ``hidden`` runs through these kernels for input row x:
    switched on, rows wider than the norm prologue's (or ``all``), every one of ``layers`` a
    bias-free Linear of x's dtype."""
    if not ON or not (ALL_WIDTHS or hidden > gemv.NORM_MAX_K):
        return False
    return all(isinstance(m, torch.nn.Linear) and m.bias is None and _row(x, m.weight) for m in layers)


def res_linear(x: torch.Tensor, layer: torch.nn.Linear, residual: torch.Tensor, silu: bool = False) -> Stream:
    """``Stream(residual + layer(x), sums of squares)``; ``silu``: x = [gate | up], the layer
    reads silu(gate) * up (the down projection)."""
    w = layer.weight
    N, K = w.shape
    assert residual.shape == (1, N) and residual.is_contiguous() and x.shape[1] == (2 * K if silu else K)
    mode, kw = pdl.launch(x.device)
    bn, bk, nw = gemv.tile(N, K, mode)
    grid = triton.cdiv(N, bn)
    s = torch.empty((1, N), dtype=x.dtype, device=x.device)
    p = torch.empty((grid,), dtype=torch.float32, device=x.device)
    _res_gemv_kernel[(grid,)](x, w, residual, s, p, N, w.stride(0), K=K, BLOCK_N=bn, BLOCK_K=bk,
                              EVEN=N % bn == 0 and K % bk == 0, SILU=silu, PDL=mode,
                              PREFETCH=gemv.prefetch(N, K, bk), EVICT=gemv.EVICT_FIRST,
                              num_warps=nw, num_stages=3, **kw)
    return Stream(s, p)


def normed_linear(stream: Stream, norm_weight: torch.Tensor, eps: float, layer: torch.nn.Linear) -> torch.Tensor:
    """``layer(rms_norm(stream.s))`` (no offset), the norm's statistics from ``stream.p``."""
    w = layer.weight
    N, K = w.shape
    s, p = stream
    assert s.shape == (1, K)
    mode, kw = pdl.launch(s.device)
    bn, bk, nw = gemv.tile(N, K, mode)
    y = torch.empty((1, N), dtype=s.dtype, device=s.device)
    np_ = p.shape[0]
    _normed_gemv_kernel[(triton.cdiv(N, bn),)](s, p, norm_weight, w, y, N, w.stride(0), eps, K=K, NP=np_,
                                               NP_PAD=triton.next_power_of_2(np_), BLOCK_N=bn, BLOCK_K=bk,
                                               EVEN=N % bn == 0 and K % bk == 0, PDL=mode,
                                               PREFETCH=gemv.prefetch(N, K, bk), EVICT=gemv.EVICT_FIRST,
                                               num_warps=nw, num_stages=3, **kw)
    return y
