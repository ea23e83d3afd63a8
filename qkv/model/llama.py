"""The Llama family: Llama, Mistral, Qwen2, Qwen3, SmolLM2. Wiring only; the math is in layers.py."""

from __future__ import annotations

import torch
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.model.attention import Attention
from qkv.model.base import CausalLM
from qkv.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, norm_linear, stream_ops


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, group: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer, rope, group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        self.hidden = cfg.hidden_size

    def forward(self, h: torch.Tensor | None, positions: torch.Tensor, batch: AttentionBatch,
                residual=None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the stream's
        additions happen inside the next norm (``add_norm``), one fused kernel on the GPU.
        At batch 1 on CUDA with a wide hidden size they happen in the epilogue of the branch's
        last GEMV instead (triton/stream.py): then this returns (None, the stream with its
        norm statistics), and so does every following layer."""
        if isinstance(residual, tuple):  # the layer before ran the stream kernels
            return self._stream(residual, positions, batch)
        if residual is None and self._streams(h):
            return self._stream(stream_ops(h).stream_start(h), positions, batch)
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

    def _streams(self, h: torch.Tensor) -> bool:
        ops = stream_ops(h)
        mlp, attn = self.mlp, self.self_attn
        return (ops is not None and mlp.act_name == "silu" and not self.input_layernorm.offset
                and not self.post_attention_layernorm.offset
                and ops.stream_applies(h, self.hidden, attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))

    def _stream(self, stream, positions: torch.Tensor, batch: AttentionBatch):
        """One row through the stream kernels: norm + qkv (the first layer's stream is its input
        with its sum of squares, ``stream_start``), attention, o_proj + residual add, norm +
        gate/up, SiLU + down + add."""
        ops = stream_ops(stream.s)
        attn, mlp, n1, n2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        if ops.rope_attend_applies(attn, stream, batch):  # RoPE + KV write in the qkv GEMV's epilogue
            a = ops.rope_attend(attn, stream, n1, positions, batch)
        else:
            qkv = ops.normed_linear(stream, n1.weight, n1.eps, attn.qkv_proj)
            a = attn(None, positions, batch, qkv=qkv, project=False)
        stream = ops.res_linear(a, attn.o_proj, stream.s)
        gate_up = ops.normed_linear(stream, n2.weight, n2.eps, mlp.gate_up_proj)
        return None, ops.res_linear(gate_up, mlp.down_proj, stream.s, silu=True)


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
        for layer in self.model.layers:
            x, residual = layer(x, positions, batch, residual)
        if isinstance(residual, tuple):  # the stream kernels' (triton/stream.py): already added
            return self.model.norm(residual.s)
        return self.model.norm.add_norm(x, residual)[0]
