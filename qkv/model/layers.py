"""Building blocks shared by the model files: norms, rotary embeddings, MLPs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fused_ops(x: torch.Tensor):
    """The Triton fused ops (qkv.attention.triton.fused) for a CUDA tensor when triton is
    installed, else None: the torch code below then runs, as it always does on the CPU."""
    if not x.is_cuda:
        return None
    from qkv.attention.triton import fused_ops as get

    return get()


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; on CUDA a one-row x may go through the Triton GEMV (see triton/gemv.py)."""
    fused = fused_ops(x)
    return layer(x) if fused is None else fused.linear(x, layer)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. ``offset=1`` is Gemma's ``x * (1 + w)`` form."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_ops(x)
        if fused is not None:
            return fused.rms_norm(x, self.weight, self.eps, self.offset)
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps), one op
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + x), residual + x)``; one fused kernel on the GPU."""
        fused = fused_ops(x)
        if fused is not None:
            return fused.add_rms_norm(x, residual, self.weight, self.eps, self.offset)
        residual = residual + x
        return self(residual), residual


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})") from None


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU: down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden: int, inter: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = activation(act)
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_ops(x) if self.act_name == "silu" else None
        if fused is not None:
            gate_up = fused.linear(x, self.gate_up_proj)
            out = fused.silu_mul_linear(gate_up, self.down_proj)
            return out if out is not None else fused.linear(fused.silu_mul(gate_up), self.down_proj)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale (attention factor) for a RoPE variant."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        from qkv.model.yarn import yarn_inv_freq

        return yarn_inv_freq(dim, base, scaling)
    raise ValueError(f"unsupported RoPE scaling {kind!r}")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a cos/sin table grown on demand."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None, max_positions: int = 4096):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._memo: tuple | None = None  # (positions, cos, sin) of the current step
        self._build(max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos() * self.attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * self.attention_factor, persistent=False)
        self._memo = None

    def ensure(self, max_position: int) -> None:
        """Grow the table past ``max_position`` (called by the runner, never inside a graph)."""
        if max_position >= self.cos.shape[0]:
            self._build(max(2 * self.cos.shape[0], max_position + 1))

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x [T, heads, dim] by its token's position."""
        fused = fused_ops(xs[0])
        if fused is not None:
            if len(xs) == 2:
                return fused.rope_qk(positions, self.cos, self.sin, *xs)
            return tuple(fused.rope(positions, self.cos, self.sin, x) for x in xs)
        # Every layer rotates by the same positions within a step: look them up once.
        if self._memo is None or self._memo[0] is not positions:
            self._memo = (positions, self.cos[positions][:, None, :], self.sin[positions][:, None, :])
        _, cos, sin = self._memo
        out = []
        for x in xs:
            xf = x.float()
            x1, x2 = xf.chunk(2, dim=-1)
            rotated = torch.cat([-x2, x1], dim=-1)
            out.append((xf * cos + rotated * sin).to(x.dtype))
        return tuple(out)
