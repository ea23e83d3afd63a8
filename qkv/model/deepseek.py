"""DeepSeek-V2 / V3: MLA attention (latent cache) + dense or mixture-of-experts MLPs.

Wiring only: the attention is ``qkv.model.mla.MLAAttention``, the MoE ``qkv.model.moe.MoE``.
Layers ``< first_k_dense_replace`` (or all, without routed experts) use a dense SwiGLU MLP.
Weight names are HF's; V3 checkpoints' multi-token-prediction layers (index >= num_layers)
are skipped because next-token decoding does not use them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.model.base import CausalLM
from qkv.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from qkv.model.mla import MLAAttention


class DeepseekLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, group: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = MLAAttention(cfg, layer, rope, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.extra.get("n_routed_experts") and layer >= (cfg.extra.get("first_k_dense_replace") or 0):
            from qkv.model.moe import MoE

            self.mlp = MoE(cfg)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekBody(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling,
                               max_position_embeddings=cfg.max_position_embeddings)
        self.layers = nn.ModuleList(DeepseekLayer(cfg, i, rope, groups[i]) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class DeepseekForCausalLM(CausalLM):
    # MLA keeps q_proj separate (no fused qkv); only the MLPs' gate/up are fused.
    stacked = {".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}
    # Decode steps are graph-safe: absorbed MLA decode runs the Triton kernel, and the MoE
    # its fused, sync-free kernel (moe.py). Prompt/chunk steps run eager through the Triton
    # MLA extend path (attention/triton/mla_step.py).

    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__(cfg)
        missing = [n for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
                   if not getattr(cfg, n)]
        if missing or set(cfg.layer_types) != {"mla"}:
            raise ValueError(f"DeepSeek needs MLA on every layer and {missing or 'all MLA sizes'}")
        self.model = DeepseekBody(cfg, groups)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embedding_weight(self) -> nn.Parameter:
        return self.model.embed_tokens.weight

    def hf_name(self, name: str) -> str | None:
        if "rotary_emb" in name:
            return None
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= self.config.num_layers:
            return None  # V3 multi-token-prediction module
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, batch)
        return self.model.norm(x)
