"""Weight-only int8 quantization for the CPU decode path.

On a CPU, batch-1 decode is bound by memory bandwidth: each token reads every weight once.
SmolLM2 is 540 MB per token in fp32 and 270 MB in bf16; int8 weights with one scale per
output channel read 135 MB. Activations stay in the model's dtype, so only the weights are
rounded (activation quantization, as in FBGEMM's dynamic int8, cost SmolLM2 3.5x in
perplexity). The matmul is torch's own ``_weight_int8pack_mm`` kernel, fastest with bf16
activations. `qkv perplexity --quantization int8` measures what the rounding costs.

``quantize`` also applies the other CPU weight formats: "int4" (model/int4.py; the lm_head
int8) and "bf16" (nothing to swap: the engine casts the model). Which one "auto" picks:
model/cpu_format.py.
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("int4", "int8", "bf16")


class Int8Linear(nn.Module):
    """``y = x @ (w_int8 * scale)^T + b``, with ``scale[o] = max|w[o, :]| / 127``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.scale.to(x.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize(model: nn.Module, method: str, device: torch.device) -> nn.Module:
    """Replace every nn.Linear of ``model`` in place (a tied lm_head gets its own int8 copy).
    "int4": int4 where the shape allows (model/int4.py), int8 for the lm_head and the rest."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} (have: {', '.join(METHODS)})")
    if device.type != "cpu":
        raise ValueError(f"quantization={method!r} is the CPU decode path; on a GPU use bfloat16")
    if method == "bf16":
        return model
    from qkv.model.int4 import Int4Linear, supports

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                int4 = method == "int4" and child_name != "lm_head" and supports(child)
                setattr(module, child_name, Int4Linear(child) if int4 else Int8Linear(child))
    return model
