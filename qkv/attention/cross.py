"""Cross (encoder-decoder) attention over the paged cross cache: the reference implementation.

Every query of sequence ``b`` sees all ``batch.encoder_lens[b]`` encoder positions, read from
the pages of its cross table (``batch.block_tables[group]``, position ``p`` at
``table[p // block_size] * block_size + p % block_size``): no causal mask, no write (the
encoder wrote them once, engine/encoder.py). Plain torch, the oracle for any kernel.

Cache layout per layer: ``[2, num_blocks, block_size, kv_heads, head_dim]``, as full attention.
No Triton kernel reads cross pages yet: the engine refuses encoder-decoder models on CUDA.
"""

from __future__ import annotations

import torch

from qkv.attention.batch import AttentionBatch
from qkv.kvcache.kv_quant import to_cache


def _indices(batch: AttentionBatch, group: int):
    """(key slots [B, L], key valid [B, L], padded query rows [B, Q], packed order [T]); once per step."""
    key = ("cross", group)
    if key not in batch.scratch:
        bs, lens, tables = batch.block_size, batch.encoder_lens, batch.block_tables[group]
        L = max(1, int(lens.max()))
        pos = torch.arange(L, device=lens.device)[None, :]
        valid = pos < lens[:, None]
        blk = (pos // bs).expand(len(lens), L).clamp(max=tables.shape[1] - 1)
        slots = torch.where(valid, tables.gather(1, blk) * bs + pos % bs, 0)
        q_idx = torch.arange(batch.max_query_len, device=lens.device)[None, :]
        q_valid = q_idx < batch.query_lens[:, None]
        q_rows = torch.where(q_valid, batch.query_start_loc[:-1, None] + q_idx, 0)
        batch.scratch[key] = (slots, valid, q_rows, q_valid.flatten().nonzero().squeeze(1))
    return batch.scratch[key]


def cross_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, group: int,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D]: softmax(q K_b^T * scale) V_b over sequence b's encoder K/V."""
    T, H, D = q.shape
    kvh = kv_cache.shape[3]
    slots, valid, q_rows, q_packed = _indices(batch, group)
    keys = kv_cache[0].view(-1, kvh, D)[slots].float()  # [B, L, KVH, D]
    values = kv_cache[1].view(-1, kvh, D)[slots].float()
    B, Q = q_rows.shape
    qp = q[q_rows].view(B, Q, kvh, H // kvh, D).float()
    scores = torch.einsum("bqhgd,blhd->bhgql", qp, keys) * scale
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    out = torch.einsum("bhgql,blhd->bqhgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(B * Q, H, D).index_select(0, q_packed).to(q.dtype)


def write_cross_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the encoder's K/V [N, KVH, D] at ``slots`` [N] (every row has its own slot)."""
    kvh, d = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, kvh, d)[slots] = to_cache(k, kv_cache.dtype)
    kv_cache[1].view(-1, kvh, d)[slots] = to_cache(v, kv_cache.dtype)
