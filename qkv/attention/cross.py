"""Cross (encoder-decoder) attention over the paged cross cache: the reference implementation.

Every query of sequence ``b`` sees all ``batch.encoder_lens[b]`` encoder positions, read from
the pages of its cross table (``batch.block_tables[group]``, position ``p`` at
``table[p // block_size] * block_size + p % block_size``): no causal mask, no write (the
encoder wrote them once, engine/encoder.py). Plain torch (SDPA over gathered pages): the CPU
path and the oracle for any kernel; the tests compare it with HF transformers.

Cache layout per layer: ``[2, num_blocks, block_size, kv_heads, head_dim]``, as full attention.
No GPU path is validated yet (attention/triton/cross.py is untested on a GPU): the engine
refuses encoder-decoder models on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkv.attention.batch import AttentionBatch
from qkv.kvcache.kv_quant import to_cache


def _indices(batch: AttentionBatch, group: int):
    """(cross tables [B, W], key valid [B, 1, 1, W * block_size], padded query rows [B, Q], packed
    order [T]); computed once per step and shared by every cross layer."""
    key = ("cross", group)
    if key not in batch.scratch:
        bs, lens, tables = batch.block_size, batch.encoder_lens, batch.block_tables[group]
        pos = torch.arange(tables.shape[1] * bs, device=lens.device)[None, :]
        valid = (pos < lens[:, None])[:, None, None, :]
        q_idx = torch.arange(batch.max_query_len, device=lens.device)[None, :]
        q_valid = q_idx < batch.query_lens[:, None]
        q_rows = torch.where(q_valid, batch.query_start_loc[:-1, None] + q_idx, 0)
        batch.scratch[key] = (tables, valid, q_rows, q_valid.flatten().nonzero().squeeze(1))
    return batch.scratch[key]


def cross_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, group: int,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D]: softmax(q K_b^T * scale) V_b over sequence b's encoder K/V.

    Pages are gathered whole (one index per block, not per position: a 30 s Whisper window is
    94 blocks, not 1,500 rows) and positions past the encoder's length are masked; the
    softmax(QK^T)V itself is torch's ``scaled_dot_product_attention`` in fp32."""
    T, H, D = q.shape
    kvh = kv_cache.shape[3]
    tables, valid, q_rows, q_packed = _indices(batch, group)
    B, Q = q_rows.shape
    keys = kv_cache[0][tables].view(B, -1, kvh, D).transpose(1, 2).float()  # [B, KVH, W * bs, D]
    values = kv_cache[1][tables].view(B, -1, kvh, D).transpose(1, 2).float()
    qp = q[q_rows].transpose(1, 2).float()  # [B, H, Q, D]
    out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=valid, scale=scale, enable_gqa=kvh != H)
    return out.transpose(1, 2).reshape(B * Q, H, D).index_select(0, q_packed).to(q.dtype)


def write_cross_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the encoder's K/V [N, KVH, D] at ``slots`` [N] (every row has its own slot)."""
    kvh, d = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, kvh, d)[slots] = to_cache(k, kv_cache.dtype)
    kv_cache[1].view(-1, kvh, d)[slots] = to_cache(v, kv_cache.dtype)
