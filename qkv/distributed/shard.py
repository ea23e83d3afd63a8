"""What a model looks like on one rank: its config, its weights, and the hooks that make it parallel.

Each rank builds the ordinary single-device model from ``rank_config`` (its share of the
query heads, KV heads, intermediate units and vocabulary), so attention, the cache specs and
the cache tensors need no tensor-parallel code at all; ``shard_weights`` slices the HF
tensors to those shapes and ``shard_model`` adds the collectives (linear.py).

KV heads: with ``num_kv_heads >= N`` each rank holds ``num_kv_heads / N`` of them; with fewer
KV heads than ranks each rank holds one, replicated ``N / num_kv_heads`` times, as vLLM does
(rank r's query heads all read KV head ``r // replicas``).

DeepSeek (MLA): sharded by query heads (``q_proj``/``q_b_proj``, ``kv_b_proj`` = per-head
W_UK/W_UV, ``o_proj``); the down-projections ``q_a_proj``/``kv_a_proj_with_mqa`` and the
latent cache are replicated, so each rank caches the whole latent (per-rank bytes = TP=1's).
Its MoE splits every expert's (and the shared experts') intermediate units, with the router
replicated, and all-reduces once per MoE block.

Supported: the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2), Gemma 3 and DeepSeek
V2/V3. Refused by name: GPT-2 (fused Conv1D ``c_attn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkv.config import ModelConfig
from qkv.distributed.linear import (VocabParallelEmbedding, column_slice, gathered_logits, reduce_output_hook,
                                    row_slice, vocab_slice)
from qkv.distributed.parallel_state import TPGroup

SUPPORTED_ARCHS = ("llama", "gemma3", "deepseek")


@dataclass(frozen=True)
class Layout:
    """How ``config`` splits over ``size`` ranks. ``Layout.of`` validates."""

    size: int
    num_heads: int  # query heads per rank
    num_kv_heads: int  # KV heads per rank (1 when replicated)
    kv_replicas: int  # ranks holding each KV head
    head_dim: int
    intermediate: int  # MLP units per rank
    vocab: int  # vocabulary rows per rank (ceil(V / N); the last rank padded)

    @classmethod
    def of(cls, config: ModelConfig, size: int) -> "Layout":
        """ValueError naming the field when ``config`` cannot be split over ``size`` ranks."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        if size > 1 and config.arch not in SUPPORTED_ARCHS:
            raise ValueError(f"tensor_parallel_size={size}: {config.model_type!r} models are not supported "
                             f"with tensor parallelism (supported: Llama, Mistral, Qwen2, Qwen3, Gemma 3, DeepSeek)")
        h, kv = config.num_heads, config.num_kv_heads
        if h % size:
            raise ValueError(f"tensor_parallel_size={size}: num_attention_heads={h} is not divisible by {size}")
        if kv % size and size % kv:
            raise ValueError(f"tensor_parallel_size={size}: num_key_value_heads={kv} neither divides "
                             f"nor is divisible by {size}")
        for name, value in (("intermediate_size", config.intermediate_size),
                            ("moe_intermediate_size", config.extra.get("moe_intermediate_size") or 0)):
            if value % size:
                raise ValueError(f"tensor_parallel_size={size}: {name}={value} is not divisible by {size}")
        return cls(size, h // size, max(1, kv // size), max(1, size // kv), config.head_dim,
                   config.intermediate_size // size, -(-config.vocab_size // size))

    def kv_rows(self, rank: int) -> tuple[int, int]:
        n = self.num_kv_heads * self.head_dim
        first = rank // self.kv_replicas
        return first * n, (first + 1) * n


def rank_config(config: ModelConfig, layout: Layout) -> ModelConfig:
    """The single-device config of one rank's shard (the cache specs built from it give the
    per-rank KV bytes)."""
    if layout.size == 1:
        return config
    extra = dict(config.extra)
    if extra.get("moe_intermediate_size"):
        extra["moe_intermediate_size"] //= layout.size
    return config.replace(num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads,
                          intermediate_size=layout.intermediate, vocab_size=layout.vocab, extra=extra)


# Split into N equal contiguous parts (whole heads, whole units), by output rows or input columns.
COLUMN = ("q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def _part(n: int, rank: int, size: int) -> tuple[int, int]:
    return rank * (n // size), (rank + 1) * (n // size)


def slice_plan(name: str, shape: tuple[int, ...], layout: Layout, rank: int) -> tuple[str, tuple[int, int] | None]:
    """Which part of HF tensor ``name`` (of ``shape``) rank ``rank`` holds: ("rows", (a, b)),
    ("cols", (a, b)), ("vocab", (a, b)) (rows, zero-padded to ``layout.vocab``), ("zeros", None)
    or ("all", None). The one rule of ``shard_weights`` and ``checkpoint.read_shard``."""
    parts = name.split(".")
    module, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
    if module in COLUMN:
        return "rows", _part(shape[0], rank, layout.size)
    if module in ("k_proj", "v_proj"):
        return "rows", layout.kv_rows(rank)
    if module in ROW:
        if kind == "bias":  # added once: rank 0's, zeros elsewhere (the all-reduce sums them)
            return ("all", None) if rank == 0 else ("zeros", None)
        return "cols", _part(shape[1], rank, layout.size)
    if module in ("embed_tokens", "lm_head"):
        return "vocab", (rank * layout.vocab, (rank + 1) * layout.vocab)
    return "all", None


def shard_weights(weights: dict[str, torch.Tensor], layout: Layout, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of each HF tensor (HF names kept; anything else is replicated).
    Query heads, MLA's per-head up-projections and MLP units (dense, expert or shared) are
    contiguous in HF's layout, so rank r's share is the r-th of N equal parts. It reads every
    tensor whole (GGUF, dicts); a safetensors checkpoint is read per rank instead (checkpoint.py)."""
    out = {}
    for name, w in weights.items():
        how, ab = slice_plan(name, tuple(w.shape), layout, rank)
        if how == "rows":
            w = column_slice(w, [ab])
        elif how == "cols":
            w = row_slice(w, [ab])
        elif how == "vocab":
            w = vocab_slice(w, rank, layout.vocab)
        elif how == "zeros":
            w = torch.zeros_like(w)
        out[name] = w
    return out


def shard_model(model: nn.Module, group: TPGroup, vocab_size: int) -> None:
    """Make a model built from ``rank_config`` tensor-parallel, before its weights are loaded:
    all-reduce after each attention and MLP block, vocab-parallel embedding, gathered logits.
    An MoE block is reduced once, after its routed and shared experts (not per expert)."""
    from qkv.model.layers import GatedMLP
    from qkv.model.moe import MoE

    hook = reduce_output_hook(group)
    for m in model.attention_layers():
        m.register_forward_hook(hook)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    inside = {id(e) for moe in moes for e in moe.modules() if e is not moe}
    for m in moes:
        m.register_forward_hook(hook)
    for m in model.modules():
        if isinstance(m, GatedMLP) and id(m) not in inside:
            m.register_forward_hook(hook)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding) and name == "embed_tokens":
                setattr(parent, name, VocabParallelEmbedding(child.num_embeddings, child.embedding_dim, group))
    model.compute_logits = gathered_logits(model.compute_logits, group, vocab_size)


def build_shard(config: ModelConfig, groups: list[int], weights: dict | None, layout: Layout, group: TPGroup,
                device: torch.device, dtype: torch.dtype) -> nn.Module:
    """This rank's model in ``dtype`` on ``device``: built from ``rank_config``, made parallel,
    loaded from ``weights`` (already this rank's slice, ``shard_weights``; None: random, normal std 0.02)."""
    from qkv.model import build_model

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(rank_config(config, layout), groups)
            shard_model(model, group, config.vocab_size)
    finally:
        torch.set_default_dtype(prev)
    if weights is not None:
        model.load_weights(weights)
    else:  # a random init as the one-process engine's (gpu.build_on_device): benchmarks of shapes
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()
