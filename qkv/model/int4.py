"""Weight-only int4 for the CPU decode path: torch's own packed-int4 kernel, groups of 32.

Batch-1 decode on a CPU reads every weight once per token, so its speed is the weights'
bytes: 4 bits plus a bf16 scale and zero per 32 weights is 5 bits a weight, against 8.5
for int8 with per-row scales (model/quant.py) and 16 for bf16. The matmul is
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (ATen's AVX-512/AVX2 kernel) on weights
packed by ``_convert_weight_to_int4pack_for_cpu``; activations are bf16.

The rounding is asymmetric per group of 32 along the input dimension, ``w ≈ q * scale + min``
with q in 0..15: the layout of GGUF's Q4_1 and of Q4_K's sub-blocks, so weights that came
from such a file are recovered up to the bf16 rounding of scale and min.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32


def supports(linear: nn.Linear) -> bool:
    """Whether the kernel takes this layer's shape (the input dimension a multiple of GROUP)."""
    return linear.in_features % GROUP == 0


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed int4 weight, scales_and_zeros [K/32, N, 2] bf16) for the kernel,
    which computes ``(q - 8) * scale + zero``; zero is therefore ``min + 8 * scale``."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    # Round with the scale and min the kernel will actually see (bf16), so the levels line up.
    scale, lo = scale.to(torch.bfloat16).float(), lo.to(torch.bfloat16).float()
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


class Int4Linear(nn.Module):
    """``y = x @ dequant(w_int4)^T + b``; x is computed in bf16 (cast in and out if it is not)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not supports(linear):
            raise ValueError(f"int4 weights need in_features divisible by {GROUP}, got {linear.in_features}")
        packed, scales_zeros = pack(linear.weight.detach())
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])  # the engine's [T, K]: no reshapes, ops cost
        if dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, GROUP, self.scales_zeros)
        if self.bias is not None:
            y += self.bias
        if x.dim() != 2:
            y = y.view(*shape[:-1], self.out_features)
        return y if dtype == torch.bfloat16 else y.to(dtype)
