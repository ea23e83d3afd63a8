"""Multi-head latent attention (DeepSeek-V2/V3) over the paged latent cache.

Per token the layer caches only ``c_KV = kv_a_layernorm(x W_DKV)`` (``kv_lora_rank``) and the
shared RoPE key ``k_pe`` (``qk_rope_head_dim``): spec ``MLA``. Per-head keys and values are
recovered from the latent by ``kv_b_proj`` = [W_UK; W_UV] per head, either explicitly
("naive") or folded into the query and output ("absorbed"); see
``qkv.attention.mla_reference``. Both give the same result; ``mode`` picks one.

Mode: ``config.extra["mla_mode"]``, else env ``QKV_MLA_MODE``, else "absorbed"; it can be
changed per layer at any time (``layer.mode = "naive"``) since the cache is the same. On the
Triton backend "absorbed" means vLLM's choice per sequence: decodes absorbed (memory-bound),
prompt and chunk tokens up-projected (compute-bound; ``attention/triton/mla_step.py``);
"naive" runs the reference.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.attention import backend
from qkv.config import ModelConfig
from qkv.model.layers import RMSNorm, RotaryEmbedding
from qkv.model.yarn import softmax_scale_factor

MODES = ("naive", "absorbed")

# DeepSeek's latent norms use the HF default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def mla_mode(cfg: ModelConfig) -> str:
    mode = cfg.extra.get("mla_mode") or os.environ.get("QKV_MLA_MODE") or "absorbed"
    if mode not in MODES:
        raise ValueError(f"MLA mode must be one of {MODES}, got {mode!r}")
    return mode


class MLAAttention(nn.Module):
    is_attention = True
    attention_backend = "reference"  # the engine's choice, set by backend.use

    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, group: int):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = H = cfg.num_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk = self.nope + self.rope_dim
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, h, bias=cfg.qkv_bias)
        self.rope = rope
        # DeepSeek lays RoPE dims out in (even, odd) pairs; de-interleaving q and k alike turns
        # that into the rotate-half form without changing any q.k product.
        # V2 has no flag: always interleaved, as HF's V2, which ignores a rope_interleave in its config.
        self.interleave = cfg.model_type == "deepseek_v2" or cfg.extra.get("rope_interleave") is not False
        self.scale = qk ** -0.5 * softmax_scale_factor(cfg.rope_scaling)
        self.mode = mla_mode(cfg)
        self.layer, self.group = layer, group
        self.kv_cache: torch.Tensor | None = None  # bound by the runner: [blocks, block_size, R + P]

    def _deinterleave(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1) if self.interleave else x

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, R], W_UV [H, v, R]) as views of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope], w[:, self.nope:]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        T = x.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(T, self.num_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe, k_pe = self.rope(positions, self._deinterleave(q_pe), self._deinterleave(k_pe)[:, None, :],
                               batch=batch)
        w_uk, w_uv = self.up_weights()
        out = backend.mla_attention(q_nope, q_pe, c_kv, k_pe[:, 0], self.kv_cache, batch, self.group,
                                    self.scale, w_uk, w_uv, absorbed=self.mode == "absorbed",
                                    name=self.attention_backend)
        return self.o_proj(out.reshape(T, self.num_heads * self.v_dim))
