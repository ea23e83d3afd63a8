"""Batch-1 product with e4m3 weights: y = (x W_e4m3^T) * scale, for ``quantization="fp8"``.

One decode row is bound by the weight bytes, and e4m3 halves them; ``torch._scaled_mm``'s
kernels are tiled for many rows (at M = 1 they read the weight well below the copy rate:
benchmarks/fp8_gemm_bench.py). Here each program streams BLOCK_N rows of the e4m3 weight in
16-byte loads, widens them to fp32, multiplies by the bf16 row, and applies the per-channel
scale in the epilogue. The row itself is not rounded to e4m3 (the batched path rounds it for
the fp8 tensor cores; here the multiply is on CUDA cores and rounding would only lose
precision), so batch 1 is weight-only fp8: its result is the product of x with the
dequantized weight, rounded once to x's dtype (model/fp8.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ON = os.environ.get("QKV_FP8_GEMV", "1") == "1"  # 0: batch 1 goes through _scaled_mm too


@triton.jit
def _fp8_gemv_kernel(X, W, S, Y, N, stride_w, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr, SILU: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            w = tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :], eviction_policy="evict_first")
            x = tl.load(X + k0 + k)
        else:
            km = (k0 + k) < K
            w = tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :], mask=(n < N)[:, None] & km[None, :],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(X + k0 + k, mask=km, other=0.0)
        if SILU:  # x = [gate | up]: silu(gate) * up, rounded where torch rounds it
            g = x.to(tl.float32)
            if EVEN:
                u = tl.load(X + K + k0 + k)
            else:
                u = tl.load(X + K + k0 + k, mask=(k0 + k) < K, other=0.0)
            a = (g * tl.sigmoid(g)).to(u.dtype).to(tl.float32)
            xf = (a * u.to(tl.float32)).to(u.dtype).to(tl.float32)
        else:
            xf = x.to(tl.float32)
        acc += w.to(tl.float32) * xf[None, :]
    s = tl.load(S + n, mask=n < N, other=0.0)
    tl.store(Y + n, (tl.sum(acc, 1) * s).to(Y.dtype.element_ty), mask=n < N)


def fits(x: torch.Tensor, k: int, silu: bool = False) -> bool:
    """Whether one row ``x`` (``[gate | up]`` with ``silu``) goes through this kernel."""
    return (ON and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and x.shape[1] == (2 * k if silu else k)
            and x.dtype in (torch.bfloat16, torch.float16))


def fp8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """x [1, K] (``silu``: [1, 2K], the layer reads silu(gate) * up) @ (q [N, K] e4m3 * scale
    [1, N])^T -> [1, N] in x's dtype."""
    N, K = q.shape
    block_n = 32 if INTERPRET else 8
    block_k = min(512, triton.next_power_of_2(K))
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(N, block_n),)](x, q, scale, y, N, q.stride(0), K=K, BLOCK_N=block_n,
                                                 BLOCK_K=block_k, EVEN=N % block_n == 0 and K % block_k == 0,
                                                 SILU=silu, num_warps=4)
    return y
