"""The residual add and the next RMSNorm in the epilogue of the GEMV that ends a residual branch.

At Llama-8B's hidden size (4096) the norm cannot be the whole-row prologue of the projection
that reads it (``gemv.norm_linear`` holds a 4 x 4096 weight tile and the row in registers), so
each layer ran two ``add_rms_norm`` launches, each a serial link of a decode step whose time
is the sum of its kernels' latencies. Here the two GEMVs that end a branch (``o_proj``, the
SiLU + ``down_proj``) add their rows into the stream (``s = r + y``, rounded as torch's add)
and the last of their programs to finish (an atomic counter, as the decode kernel's in-kernel
merge) normalizes the whole row: the next projection is a plain GEMV and the norm launch is
gone. The math and rounding points are ``fused._add_rms_norm_kernel``'s.

Switch: ``QKV_GEMV_TAIL_NORM`` = ``1`` (the default: where the whole-row prologue does not
apply, rows wider than ``gemv.NORM_MAX_K``), ``all`` (every width; tests), ``0`` (off). On the
H200 it took the Llama-8B batch-1 step from 4.190 to 4.113 ms (docs/benchmarks.md, session 9).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkv.attention.triton import gemv, pdl
from qkv.attention.triton.gemv import _silu_x, _v_chunk, _w_chunk

_MODE = os.environ.get("QKV_GEMV_TAIL_NORM", "1").strip().lower()
ON = _MODE != "0"
ALL_WIDTHS = _MODE == "all"


@triton.jit
def _res_norm_gemv_kernel(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN: tl.constexpr, N_PAD: tl.constexpr, PDL: tl.constexpr,
                          EVICT: tl.constexpr = False):
    _res_norm_gemv(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K, BLOCK_N, BLOCK_K, EVEN, False, N_PAD, PDL, EVICT)


@triton.jit
def _res_norm_silu_gemv_kernel(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, EVEN: tl.constexpr, N_PAD: tl.constexpr, PDL: tl.constexpr,
                               EVICT: tl.constexpr = False):
    # (its own name: profiles tell the down projection from o_proj)
    _res_norm_gemv(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K, BLOCK_N, BLOCK_K, EVEN, True, N_PAD, PDL, EVICT)


@triton.jit
def _res_norm_gemv(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN: tl.constexpr, SILU: tl.constexpr, N_PAD: tl.constexpr,
                   PDL: tl.constexpr, EVICT: tl.constexpr):
    """s = r + x W^T (``SILU``: x = silu(g) * u of X = [g | u]); the last program: y = rmsnorm(s) * nw."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    w = _w_chunk(W, n, 0, k, stride_w, N, K, EVEN, EVICT)
    pdl.sync(PDL)
    if SILU:
        acc = w.to(tl.float32) * _silu_x(X, 0, k, K, EVEN)[None, :]
    else:
        acc = w.to(tl.float32) * _v_chunk(X, 0, k, K, EVEN).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if SILU:
            x = _silu_x(X, k0, k, K, EVEN)
        else:
            x = _v_chunk(X, k0, k, K, EVEN).to(tl.float32)
        acc += _w_chunk(W, n, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * x[None, :]
    nm = n < N
    y = tl.sum(acc, 1).to(S.dtype.element_ty).to(tl.float32)  # the branch's output, rounded
    tl.store(S + n, (tl.load(R + n, mask=nm, other=0.0).to(tl.float32) + y).to(S.dtype.element_ty), mask=nm)
    # The barrier orders every thread's stores before the counter's release; the last program
    # reads the row through L2 (.cg): no stale L1 line from an earlier replay.
    tl.debug_barrier()
    done = tl.atomic_add(CNT, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        i = tl.arange(0, N_PAD)
        im = i < N
        s = tl.load(S + i, mask=im, other=0.0, cache_modifier=".cg").to(tl.float32)
        nw = tl.load(NW + i, mask=im, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, 0) / N + eps)
        h = (s * rstd).to(Y.dtype.element_ty).to(tl.float32) * nw
        tl.store(Y + i, h.to(Y.dtype.element_ty), mask=im)
        tl.store(CNT, 0)  # ready for the next launch or replay


_COUNTERS: dict = {}


def _counter(device: torch.device) -> torch.Tensor:
    """One zeroed int32 shared by every launch on ``device`` (launches on one stream never
    overlap: with PDL a program touches it only after its wait); each launch leaves it zero.
    Allocated by the first (eager warm-up) call, outside graph capture."""
    t = _COUNTERS.get(device)
    if t is None:
        t = _COUNTERS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def applies(x: torch.Tensor, hidden: int, norm_weight: torch.Tensor, *layers: torch.nn.Module) -> bool:
    """Whether a layer of width ``hidden`` runs its branch ends through ``res_norm_linear`` for
    input row x: switched on, rows wider than the norm prologue's (or ``all``), every one of
    ``layers`` a bias-free Linear of x's dtype with an enabled GEMV shape."""
    if not ON or not (ALL_WIDTHS or hidden > gemv.NORM_MAX_K):
        return False
    if not (x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and norm_weight.is_contiguous()):
        return False
    return all(isinstance(m, torch.nn.Linear) and m.bias is None and m.weight.stride(1) == 1
               and m.weight.dtype == x.dtype and gemv.enabled(*m.weight.shape) for m in layers)


def res_norm_linear(x: torch.Tensor, layer: torch.nn.Linear, residual: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s) * norm_weight, s)`` with ``s = residual + layer(x)`` (``silu``: x = [gate |
    up], the layer reads silu(gate) * up: the down projection), one launch."""
    w = layer.weight
    N, K = w.shape
    assert residual.shape == (1, N) and residual.is_contiguous() and x.shape[1] == (2 * K if silu else K)
    mode, kw = pdl.launch(x.device)
    bn, bk, nw = gemv.tile(N, K, mode)
    s = torch.empty((1, N), dtype=x.dtype, device=x.device)
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    kernel = _res_norm_silu_gemv_kernel if silu else _res_norm_gemv_kernel
    kernel[(triton.cdiv(N, bn),)](x, w, residual, norm_weight, s, y, _counter(x.device), N, w.stride(0), eps, K=K,
                                  BLOCK_N=bn, BLOCK_K=bk, EVEN=N % bn == 0 and K % bk == 0,
                                  N_PAD=triton.next_power_of_2(N), PDL=mode, EVICT=gemv.EVICT_FIRST, num_warps=nw,
                                  num_stages=3, **kw)
    return y, s
