"""Building blocks shared by the model files: norms, rotary embeddings, MLPs."""

from __future__ import annotations

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


def linear(layer: nn.Linear, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``layer(x)`` (then ``.to(out_dtype)``); on CUDA a one-row x may go through the Triton
    GEMV (see triton/gemv.py), which then stores the widened result itself."""
    fused = fused_ops(x)
    if fused is not None:
        return fused.linear(x, layer, out_dtype)
    y = layer(x)
    return y if out_dtype is None else y.to(out_dtype)


def norm_linear(norm: "RMSNorm", layer: nn.Linear, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(layer(h), residual')`` with ``h, residual' = norm.add_norm(x, residual)`` (no residual:
    ``norm(x)``, and residual' = x) in one Triton kernel for a one-row CUDA x of an enabled
    shape (triton/gemv.py); None where that does not apply (the caller runs the two steps)."""
    fused = fused_ops(x)
    if fused is None or norm.offset:
        return None
    own = getattr(layer, "norm_linear", None)  # a layer of its own kind (model/fp8.py's: rows > 1)
    if own is not None:
        return own(x, residual, norm.weight, norm.eps)
    return fused.norm_linear(x, residual, norm.weight, norm.eps, layer)


# Rows from which RMSNorm of a 16-bit x widens its weight itself (below, one op is cheaper).
MANY_ROWS = 64


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
        if not self.offset and dtype == self.weight.dtype:
            if dtype != torch.float32 and not torch.compiler.is_compiling() and x.numel() >= MANY_ROWS * x.shape[-1]:
                # F.rms_norm's steps, bit for bit, with the weight widened first: its float32 x
                # times a 16-bit weight is a mixed-dtype op, which the CPU runs unvectorized
                # (512 x 576 bf16: 0.39 -> 0.15 ms).
                xf = x.float()
                r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))
                return xf.mul_(r).mul_(self.weight.float()).to(dtype)
            # One op: it computes in float32 for a 16-bit x and multiplies by the weight before
            # rounding, as HF does in float32 (and bitwise as ``weight * norm(x)`` there).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
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

    def forward(self, x: torch.Tensor | None, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """``gate_up``: this layer's ``gate_up_proj(x)``, already computed (``norm_linear``)."""
        fused = fused_ops(x if gate_up is None else gate_up) if self.act_name == "silu" else None
        if fused is not None:
            gate_up = fused.linear(x, self.gate_up_proj) if gate_up is None else gate_up
            out = fused.silu_mul_linear(gate_up, self.down_proj)
            return out if out is not None else fused.linear(fused.silu_mul(gate_up), self.down_proj)
        gate, up = (self.gate_up_proj(x) if gate_up is None else gate_up).chunk(2, dim=-1)
        return self.down_proj(self.act(gate).mul_(up))  # in place: one allocation less per layer


# ---------------------------------------------------------------------------- RoPE
from qkv.model.rope import (fixed_long_inv_freq, length_threshold, long_inv_freq,  # noqa: E402  (re-exported)
                            rope_inv_freq)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) with a cos/sin table grown on demand.

    ``dynamic`` and ``longrope`` scaling change the frequencies with the sequence length
    (see qkv/model/rope.py); those need ``batch`` in ``forward`` to know each token's
    sequence length, and compute cos/sin per token instead of reading the table."""

    def __init__(self, dim: int, base: float, scaling: dict | None = None, max_positions: int = 4096,
                 max_position_embeddings: int = 2048):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, base, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.threshold = length_threshold(scaling, max_position_embeddings)
        self._long_args = (dim, base, scaling, max_position_embeddings)
        self.register_buffer("long_inv", fixed_long_inv_freq(dim, base, scaling), persistent=False)
        self._memo: tuple | None = None  # (positions, index, cos, sin) of the current step
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

    def _per_length(self, positions: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row index, cos [T, dim], sin [T, dim]) with each token's frequencies chosen by its
        sequence's length after this step; no host sync, so it may run inside a CUDA graph."""
        if batch is None:
            raise ValueError("dynamic/longrope RoPE needs the AttentionBatch (sequence lengths)")
        T = positions.shape[0]
        rows = torch.arange(T, device=positions.device)
        if batch.is_decode:
            seq_len = positions + 1
        else:
            seq = torch.searchsorted(batch.query_start_loc[1:], rows, right=True).clamp(max=batch.num_seqs - 1)
            seq_len = (batch.num_computed + batch.query_lens)[seq]
        long = (self.long_inv[None].expand(T, -1) if self.long_inv is not None
                else long_inv_freq(*self._long_args, seq_len))
        inv = torch.where((seq_len > self.threshold)[:, None], long, self.inv_freq[None])
        freqs = positions.float()[:, None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return rows, emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    def _tables(self, positions: torch.Tensor, batch) -> list:
        """[positions, index, cos table, sin table, gathered cos, gathered sin] of this step.
        Every layer rotates by the same positions within a step: computed once per step."""
        if positions.is_cuda and self.threshold is not None:
            # Not memoized: a memo made by a warm-up step on the same static buffers would be
            # skipped when a CUDA graph is captured, and replays would reuse stale frequencies.
            return [positions, *self._per_length(positions, batch), None, None]
        if self._memo is None or self._memo[0] is not positions:
            if self.threshold is None:
                self._memo = [positions, positions, self.cos, self.sin, None, None]
            else:
                self._memo = [positions, *self._per_length(positions, batch), None, None]
        return self._memo

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor, batch=None) -> tuple[torch.Tensor, ...]:
        """Rotate each x [T, heads, dim] by its token's position."""
        memo = self._tables(positions, batch)
        _, index, cos_t, sin_t = memo[:4]
        fused = fused_ops(xs[0])
        if fused is not None:
            if len(xs) == 2:
                return fused.rope_qk(index, cos_t, sin_t, *xs)
            return tuple(fused.rope(index, cos_t, sin_t, x) for x in xs)
        if memo[4] is None:
            memo[4], memo[5] = cos_t[index][:, None, :], sin_t[index][:, None, :]
        return tuple(rotate(x, memo[4], memo[5]) for x in xs)


def qk_norm_rope(rope: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 q_norm: RMSNorm, k_norm: RMSNorm, batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope(positions, q_norm(q), k_norm(k))`` (Qwen3's per-head norms, then RoPE): one Triton
    launch on CUDA, else the three steps."""
    fused = fused_ops(q)
    if (fused is not None and fused.FUSE_QK_NORM_ROPE and not q_norm.offset and not k_norm.offset
            and q_norm.eps == k_norm.eps):
        _, index, cos_t, sin_t = rope._tables(positions, batch)[:4]
        return fused.qk_norm_rope(index, cos_t, sin_t, q, k, q_norm.weight, k_norm.weight, q_norm.eps)
    return rope(positions, q_norm(q), k_norm(k), batch=batch)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotation of x [T, heads, dim] by cos/sin [T, 1, dim], computed in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
