"""Attention modules every encoder-decoder model shares (Whisper, BART), with HF's names.

- ``EncoderAttention``: bidirectional, over one request's (or one padded batch's) encoder
  input; nothing is cached.
- ``DecoderSelfAttention``: causal, through the paged cache like every decoder-only model.
- ``DecoderCrossAttention``: the decoder's queries against the encoder output's K/V in the
  cross pages (kvcache/cross.py); ``write`` stores them once, when the request's encoder runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.attention import backend
from qkv.attention.batch import AttentionBatch
from qkv.attention.cross import attend, write_cross_kv
from qkv.model import cpu_gemv
from qkv.model.cpu_layout import fuse_column_major


def check_cache_groups(name: str, cfg, groups: list[int]) -> None:
    """An encoder-decoder model has a cache layer per decoder self-attention layer (0..L-1) and
    per cross-attention layer (L..2L-1, kvcache/cross.py): ``groups`` names one group for each."""
    if len(groups) != 2 * cfg.num_layers:
        raise ValueError(f"{name} needs a cache group per self- and cross-attention layer "
                         f"({2 * cfg.num_layers}), got {len(groups)}")


class _Proj(nn.Module):
    """q, k, v and out projections with HF's names (Whisper's k has no bias, BART's has)."""

    def __init__(self, d: int, heads: int, k_bias: bool = False):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=k_bias)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.heads, self.head_dim = heads, d // heads
        self.scale = self.head_dim ** -0.5


class EncoderAttention(_Proj):
    """Bidirectional attention over one batch of encoder inputs [B, S, d]; not cached."""

    def __init__(self, d: int, heads: int, k_bias: bool = False):
        super().__init__(d, heads, k_bias)
        self._qkv: tuple[torch.Tensor, torch.Tensor] | None = None  # fused W^T and bias (fuse_cpu)

    def fuse_cpu(self) -> None:
        """q, k and v as one GEMM on the CPU, as DecoderSelfAttention's."""
        self._qkv = fuse_column_major([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        fused = self._qkv
        if fused is not None and fused[0].data_ptr() == self.q_proj.weight.data_ptr():  # still its views
            qkv = torch.addmm(fused[1], x.reshape(B * S, d), fused[0]).view(B, S, 3, self.heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, d))


class DecoderSelfAttention(_Proj):
    """Causal self-attention through the paged cache (the attention backend writes it)."""

    is_attention = True
    attention_backend = "reference"  # the engine's choice, set by backend.use

    def __init__(self, d: int, heads: int, layer: int, group: int, k_bias: bool = False):
        super().__init__(d, heads, k_bias)
        self.layer, self.group, self.window = layer, group, None
        self.kv_cache: torch.Tensor | None = None  # bound by the runner
        self._qkv: tuple[torch.Tensor, torch.Tensor] | None = None  # fused W^T and bias (fuse_cpu)

    def fuse_cpu(self) -> None:
        """q, k and v as one column-major GEMV on the CPU (model/cpu_layout.py); the three
        projections keep their weights, as views of the fused matrix."""
        self._qkv = fuse_column_major([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        T = x.shape[0]
        fused = self._qkv
        if fused is not None and fused[0].data_ptr() == self.q_proj.weight.data_ptr():  # still its views
            q, k, v = cpu_gemv.addmm(fused[1], x, fused[0]).view(T, 3, self.heads, self.head_dim).unbind(1)
        else:
            q, k, v = (p(x).view(T, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = backend.attention(q, k, v, self.kv_cache, batch, self.group, self.scale, name=self.attention_backend)
        return self.out_proj(out.reshape(T, -1))


class DecoderCrossAttention(_Proj):
    """Attention from the decoder's tokens to the encoder output's K/V in the cross pages."""

    is_attention = True
    attention_backend = "reference"  # the engine's choice, set by backend.use

    def __init__(self, d: int, heads: int, layer: int, group: int, k_bias: bool = False):
        super().__init__(d, heads, k_bias)
        self.layer, self.group, self.window = layer, group, None
        self.kv_cache: torch.Tensor | None = None  # bound by the runner: this layer's cross cache

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.heads, self.head_dim)
        return self.out_proj(attend(q, self.kv_cache, batch, self.group, self.scale,
                                           name=self.attention_backend).reshape(T, -1))

    def write(self, enc: torch.Tensor, slots: torch.Tensor) -> None:
        """Project encoder rows [N, d] to K/V and store them at ``slots`` [N]."""
        N = enc.shape[0]
        k = self.k_proj(enc).view(N, self.heads, self.head_dim)
        v = self.v_proj(enc).view(N, self.heads, self.head_dim)
        write_cross_kv(self.kv_cache, k, v, slots)
