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
def _rows_kernel(X, Q, S, K, stride_x, stride_q, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, SILU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    q_row = Q + row * stride_q
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(CHUNKS):
        amax = tl.maximum(amax, tl.abs(_load(x_row, c * BLOCK + offs, K, SILU)))
    s = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
    for c in range(CHUNKS):
        k = c * BLOCK + offs
        y = tl.minimum(tl.maximum(tl.math.div_rn(_load(x_row, k, K, SILU), s), -448.0), 448.0)
        tl.store(q_row + k, y.to(Q.dtype.element_ty), mask=k < K)
    tl.store(S + row, s)


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
    block = min(2048, triton.next_power_of_2(K))
    _rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, CHUNKS=triton.cdiv(K, block), SILU=silu,
                       num_warps=4 if block <= 1024 else 8)
    return q, s
