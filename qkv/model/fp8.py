"""FP8 (e4m3) weights and activations for the linear layers: ``quantization="fp8"``.

On the GPU the long mixed steps are GEMM-bound (docs/benchmarks.md: the 768 x 1000/1000 run's
GEMMs at 94% of the bf16 matmul rate): the H200's fp8 tensor cores run twice the bf16 rate,
and the weights read half the bytes. Each linear's weight is rounded once, at load, to
float8_e4m3fn with one fp32 scale per output channel (``scale[o] = max|w[o, :]| / 448``);
each step's activations are rounded per row (token) the same way, dynamically, and the
product runs through ``torch._scaled_mm`` with row-wise scales (fp32 accumulation, fast by
default: ``FAST_ACCUM``; the two scales applied in its epilogue, bf16 out). The rounding of
one row: ``E4M3_MAX`` (448) maps to the row's largest magnitude, and every value keeps a
3-bit mantissa.

Kept in their float dtype: the embedding and the output projection (``lm_head``: the logits
are the layer most sensitive to rounding; vLLM's and TensorRT-LLM's fp8 checkpoints keep it
too). Models: the Llama family, Gemma 3 and GPT-2 (plain nn.Linear layers); MoE and MLA
models (DeepSeek) and the encoder-decoders are refused by name.

The CPU runs the same rounding as an emulation (``emulated_mm``: the e4m3 values widened to
fp32, an fp32 matmul, the scales after): slow, for measuring what the rounding costs
(``qkv perplexity MODEL --quantization fp8``), not for serving. A product of two e4m3 values
is exact in fp32, so the emulation differs from the GPU only in the order of its fp32 sums.

Batch-1 decode (one row) runs a GEMV over the e4m3 bytes instead (triton/fp8_gemv.py: the
row stays bf16 there, weight-only fp8; ``QKV_FP8_GEMV=0`` sends it through ``_scaled_mm``).
The bf16 path's fused batch-1 kernels (triton/gemv.py's norm prologue, tail_norm.py)
take only nn.Linear, so they step aside. The roundings fold into the kernels before them
where those are ours: the RMSNorm before qkv and gate/up rounds its own output (``norm_linear``,
Llama family) and the down projection's kernel computes silu(gate) * up itself
(``silu_mul_linear``), so neither bf16 output is written; only o_proj's input (the attention
output) has a rounding kernel of its own.
"""

from __future__ import annotations

import os

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TINY = 1e-12  # an all-zero row's scale: its values stay 0
ARCHS = ("llama", "gemma3", "gpt2")  # model families whose linears are plain nn.Linear
# _scaled_mm's fast accumulation (Hopper's fp8 MMA sums without the periodic promotion to fp32
# registers), on unless QKV_FP8_FAST_ACCUM=0. H200, 2026-12-04 (docs/benchmarks.md): the GEMMs
# 9-10% faster, the 768 x 1000/1000 run 14,752 -> 15,264-15,352 out tok/s; the products' norm
# error against float64 1.7e-3 -> 2.1e-3 (K = 4096) and 3.3e-3 (K = 14336), a tenth of what the
# e4m3 rounding of the operands already costs (3.7e-2). vLLM's fp8 kernels accumulate so too.
FAST_ACCUM = os.environ.get("QKV_FP8_FAST_ACCUM", "1") == "1"
ROW_BLOCK = 4096  # rows of a weight rounded at once (an fp32 block of 4096 x 14336: 235 MB)


def check(config, device: torch.device) -> None:
    """ValueError, by name, for a model family fp8 does not cover."""
    arch = config.arch
    if arch not in ARCHS:
        why = {"deepseek": "its MLA attention and MoE experts have no fp8 path",
               "whisper": "encoder-decoder models have no fp8 path",
               "bart": "encoder-decoder models have no fp8 path"}.get(arch, "no fp8 path for this family")
        raise ValueError(f"quantization='fp8' does not support {config.model_type} ({why}); "
                         f"supported: {', '.join(ARCHS)} families")


@torch.no_grad()
def round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (e4m3 [M, K], fp32 scale [M, 1]) with
    ``scale = max|x_row| / 448``, ``q = e4m3(x / scale)`` rounded to nearest (torch ops;
    on CUDA ``quantize_rows`` uses the one-kernel version of the same)."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).clamp_(min=TINY).div_(E4M3_MAX)
    return (xf / s).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), s


@torch.no_grad()
def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K], fp32 scale [N]): ``round_rows`` of the weight, one scale per
    output channel, ``ROW_BLOCK`` rows at a time (no fp32 copy of the whole matrix)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=E4M3, device=w.device)
    scale = torch.empty(n, dtype=torch.float32, device=w.device)
    for r in range(0, n, ROW_BLOCK):
        q[r:r + ROW_BLOCK], s = round_rows(w[r:r + ROW_BLOCK])
        scale[r:r + ROW_BLOCK] = s[:, 0]
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``round_rows``, in one Triton kernel on CUDA (one read of x, one e4m3 write: the torch
    ops are five passes over it), the torch ops elsewhere."""
    if x.is_cuda:
        from qkv.attention.triton.fp8_rows import quantize_rows as kernel

        return kernel(x)
    return round_rows(x)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K] and its scales ([N] or [N, 1]) -> fp32 [N, K]."""
    return q.float() * scale.reshape(-1, 1)


def emulated_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the GPU computes for ``x @ (q * scale)^T``, in fp32: x's rows rounded to e4m3
    (``round_rows``), the e4m3 values multiplied in fp32, both scales applied after."""
    xq, xs = round_rows(x)
    return (xq.float() @ q.float().t()).mul_(xs).mul_(scale.reshape(1, -1))


def scaled_mm(x: torch.Tensor, q: torch.Tensor, scale_row: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """x [M, K] (CUDA, 16-bit) @ (q [N, K] e4m3 * scale_row [1, N])^T -> bf16 [M, N]: x rounded
    per row (``quantize_rows``; ``silu``: x is [gate | up], the rows are silu(gate) * up),
    ``torch._scaled_mm`` with row-wise scales."""
    if silu:
        from qkv.attention.triton.fp8_rows import quantize_rows as kernel

        xq, xs = kernel(x, silu=True)
    else:
        xq, xs = quantize_rows(x)
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale_row, out_dtype=torch.bfloat16,
                            use_fast_accum=FAST_ACCUM)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of [.., 2K] = [gate | up], in its dtype (as GatedMLP computes it)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class Fp8Linear(nn.Module):
    """``y = x @ (w_e4m3 * scale)^T + b`` with x rounded per row to e4m3 (module docstring).
    ``weight_fp8`` [N, K] e4m3 and ``scale`` [1, N] fp32 are buffers: ``Module.to(dtype)``
    leaves them as they are."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.out_features, self.in_features = w.shape
        if w.is_cuda and (self.in_features % 16 or self.out_features % 16):  # _scaled_mm's rule
            raise ValueError(f"quantization='fp8' needs linear shapes divisible by 16 on the GPU, "
                             f"got {self.out_features} x {self.in_features}")
        q, scale = quantize_weight(w)
        self.register_buffer("weight_fp8", q)
        self.register_buffer("scale", scale.reshape(1, -1).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda:
            x2 = x2 if x2.is_contiguous() else x2.contiguous()
            from qkv.attention.triton import fp8_gemv

            if fp8_gemv.fits(x2, self.in_features):  # one row: weight-only, over the e4m3 bytes
                y = fp8_gemv.fp8_gemv(x2, self.weight_fp8, self.scale)
            else:
                y = scaled_mm(x2, self.weight_fp8, self.scale)
        else:
            y = emulated_mm(x2, self.weight_fp8, self.scale)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(self(rms_norm(residual + x)), residual + x)`` (no residual: of ``rms_norm(x)``, and
        x) with the norm and the rows' rounding in one kernel (triton/fp8_rows.py ``norm_rows``),
        for several CUDA rows of 16-bit x; None elsewhere (one row: the GEMV reads the bf16 norm)."""
        if (not x.is_cuda or x.dim() != 2 or x.shape[0] < 2 or x.shape[1] != self.in_features
                or x.dtype not in (torch.bfloat16, torch.float16) or x.stride(1) != 1
                or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                              or residual.stride(1) != 1))):
            return None
        from qkv.attention.triton.fp8_rows import norm_rows

        xq, xs, residual = norm_rows(x, residual, norm_weight, eps)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.scale, out_dtype=torch.bfloat16,
                             use_fast_accum=FAST_ACCUM).to(x.dtype)
        return (y if self.bias is None else y + self.bias), residual

    def silu_mul_linear(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """``self(silu(gate) * up)`` for [M, 2K] = [gate | up] on CUDA in one rounding kernel
        (or the batch-1 GEMV) plus the product; None elsewhere (the caller runs the two steps)."""
        if not gate_up.is_cuda or gate_up.dim() != 2 or gate_up.shape[1] != 2 * self.in_features:
            return None
        gate_up = gate_up if gate_up.is_contiguous() else gate_up.contiguous()
        from qkv.attention.triton import fp8_gemv

        if fp8_gemv.fits(gate_up, self.in_features, silu=True):
            y = fp8_gemv.fp8_gemv(gate_up, self.weight_fp8, self.scale, silu=True)
        else:
            y = scaled_mm(gate_up, self.weight_fp8, self.scale, silu=True)
        y = y.to(gate_up.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 weights, per-row scales"


def quantize(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``model`` but ``lm_head`` with an ``Fp8Linear``, in place;
    each bf16 weight is freed as its e4m3 copy is made."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(module, name, Fp8Linear(child))
                del child
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    return model
