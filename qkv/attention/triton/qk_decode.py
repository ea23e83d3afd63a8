"""Decode attention of a q/k-norm model (Qwen3) with the KV write folded into the q/k norm +
RoPE kernel (of a model without q/k norms, Llama, into the RoPE kernel): one launch of
``fused.qk_norm_rope`` normalizes and rotates q and k and stores
k and v at their cache slots, then the decode kernel runs as ``backend.paged_attention`` runs it
for a decode step (which would otherwise launch ``kv_write.write_kv`` first). Applies to
decode steps of the Triton backend over a float cache of the model's dtype without window,
ring, dilation or key offset; ``applies`` says when, and the caller takes the usual path else.
"""

from __future__ import annotations

import os

import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.triton import fused, pdl
from qkv.attention.triton.backend import decode_keys
from qkv.attention.triton.decode import num_splits, paged_decode
from qkv.attention.triton.qk_attend import qk_attend
from qkv.kvcache.kv_pages import layout_of

# Splits of the decode kernel here (QKV_DECODE_SPLITS; unset: decode.num_splits's choice, 32 at
# batch 1 in a graph, which needs the second, combining launch). Up to 8 the kernel merges the
# splits itself (one launch): better for short contexts, fewer programs for long ones.
SPLITS = int(os.environ.get("QKV_DECODE_SPLITS", "0")) or None
# However many splits, the kernel's last split merges them, all partial states loaded at once
# (decode.paged_decode's merge=True): no combine launch. QKV_DECODE_MERGE=0: the combine kernel
# past 8 splits, as for other models.
MERGE = os.environ.get("QKV_DECODE_MERGE", "1") == "1"
# QKV_FUSE_QK_ATTEND=1: norms, RoPE, KV write, decode and its merge in one launch (qk_attend.py).
FUSE_ATTEND = os.environ.get("QKV_FUSE_QK_ATTEND", "0") == "1"
# Models without q/k norms (Llama): RoPE of q and k and the KV write in one launch, then the
# decode kernel with the merge above (QKV_FUSE_ROPE_KV=1, the default; 0: rope_qk, write_kv,
# decode and, past 8 splits, its combine: four launches). Llama-8B batch 1 on the H200: 242.7 ->
# 244.9 and 242.0 -> 244.6 tok/s in two device calls (benchmarks.md, sessions 9 and 10).
FUSE_ROPE_KV = os.environ.get("QKV_FUSE_ROPE_KV", "1") == "1"


def applies(attn, qkv: torch.Tensor, batch: AttentionBatch) -> bool:
    """Whether ``attend`` can replace norms + RoPE + ``backend.attention`` for module ``attn``."""
    cache = attn.kv_cache
    if attn.q_norm is None:
        norms = FUSE_ROPE_KV and attn.rope is not None
    else:
        norms = (fused.FUSE_QK_NORM_ROPE and not attn.q_norm.offset and not attn.k_norm.offset
                 and attn.q_norm.eps == attn.k_norm.eps)
    return (norms and fused.FUSE_KV_WRITE and attn.attention_backend == "triton"
            and batch.is_decode and cache is not None and qkv.is_cuda and cache.dtype == qkv.dtype
            and attn.window is None and attn.dilation == 1 and batch.ring_blocks[attn.group] is None
            and layout_of(cache) is None and attn._key_offset() is None)


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
           batch: AttentionBatch, qkv: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] straight from the projection (``qkv``, whose views they
    are) -> attention output [T, H, D]; this step's k (normalized, rotated) and v are written
    into ``attn.kv_cache``. ``FUSE_ATTEND`` with ``qkv`` given: all of it in one launch."""
    g = attn.group
    _, index, cos_t, sin_t = attn.rope._tables(positions, batch)[:4]
    D = attn.head_dim
    qn, kn = attn.q_norm, attn.k_norm
    if qn is None:  # Llama: RoPE and the KV write in one launch, then the decode kernel
        static = batch.graph and pdl.MODE != 0 and attn.rope.threshold is None
        if FUSE_ATTEND and qkv is not None and D & (D - 1) == 0 and qkv.stride(1) == 1:  # or all in one
            splits = SPLITS or num_splits(batch.num_seqs, attn.num_kv_heads, decode_keys(batch, batch.max_seq_len), 64)
            return qk_attend(qkv, attn.num_heads, None, None, 0.0, index, cos_t, sin_t, attn.kv_cache,
                             batch.slot_mappings[g], batch.block_tables[g], batch.num_computed,
                             batch.query_start_loc, attn.scale, splits, static=static)
        q, _ = fused.qk_norm_rope(index, cos_t, sin_t, q, k, None, None, 0.0, v=v, kv_cache=attn.kv_cache,
                                  slot_mapping=batch.slot_mappings[g], static=static)
        return paged_decode(q, attn.kv_cache, batch.block_tables[g], batch.num_computed, attn.scale, None, None, None,
                            max_seq_len=decode_keys(batch, batch.max_seq_len), splits=SPLITS,
                            query_start_loc=batch.query_start_loc, merge=True if MERGE else None,
                            static_inputs=batch.graph and pdl.MODE != 0)
    if FUSE_ATTEND and qkv is not None and D & (D - 1) == 0 and qkv.stride(1) == 1:
        splits = SPLITS or num_splits(batch.num_seqs, attn.num_kv_heads, decode_keys(batch, batch.max_seq_len), 64)
        return qk_attend(qkv, attn.num_heads, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, index, cos_t,
                         sin_t, attn.kv_cache, batch.slot_mappings[g], batch.block_tables[g], batch.num_computed,
                         batch.query_start_loc, attn.scale, splits, static=batch.graph and pdl.MODE != 0)
    # (dynamic RoPE computes its tables in the step: not static inputs)
    static = batch.graph and pdl.MODE != 0 and attn.rope.threshold is None
    q, _ = fused.qk_norm_rope(index, cos_t, sin_t, q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
                              v=v, kv_cache=attn.kv_cache, slot_mapping=batch.slot_mappings[g], static=static)
    return paged_decode(q, attn.kv_cache, batch.block_tables[g], batch.num_computed, attn.scale, None, None, None,
                        max_seq_len=decode_keys(batch, batch.max_seq_len), splits=SPLITS,
                        query_start_loc=batch.query_start_loc, merge=True if MERGE else None,
                        static_inputs=batch.graph and pdl.MODE != 0)
