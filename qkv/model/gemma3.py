"""Gemma 3 text models: 5 sliding-window layers to each global one, MQA/GQA, q/k norm.

What differs from Llama, and why each matters for parity with HF:
  - RMSNorm is ``x * (1 + w)`` (RMSNorm(offset=1)); there are four per layer: before and
    after attention, before and after the MLP (the "sandwich").
  - Embeddings are multiplied by ``sqrt(hidden)`` rounded to the model dtype, as HF does.
  - q is scaled by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``.
  - Sliding layers use the local RoPE base (10k); global layers the global base (1M) and
    any RoPE scaling. The window itself lives in the layer's cache spec and ``Attention.window``.
  - The MLP is GeGLU with tanh-approximated GELU; final logits may be soft-capped.

Cache: global layers hold every token (FullAttention); sliding layers hold at most
``ceil(512 / block_size) + 1`` blocks (SlidingWindow), so their KV stays constant however
long the sequence: a ring without prefix caching, a window table whose old blocks go back to
the pool (keyed) with it. A prefix hit then serves both kinds of layer (KVCacheManager).
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.model.attention import Attention
from qkv.model.base import CausalLM
from qkv.model.layers import GatedMLP, RMSNorm, RotaryEmbedding


class Gemma3Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, group: int):
        super().__init__()
        eps, h = cfg.norm_eps, cfg.hidden_size
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.self_attn = Attention(cfg, layer, rope, group, scale=scale, norm_offset=1.0)
        self.mlp = GatedMLP(h, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, batch))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Body(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # RoPE tables are shared by all layers of a kind: two tables, not one per layer.
        global_rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      max_position_embeddings=cfg.max_position_embeddings)
        local_rope = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta or 10000.0, None)
        self.layers = nn.ModuleList(
            Gemma3Layer(cfg, i, local_rope if cfg.layer_types[i] == "sliding" else global_rope, groups[i])
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, offset=1.0)


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__(cfg)
        bad = set(cfg.layer_types) - {"full", "sliding"}
        if bad:
            raise ValueError(f"Gemma 3 layers are 'full' or 'sliding', got {sorted(bad)}")
        if any(t == "sliding" for t in cfg.layer_types) and not cfg.sliding_window:
            raise ValueError("Gemma 3 config has sliding layers but no sliding_window")
        self.model = Gemma3Body(cfg, groups)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.embed_scale = cfg.hidden_size ** 0.5

    def embedding_weight(self) -> nn.Parameter:
        return self.model.embed_tokens.weight

    def hf_name(self, name: str) -> str | None:
        if "rotary_emb" in name:
            return None
        # Multimodal checkpoints (Gemma3ForConditionalGeneration) nest the text model.
        for prefix in ("model.language_model.", "language_model.model.", "language_model."):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                return rest if rest.startswith("lm_head") else "model." + rest
        if name.startswith(("vision_tower", "multi_modal_projector", "model.vision_tower",
                            "model.multi_modal_projector")):
            return None
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # HF rounds the scale to the activation dtype before multiplying; so do we (bf16 parity).
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.model.layers:
            x = layer(x, positions, batch)
        return self.model.norm(x)
