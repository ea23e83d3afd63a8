"""BART: a text encoder-decoder with post-LayerNorm layers. Weight names are HF's
``BartForConditionalGeneration``'s.

Encoder (once per request, engine/encoder.py): token ids -> shared embedding * embed_scale +
learned positions (offset by 2, as HF's ``BartLearnedPositionalEmbedding``) -> LayerNorm ->
layers of ``LN(x + attn(x))``, ``LN(x + fc2(act(fc1(x))))``. Decoder (every step): the same
embedding and positions, then per layer ``LN(x + self_attn)``, ``LN(x + cross_attn)``,
``LN(x + mlp)``; logits by the tied embedding plus ``final_logits_bias``. Every projection
has a bias. The cross-attention cache is the same as Whisper's (kvcache/cross.py), sized by
each request's own encoder length.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.model.base import CausalLM
from qkv.model.encdec import DecoderCrossAttention, DecoderSelfAttention, EncoderAttention, check_cache_groups
from qkv.model.layers import activation

POSITION_OFFSET = 2  # HF BART's learned positions start at row 2


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, act: str):
        super().__init__()
        self.self_attn = EncoderAttention(d, heads, k_bias=True)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, groups: list[int]):
        super().__init__()
        d, h, L = cfg.hidden_size, cfg.num_heads, cfg.num_layers
        self.self_attn = DecoderSelfAttention(d, h, i, groups[i], k_bias=True)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = DecoderCrossAttention(d, h, L + i, groups[L + i], k_bias=True)  # cache layer L + i
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, batch))
        x = self.encoder_attn_layer_norm(x + self.encoder_attn(x, batch))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class _Stack(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[nn.Module]):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        self.layernorm_embedding = nn.LayerNorm(cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        # tie_word_embeddings=False unties HF's encoder and decoder token embeddings from
        # model.shared too (each reads its own); tied, both are model.shared.
        self.embed_tokens = None if cfg.tie_word_embeddings else nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class BartModel(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__()
        ex = cfg.extra
        self.shared = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = _Stack(cfg, [EncoderLayer(cfg.hidden_size, ex["encoder_attention_heads"], ex["encoder_ffn_dim"],
                                                 cfg.hidden_act) for _ in range(ex["encoder_layers"])])
        self.decoder = _Stack(cfg, [DecoderLayer(cfg, i, groups) for i in range(cfg.num_layers)])


class BartForConditionalGeneration(CausalLM):
    """``groups``: one entry per cache layer, decoder self-attention 0..L-1 then cross L..2L-1."""

    stacked: dict = {}
    is_encoder_decoder = True

    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__(cfg)
        check_cache_groups("BART", cfg, groups)
        self.model = BartModel(cfg, groups)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.final_logits_bias = nn.Parameter(torch.zeros(1, cfg.vocab_size))
        self.embed_scale = cfg.hidden_size ** 0.5 if cfg.extra.get("scale_embedding") else 1.0

    def embedding_weight(self) -> nn.Parameter:
        return self.model.shared.weight

    def hf_name(self, name: str) -> str | None:
        if self.config.tie_word_embeddings and name.endswith(("encoder.embed_tokens.weight",
                                                              "decoder.embed_tokens.weight")):
            return None  # tied to model.shared
        return name

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        # HF lists final_logits_bias among the keys it may miss: zeros then, as its init.
        if "final_logits_bias" not in weights:
            weights = {**weights, "final_logits_bias": torch.zeros(1, self.config.vocab_size)}
        if "model.shared.weight" not in weights:  # saved under one of its tied names
            for alt in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
                if alt in weights:
                    weights = {**weights, "model.shared.weight": weights[alt]}
                    break
        super().load_weights(weights)

    def _embed(self, stack: _Stack, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = self.model.shared if stack.embed_tokens is None else stack.embed_tokens
        x = tokens(ids) * self.embed_scale + stack.embed_positions(positions + POSITION_OFFSET)
        return stack.layernorm_embedding(x)

    def encode_requests(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each request's encoder token ids [n] -> its encoder output [n, d], one at a time
        (lengths differ; padding would need a mask for no gain on the CPU)."""
        dev = self.model.shared.weight.device  # an embedding: never quantized (model/quant.py)
        outs = []
        for ids in features:
            ids = ids.to(dev)
            x = self._embed(self.model.encoder, ids, torch.arange(len(ids), device=dev))[None]
            for layer in self.model.encoder.layers:
                x = layer(x)
            outs.append(x[0])
        return outs

    def write_cross_kv(self, enc: torch.Tensor, slots: torch.Tensor) -> None:
        for layer in self.model.decoder.layers:
            layer.encoder_attn.write(enc, slots)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        x = self._embed(self.model.decoder, input_ids, positions)
        for layer in self.model.decoder.layers:
            x = layer(x, batch)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) + self.final_logits_bias.float()
