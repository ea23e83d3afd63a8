"""The Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM2. Wiring only; the math is in layers.py."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.model.attention import Attention
from qkv.model.base import CausalLM
from qkv.model import layers as _layers  # fused_ops looked up at call time: tests swap it there
from qkv.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, norm_linear


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, group: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer, rope, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        self.hidden = cfg.hidden_size

    def forward(self, h: torch.Tensor | None, positions: torch.Tensor, batch: AttentionBatch,
                residual=None, next_norm: RMSNorm | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the stream's
        additions happen inside the next norm (``add_norm``), one fused kernel on the GPU.
        At batch 1 on CUDA with a wide hidden size they happen in the epilogue of the branch's
        last GEMV instead, with the norm after it (triton/tail_norm.py; ``next_norm``: the next
        layer's input norm or the final one): then this returns (None, ``Normed``), and the next
        layer starts from its normalized input."""
        if isinstance(residual, Normed):  # the layer before ran the tail norms
            return self._tail(residual.h, residual.r, positions, batch, next_norm)
        if residual is None and next_norm is not None and self._tails(h, next_norm):
            return self._tail(self.input_layernorm(h), h, positions, batch, next_norm)
        # At batch 1 on CUDA each norm runs inside the projection that reads it (norm_linear).
        fused = norm_linear(self.input_layernorm, self.self_attn.qkv_proj, h, residual)
        if fused is not None:
            qkv, residual = fused
            h = self.self_attn(None, positions, batch, qkv=qkv)
        else:
            if residual is None:
                residual, h = h, self.input_layernorm(h)
            else:
                h, residual = self.input_layernorm.add_norm(h, residual)
            h = self.self_attn(h, positions, batch)
        fused = norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, h, residual)
        if fused is not None:
            gate_up, residual = fused
            return self.mlp(None, gate_up=gate_up), residual
        h, residual = self.post_attention_layernorm.add_norm(h, residual)
        return self.mlp(h), residual

    def _tails(self, h: torch.Tensor, next_norm: RMSNorm) -> bool:
        ops = _layers.fused_ops(h)
        mlp, attn = self.mlp, self.self_attn
        return (ops is not None and mlp.act_name == "silu" and not self.input_layernorm.offset
                and not self.post_attention_layernorm.offset and not next_norm.offset
                and ops.tail_applies(h, self.hidden, next_norm.weight, attn.qkv_proj, attn.o_proj,
                                     mlp.gate_up_proj, mlp.down_proj))

    def _tail(self, h: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
              next_norm: RMSNorm) -> tuple[None, "Normed"]:
        """One row whose input ``h`` is normalized already: qkv, attention, o_proj + residual add
        + post-attention norm, gate/up (+ SiLU-and-mul), down + residual add + ``next_norm``."""
        ops = _layers.fused_ops(h)
        n2, mlp, attn = self.post_attention_layernorm, self.mlp, self.self_attn
        a = attn(h, positions, batch, project=False)
        h, residual = ops.res_norm_linear(a, attn.o_proj, residual, n2.weight, n2.eps)
        if ops.gate_up_silu_applies(h, mlp.gate_up_proj):  # SiLU-and-mul in the gate/up GEMV's epilogue
            act = ops.gate_up_silu(h, mlp.gate_up_proj)
            h, residual = ops.res_norm_linear(act, mlp.down_proj, residual, next_norm.weight, next_norm.eps)
        else:
            gate_up = ops.linear(h, mlp.gate_up_proj)
            h, residual = ops.res_norm_linear(gate_up, mlp.down_proj, residual, next_norm.weight, next_norm.eps,
                                              silu=True)
        return None, Normed(h, residual)


class Normed(NamedTuple):
    """A layer's output when its branch ends ran the tail norms: the next layer's normalized
    input ``h`` and the residual stream ``r`` it came from."""
    h: torch.Tensor
    r: torch.Tensor


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                               max_position_embeddings=cfg.max_position_embeddings)
        self.layers = nn.ModuleList(LlamaLayer(cfg, i, rope, groups[i]) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__(cfg)
        self.model = LlamaBody(cfg, groups)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embedding_weight(self) -> nn.Parameter:
        return self.model.embed_tokens.weight

    def hf_name(self, name: str) -> str | None:
        return None if "rotary_emb" in name else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        residual = None
        layers = self.model.layers
        for i, layer in enumerate(layers):
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, residual = layer(x, positions, batch, residual, next_norm=nxt)
        if isinstance(residual, Normed):  # the last layer's down GEMV applied the final norm
            return residual.h
        return self.model.norm.add_norm(x, residual)[0]
