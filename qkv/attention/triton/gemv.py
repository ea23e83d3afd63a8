"""Batch-1 matrix-vector product y = x W^T for the decode hot path.

cuBLAS picks a kernel per shape; at M = 1 it reads the large projections near the copy
bandwidth but the square 4096 x 4096 ``o_proj`` at about half of it (profile of a Llama-8B
decode step on the H100). This kernel streams W once, BLOCK_N rows per program, 16-byte
loads along K; ``ENABLED_SHAPES`` lists the (N, K) where the benchmarks found it faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (out_features, in_features) where the Triton GEMV replaces cuBLAS at M = 1. Empty = never.
# H100 (2026-11-22, benchmarks/gpu_bench.py): only the square o_proj of Llama-8B gained inside the
# model (cuBLAS 20.7 us, Triton 14.2 us); the larger projections were as fast or faster in cuBLAS.
# The down projection (4096 x 14336) runs fused with SiLU-and-mul (one launch instead of two).
# lm_head (128256 x 4096): 348 us against cuBLAS's 370-380 us.
ENABLED_SHAPES: set[tuple[int, int]] = {(4096, 4096), (4096, 14336), (128256, 4096)}


@triton.jit
def _gemv_kernel(X, W, Y, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(X + k0 + k).to(tl.float32)
        w = tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :]).to(tl.float32)
        acc += w * x[None, :]
    tl.store(Y + n, tl.sum(acc, 1).to(Y.dtype.element_ty))


@triton.jit
def _silu_gemv_kernel(GU, W, Y, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = (silu(g) * u) W^T with [g | u] = GU: the activation is applied while loading x,
    rounded where torch rounds it (silu's output, then the product)."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = tl.load(GU + k0 + k).to(tl.float32)
        u = tl.load(GU + K + k0 + k)
        a = (g * tl.sigmoid(g)).to(u.dtype).to(tl.float32)
        x = (a * u.to(tl.float32)).to(u.dtype).to(tl.float32)
        w = tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :]).to(tl.float32)
        acc += w * x[None, :]
    tl.store(Y + n, tl.sum(acc, 1).to(Y.dtype.element_ty))


def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int = 4, block_k: int = 1024,
         num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T -> [1, N]. N % block_n == 0 and K % block_k == 0 required."""
    N, K = weight.shape
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _gemv_kernel[(N // block_n,)](x, weight, y, K, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
                                  num_warps=num_warps, num_stages=num_stages)
    return y


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``layer(x)``, through the GEMV kernel when x is one row and the shape is enabled."""
    w = layer.weight
    if (x.shape[0] == 1 and layer.bias is None and tuple(w.shape) in ENABLED_SHAPES and x.is_contiguous()
            and w.shape[0] % 4 == 0 and w.shape[1] % 1024 == 0):
        return gemv(x, w)
    return layer(x)


def silu_mul_linear(gate_up: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor | None:
    """``layer(silu(gate) * up)`` for one row in one kernel when the shape is enabled, else None."""
    w = layer.weight
    N, K = w.shape
    if (gate_up.shape[0] != 1 or layer.bias is not None or (N, K) not in ENABLED_SHAPES
            or not gate_up.is_contiguous() or N % 4 or K % 1024):
        return None
    y = torch.empty((1, N), dtype=gate_up.dtype, device=gate_up.device)
    _silu_gemv_kernel[(N // 4,)](gate_up, w, y, K, w.stride(0), BLOCK_N=4, BLOCK_K=1024, num_warps=4, num_stages=3)
    return y
