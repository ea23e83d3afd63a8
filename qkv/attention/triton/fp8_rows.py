"""Per-row e4m3 rounding of activations in one kernel (model/fp8.py's ``round_rows``).

The torch ops (widen, abs, amax, divide, clamp, cast) pass over an [M, K] activation five
times; an 8192-token mixed step of Llama-8B rounds 4 such inputs per layer. Here one
program takes one row: a first loop finds max|x| (the row stays in L1/L2: K <= 14336 bf16 is
28 KB), a second writes ``e4m3(x / s)`` with ``s = max|x| / 448``, and the scale is stored as
fp32. The division is IEEE round-to-nearest (``div_rn``), as torch's, so the e4m3 codes
equal ``round_rows``' (tests/test_fp8.py, under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load(x_row, k, K, SILU: tl.constexpr):
    """Chunk k of the row in fp32; ``SILU``: the row is [gate | up] (2K wide) and the chunk is
    silu(gate) * up, rounded where torch rounds it (silu's output, then the product)."""
    x = tl.load(x_row + k, mask=k < K, other=0.0)
    if SILU:
        u = tl.load(x_row + K + k, mask=k < K, other=0.0)
        g = x.to(tl.float32)
        a = (g * tl.sigmoid(g)).to(u.dtype).to(tl.float32)
        return (a * u.to(tl.float32)).to(u.dtype).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def _store_rounded(q_row, k, K, x, s):
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0)
    tl.store(q_row + k, y.to(q_row.dtype.element_ty), mask=k < K)


@triton.jit
def _rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, SILU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    q_row = Q + row * stride_q
    offs = tl.arange(0, BLOCK)
    if CHUNKS == 1:  # the row in registers: one load (a decode step's rows are latency-bound)
        x = _load(x_row, offs, K, SILU)
        s = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / 448.0
        _store_rounded(q_row, offs, K, x, s)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(CHUNKS):
            amax = tl.maximum(amax, tl.abs(_load(x_row, c * BLOCK + offs, K, SILU)))
        s = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
        for c in range(CHUNKS):
            _store_rounded(q_row, c * BLOCK + offs, K, _load(x_row, c * BLOCK + offs, K, SILU), s)
    tl.store(S + row, s)


@triton.jit
def _norm_rows_kernel(X, R, W, Q, S, RO, stride_x, stride_r, stride_q, stride_ro, N, eps,
                      BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    """fused._add_rms_norm_kernel's math and roundings (no offset), its bf16 output rounded
    per row to e4m3 instead of stored."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (r + x.to(tl.float32)).to(RO.dtype.element_ty)  # the residual stream, rounded as torch's add
        tl.store(RO + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)).to(x.dtype).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(y), 0), 1e-12) / 448.0
    _store_rounded(Q + row * stride_q, cols, N, y, s)
    tl.store(S + row, s)


def norm_rows(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scales [T, 1], residual + x) of ``rms_norm(residual + x)`` (no residual:
    of ``rms_norm(x)``, and x itself third): RMSNorm (no offset) and the rounding in one kernel,
    its bf16 output never stored. x, residual [T, N] with contiguous rows."""
    T, N = x.shape
    assert x.stride(1) == 1 and (residual is None or (residual.shape == x.shape and residual.stride(1) == 1))
    q = torch.empty((T, N), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    ro = torch.empty_like(x) if residual is not None else x
    if T:
        block = triton.next_power_of_2(N)
        r = residual if residual is not None else x
        _norm_rows_kernel[(T,)](x, r, weight, q, s, ro, x.stride(0), r.stride(0), q.stride(0), ro.stride(0), N, eps,
                                BLOCK=block, HAS_RES=residual is not None, num_warps=8 if block >= 2048 else 4)
    return q, s, ro


def quantize_rows(x: torch.Tensor, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]); x's rows must be contiguous. ``silu``:
    x is [M, 2K] = [gate | up] and the rows rounded are silu(gate) * up (the down projection's
    input: one kernel instead of the SiLU-and-mul's and this one)."""
    M, K = x.shape
    K = K // 2 if silu else K
    assert x.stride(1) == 1
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block = triton.next_power_of_2(K)
    block = block if block <= 8192 else 2048  # whole rows in registers up to 8K (one load), else chunks
    _rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, CHUNKS=triton.cdiv(K, block), SILU=silu,
                       num_warps=4 if block <= 1024 else 8)
    return q, s
