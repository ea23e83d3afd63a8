"""One attention module for MHA, GQA and MQA: the number of KV heads is the only difference.

Q has ``num_heads`` heads, K and V have ``num_kv_heads``; each KV head serves
``num_heads // num_kv_heads`` query heads (1 for MHA, all of them for MQA). The cache stores
only the KV heads, which is the whole memory saving of GQA and MQA.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.attention import backend
from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.kvcache.key_offset import key_offset
from qkv.kvcache.kv_pages import layout_of
from qkv.model import layers as _layers  # fused_ops looked up at call time: tests swap it there
from qkv.model.layers import RMSNorm, RotaryEmbedding, linear, qk_norm_rope


class Attention(nn.Module):
    attention_backend = "reference"  # the engine's choice, set by backend.use

    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding | None, group: int = 0,
                 scale: float | None = None, norm_offset: float = 0.0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, norm_offset)
        self.rope = rope
        self.layer, self.group = layer, group
        self.scale = scale if scale is not None else self.head_dim ** -0.5
        self.window = cfg.sliding_window if cfg.layer_types[layer] == "sliding" else None
        self.dilation = cfg.dilation[layer]  # 1 unless the window is dilated (attention_override.py)
        self.kv_cache: torch.Tensor | None = None  # bound by the runner: [2, blocks, block_size, kvh, d]
        self._k_offset: torch.Tensor | None = None  # int K planes of a biased model (kvcache/key_offset.py)

    def forward(self, x: torch.Tensor | None, positions: torch.Tensor, batch: AttentionBatch,
                qkv: torch.Tensor | None = None, project: bool = True) -> torch.Tensor:
        """``qkv``: ``qkv_proj(x)`` already computed (the norm fused into it, layers.norm_linear).
        ``project=False``: the attention output [T, H * D] before ``o_proj`` (the caller runs
        it, fused with the residual add: llama.py)."""
        if qkv is None:
            qkv = linear(self.qkv_proj, x)
        T = qkv.shape[0]
        if self.q_norm is None and self.rope is not None and qkv.is_cuda and _layers.fused_ops(qkv) is not None:
            from qkv.attention.triton import qk_decode

            if qk_decode.applies(self, qkv, batch):  # one launch for RoPE and the KV write (Llama)
                q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                out = qk_decode.attend(self, q.view(T, self.num_heads, self.head_dim),
                                       k.view(T, self.num_kv_heads, self.head_dim),
                                       v.view(T, self.num_kv_heads, self.head_dim), positions, batch, qkv)
                return self._project(out.reshape(T, self.q_size), project)
        if self.q_norm is None and self.rope is not None and not qkv.is_cuda:
            # Q and K sit side by side in the projection: rotate them as one [T, H + KVH, D]
            # tensor, half the ops of two calls (the CPU decode step is op-bound).
            H, D = self.num_heads, self.head_dim
            (qk,) = self.rope(positions, qkv[:, : self.q_size + self.kv_size].view(T, H + self.num_kv_heads, D),
                              batch=batch)
            q, k = qk.split([H, self.num_kv_heads], dim=1)
            v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, D)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
            v = v.view(T, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.rope is not None:
                if _layers.fused_ops(qkv) is not None:  # CUDA, triton installed
                    from qkv.attention.triton import qk_decode

                    if qk_decode.applies(self, qkv, batch):  # one launch for norms, RoPE and KV write
                        return self._project(qk_decode.attend(self, q, k, v, positions, batch, qkv)
                                             .reshape(T, self.q_size), project)
                q, k = qk_norm_rope(self.rope, positions, q, k, self.q_norm, self.k_norm, batch)
            else:
                if self.q_norm is not None:
                    q, k = self.q_norm(q), self.k_norm(k)
                if self.rope is not None:
                    q, k = self.rope(positions, q, k, batch=batch)
        offset = self._key_offset()
        if offset is not None:
            k = (k.float() - offset).to(k.dtype)
        out = backend.attention(q, k, v, self.kv_cache, batch, self.group, self.scale, self.window,
                                dilation=self.dilation, name=self.attention_backend)
        return self._project(out.reshape(T, self.q_size), project)

    def _project(self, out: torch.Tensor, project: bool) -> torch.Tensor:
        return linear(self.o_proj, out) if project else out

    def _key_offset(self) -> torch.Tensor | None:
        """The key bias's mean, removed before an integer K plane stores keys (softmax does not
        change: kvcache/key_offset.py); None for float caches and unbiased keys."""
        if self._k_offset is None:
            lay = layout_of(self.kv_cache) if self.kv_cache is not None else None
            if lay is None or len(lay.planes) != 2 or not lay.planes[0].fmt.is_int:
                return None
            bias = getattr(self.qkv_proj, "bias", None)
            if bias is None:
                return None
            kb = bias[self.q_size:self.q_size + self.kv_size].view(self.num_kv_heads, self.head_dim)
            self._k_offset = key_offset(kb, self.rope).to(kb.device)
        return self._k_offset
