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

from qkv.attention.triton import gemv, l2_prefetch, pdl
from qkv.attention.triton.gemv import _fold, _row_sums, _silu_x, _v_chunk, _w_chunk

_MODE = os.environ.get("QKV_GEMV_TAIL_NORM", "1").strip().lower()
ON = _MODE != "0"
ALL_WIDTHS = _MODE == "all"
# The norm weight prefetched into L2 before the last program reads it (QKV_TAIL_NORM_PREFETCH=1;
# l2_prefetch.py; off: measured only with the two switches below, slower).
PF_NW = os.environ.get("QKV_TAIL_NORM_PREFETCH", "0") == "1"
# The last program's norm in TAIL_BLOCK-wide pieces over per-program partial sums of squares
# (QKV_TAIL_NORM_CHUNKED=1; off: with ROW_SUMS and the prefetches 236.4 against 244.6 tok/s on the
# H200, session 10): no whole-row vectors in the serial tail (4,096 floats a 128-thread program at
# Llama-8B's width). The sum of squares runs in another (fixed) order.
CHUNKED = os.environ.get("QKV_TAIL_NORM_CHUNKED", "0") == "1"
TAIL_BLOCK = int(os.environ.get("QKV_TAIL_NORM_BLOCK", "1024"))
# Row sums per weight chunk instead of a [BLOCK_N, BLOCK_K] accumulator (gemv._fold;
# QKV_TAIL_NORM_ROW_SUMS=1, off: measured slower): o_proj's kernel 78 -> 32 registers a thread
# (sm_90 ptxas, 16-byte-aligned arguments), all 1,024 programs at once, but the chunk loop is no
# longer software-pipelined: the 14-chunk down GEMV took 30.5 instead of 28.6 us (H200, session 10).
ROW_SUMS = os.environ.get("QKV_TAIL_NORM_ROW_SUMS", "0") == "1"
# MB of each half of the gate/up weight o_proj's programs prefetch into L2 after their wait
# (QKV_L2_PREFETCH_NEXT_MB; 0: off, the default: 8 MB measured slower, session 10): with o_proj's weight in L2
# (l2_prefetch.py) DRAM idles while o_proj runs; this fetches the rows gate/up's first programs read.
NEXT_MB = float(os.environ.get("QKV_L2_PREFETCH_NEXT_MB", "0"))


@triton.jit
def _res_norm_gemv_kernel(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN: tl.constexpr, N_PAD: tl.constexpr, PDL: tl.constexpr,
                          EVICT: tl.constexpr = False, NW_BYTES=0, PF_NW: tl.constexpr = False,
                          TPB: tl.constexpr = 128, P=None, NP_PAD: tl.constexpr = 0, TB: tl.constexpr = 0,
                          RED: tl.constexpr = 0, NX=None, NX_BYTES=0, NX_HALF=0, PF_NX: tl.constexpr = False):
    _res_norm_gemv(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K, BLOCK_N, BLOCK_K, EVEN, False, N_PAD, PDL, EVICT,
                   NW_BYTES, PF_NW, TPB, P, NP_PAD, TB, RED, NX, NX_BYTES, NX_HALF, PF_NX)


@triton.jit
def _res_norm_silu_gemv_kernel(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, EVEN: tl.constexpr, N_PAD: tl.constexpr, PDL: tl.constexpr,
                               EVICT: tl.constexpr = False, NW_BYTES=0, PF_NW: tl.constexpr = False,
                               TPB: tl.constexpr = 128, P=None, NP_PAD: tl.constexpr = 0, TB: tl.constexpr = 0,
                               RED: tl.constexpr = 0, NX=None, NX_BYTES=0, NX_HALF=0, PF_NX: tl.constexpr = False):
    # (its own name: profiles tell the down projection from o_proj)
    _res_norm_gemv(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K, BLOCK_N, BLOCK_K, EVEN, True, N_PAD, PDL, EVICT,
                   NW_BYTES, PF_NW, TPB, P, NP_PAD, TB, RED, NX, NX_BYTES, NX_HALF, PF_NX)


@triton.jit
def _res_norm_gemv(X, W, R, NW, S, Y, CNT, N, stride_w, eps, K: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN: tl.constexpr, SILU: tl.constexpr, N_PAD: tl.constexpr,
                   PDL: tl.constexpr, EVICT: tl.constexpr, NW_BYTES, PF_NW: tl.constexpr,
                   TPB: tl.constexpr, P, NP_PAD: tl.constexpr, TB: tl.constexpr, RED: tl.constexpr, NX, NX_BYTES,
                   NX_HALF, PF_NX: tl.constexpr):
    """s = r + x W^T (``SILU``: x = silu(g) * u of X = [g | u]); the last program: y = rmsnorm(s) * nw.
    ``PF_NW``: the program that finishes an eighth of the grid before the last brings nw into L2.
    ``TB`` > 0 (``CHUNKED``): each program stores the sum of squares of its rows in P, the last
    one sums those (NP_PAD wide, a fixed order) and normalizes the row TB elements at a time:
    no whole-row vectors, so fewer registers a program (more programs resident at once).
    ``RED`` (``ROW_SUMS``): see ``_fold``. ``PF_NX``: after the wait each program brings one
    128-byte line of the first NX_BYTES of both halves of NX (the next projection's [gate | up]
    weight, the second half NX_HALF elements on) into L2: the rows its first programs read."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    w = _w_chunk(W, n, 0, k, stride_w, N, K, EVEN, EVICT)
    pdl.sync(PDL)
    if PF_NX:
        l2_prefetch.lines(NX, NX_BYTES, pid * TPB, TPB)
        l2_prefetch.lines(NX + NX_HALF, NX_BYTES, pid * TPB, TPB)
    if SILU:
        acc = _fold(w.to(tl.float32) * _silu_x(X, 0, k, K, EVEN)[None, :], RED)
    else:
        acc = _fold(w.to(tl.float32) * _v_chunk(X, 0, k, K, EVEN).to(tl.float32)[None, :], RED)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if SILU:
            x = _silu_x(X, k0, k, K, EVEN)
        else:
            x = _v_chunk(X, k0, k, K, EVEN).to(tl.float32)
        acc += _fold(_w_chunk(W, n, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * x[None, :], RED)
    nm = n < N
    y = _row_sums(acc, RED).to(S.dtype.element_ty).to(tl.float32)  # the branch's output, rounded
    sn = (tl.load(R + n, mask=nm, other=0.0).to(tl.float32) + y).to(S.dtype.element_ty)
    tl.store(S + n, sn, mask=nm)
    if TB > 0:
        sf = tl.where(nm, sn.to(tl.float32), 0.0)
        tl.store(P + pid, tl.sum(sf * sf, 0))
    # The barrier orders every thread's stores before the counter's release; the last program
    # reads the row through L2 (.cg): no stale L1 line from an earlier replay.
    tl.debug_barrier()
    done = tl.atomic_add(CNT, 1, sem="acq_rel", scope="gpu")
    if PF_NW:  # the last program's norm weight: an L2 hit by the time it reads it, not a DRAM miss
        if done == tl.num_programs(0) - 1 - tl.num_programs(0) // 8:
            l2_prefetch.lines(NW, NW_BYTES, 0, TPB)
            if NW_BYTES > 128 * TPB:
                l2_prefetch.lines(NW, NW_BYTES, TPB, TPB)
    if TB > 0:
        if done == tl.num_programs(0) - 1:
            j = tl.arange(0, NP_PAD)
            ps = tl.load(P + j, mask=j < tl.num_programs(0), other=0.0, cache_modifier=".cg")
            rstd = tl.rsqrt(tl.sum(ps, 0) / N + eps)
            i = tl.arange(0, TB)
            for c in tl.static_range(0, N_PAD, TB):
                im = (c + i) < N
                s = tl.load(S + c + i, mask=im, other=0.0, cache_modifier=".cg").to(tl.float32)
                nw = tl.load(NW + c + i, mask=im, other=0.0).to(tl.float32)
                h = (s * rstd).to(Y.dtype.element_ty).to(tl.float32) * nw
                tl.store(Y + c + i, h.to(Y.dtype.element_ty), mask=im)
            tl.store(CNT, 0)
    elif done == tl.num_programs(0) - 1:
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
                    eps: float, silu: bool = False,
                    next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s) * norm_weight, s)`` with ``s = residual + layer(x)`` (``silu``: x = [gate |
    up], the layer reads silu(gate) * up: the down projection), one launch.
    ``next_weight``: the [gate | up] weight the next projection reads; with ``NEXT_MB`` > 0 the
    first ``NEXT_MB`` MB of each half are prefetched into L2 while this one runs (l2_prefetch.py)."""
    w = layer.weight
    N, K = w.shape
    assert residual.shape == (1, N) and residual.is_contiguous() and x.shape[1] == (2 * K if silu else K)
    mode, kw = pdl.launch(x.device)
    bn, bk, nw = gemv.tile(N, K, mode)
    s = torch.empty((1, N), dtype=x.dtype, device=x.device)
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    kernel = _res_norm_silu_gemv_kernel if silu else _res_norm_gemv_kernel
    pf = l2_prefetch.region(norm_weight) if PF_NW and l2_prefetch.supported(x.device) else None
    tpb = 32 * nw
    grid = triton.cdiv(N, bn)
    tb = min(TAIL_BLOCK, triton.next_power_of_2(N)) if CHUNKED else 0
    part = torch.empty(grid if tb else 1, dtype=torch.float32, device=x.device)
    nx = next_weight if NEXT_MB > 0 and next_weight is not None and l2_prefetch.supported(x.device) else None
    if nx is not None and (not nx.is_contiguous() or nx.shape[0] % 2 or nx.data_ptr() % 128):
        nx = None
    nx_bytes = min(int(NEXT_MB * 2**20), nx.numel() * nx.element_size() // 2) if nx is not None else 0
    kernel[(grid,)](x, w, residual, norm_weight, s, y, _counter(x.device), N, w.stride(0), eps, K=K, BLOCK_N=bn,
                    BLOCK_K=bk, EVEN=N % bn == 0 and K % bk == 0, N_PAD=triton.next_power_of_2(N), PDL=mode,
                    EVICT=gemv.EVICT_FIRST, NW_BYTES=pf[1] if pf else 0, PF_NW=pf is not None, TPB=tpb, P=part,
                    NP_PAD=triton.next_power_of_2(grid), TB=tb, RED=ROW_SUMS, NX=nx if nx is not None else w,
                    NX_BYTES=nx_bytes, NX_HALF=nx.numel() // 2 if nx is not None else 0, PF_NX=nx is not None,
                    num_warps=nw, num_stages=3, **kw)
    return y, s
