"""Whisper: a conv + transformer encoder over log-mel frames, and a decoder with self- and
cross-attention. Weight names are HF's ``WhisperForConditionalGeneration``'s.

Encoder (runs once per request, engine/encoder.py): mel [mels, 2 * encoder_len] -> GELU(conv1,
k3) -> GELU(conv2, k3, stride 2) -> + learned positions -> pre-LN layers of bidirectional
attention and a GELU MLP -> LayerNorm: [encoder_len, d]. Each decoder layer's cross-attention
projects that output to K/V once (``write_cross_kv``) into the cross cache (kvcache/cross.py).

Decoder (every step, over the packed batch): token embeddings + learned positions, then per
layer: pre-LN causal self-attention over the paged cache, pre-LN cross-attention over the
cross pages, pre-LN GELU MLP; final LayerNorm; logits by the tied embedding (``proj_out``).
q and v projections have a bias, k does not. Scores scale by head_dim^-0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.attention.batch import AttentionBatch
from qkv.config import ModelConfig
from qkv.model.base import CausalLM
from qkv.model.encdec import DecoderCrossAttention, DecoderSelfAttention, EncoderAttention, check_cache_groups
from qkv.model.layers import activation


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, act: str):
        super().__init__()
        self.self_attn = EncoderAttention(d, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residuals added in place: x is this encoder pass's own tensor (WhisperEncoder made
        # it), and a fresh 3 MB result per add costs page faults on the CPU.
        x = x.add_(self.self_attn(self.self_attn_layer_norm(x)))
        return x.add_(self.fc2(self.act(self.fc1(self.final_layer_norm(x)))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, groups: list[int]):
        super().__init__()
        d, h, L = cfg.hidden_size, cfg.num_heads, cfg.num_layers
        self.self_attn = DecoderSelfAttention(d, h, i, groups[i])
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = DecoderCrossAttention(d, h, L + i, groups[L + i])  # cache layer L + i
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)
        self.fc2.keep_row_major = True  # its faster CPU decode GEMV (model/cpu_layout.py)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        # Residuals added in place: x is this step's own tensor (WhisperForConditionalGeneration.
        # forward made it), and a CPU decode step's small allocations are not free (the step
        # streams ~230 MB, which evicts the allocator's and dispatcher's state).
        x = x.add_(self.self_attn(self.self_attn_layer_norm(x), batch))
        x = x.add_(self.encoder_attn(self.encoder_attn_layer_norm(x), batch))
        return x.add_(self.fc2(self.act(self.fc1(self.final_layer_norm(x)))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ex, d = cfg.extra, cfg.hidden_size
        self.conv1 = nn.Conv1d(ex["num_mel_bins"], d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(ex["encoder_len"], d)
        self.layers = nn.ModuleList(EncoderLayer(d, ex["encoder_attention_heads"], ex["encoder_ffn_dim"],
                                                 cfg.hidden_act) for _ in range(ex["encoder_layers"]))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # [B, S, d]
        x = x + self.embed_positions.weight[:x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__()
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, d)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, groups) for i in range(cfg.num_layers))
        self.layer_norm = nn.LayerNorm(d)
        # No embed_scale: HF's Whisper computes one from scale_embedding but never applies it.


class WhisperModel(nn.Module):
    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__()
        self.encoder = WhisperEncoder(cfg)
        self.decoder = WhisperDecoder(cfg, groups)


class WhisperForConditionalGeneration(CausalLM):
    """``groups`` has one entry per cache layer: decoder self-attention layers 0..L-1, then
    their cross-attention layers L..2L-1 (kvcache/cross.py)."""

    stacked: dict = {}  # q/k/v stay separate: k has no bias
    is_encoder_decoder = True
    # A one-sequence decode step on the CPU (one 30-s window) is a chain of ~250 small ops and
    # GEMVs bound by memory (~190 MB of weights and 36 MB of cross K/V a step) that one core
    # streams about as fast as two (2026-12-03: the 51,865-row projection 5.3 ms on one thread,
    # 5.4 split over two); a second intra-op thread adds a fork and join to each op, and stalls
    # every op when the other core is busy (a transcription took 21-30 s with two decode threads
    # on the loaded machine, 5-6 s with one). On the quiet machine the two were within noise.
    # The encoder and prompt steps, and batched decode, keep every thread (ModelRunner.execute).
    cpu_decode_threads = 1
    cpu_blas_gemv = True  # its GEMVs over the engine's threads in numpy's OpenBLAS (model/cpu_gemv.py)

    def __init__(self, cfg: ModelConfig, groups: list[int]):
        super().__init__(cfg)
        check_cache_groups("Whisper", cfg, groups)
        self.model = WhisperModel(cfg, groups)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        ex = cfg.extra
        self.input_shape = (ex["num_mel_bins"], 2 * ex["encoder_len"])

    def embedding_weight(self) -> nn.Parameter:
        return self.model.decoder.embed_tokens.weight

    def hf_name(self, name: str) -> str | None:
        if name == "proj_out.weight":
            return "lm_head.weight"
        return name if name.startswith("model.") else "model." + name  # saved from WhisperModel

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, mels, 2 * encoder_len] -> encoder output [B, encoder_len, d]."""
        if tuple(mel.shape[1:]) != self.input_shape:
            raise ValueError(f"encoder_features must be log-mel [{self.input_shape[0]}, {self.input_shape[1]}] "
                             f"per request, got {list(mel.shape[1:])}")
        return self.model.encoder(mel)

    def encode_requests(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """One log-mel [mels, frames] per request -> each one's encoder output [encoder_len, d],
        encoded as one batch (every Whisper input has the same shape)."""
        p = self.model.encoder.conv1.weight  # never quantized (model/quant.py swaps only nn.Linear)
        return list(self.encode(torch.stack(features).to(p.device, p.dtype)))

    def write_cross_kv(self, enc: torch.Tensor, slots: torch.Tensor) -> None:
        """Every decoder layer's cross K/V of encoder rows [N, d], stored at ``slots`` [N]."""
        for layer in self.model.decoder.layers:
            layer.encoder_attn.write(enc, slots)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids) + dec.embed_positions(positions)
        for layer in dec.layers:
            x = layer(x, batch)
        return dec.layer_norm(x)
