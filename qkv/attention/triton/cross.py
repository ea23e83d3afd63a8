"""Cross (encoder-decoder) attention on the GPU through the paged decode kernel.

Cross attention has no causal mask: every query of sequence ``b`` sees all
``encoder_lens[b]`` keys of its cross table. That is exactly what ``paged_decode`` computes for
one query whose sequence holds ``encoder_lens[b]`` keys (``num_computed = encoder_len - 1``:
the kernel's keys are ``[0, num_computed]`` inclusive), so no new kernel is needed:

- a decode step (one query per sequence, ``max_query_len == 1``) passes the batch's own rows,
  tables and ``query_start_loc``;
- any other step makes each query token its own decode "sequence": its row of the block table
  is its request's cross table and its key count the encoder length (gathered on the device).

Nothing is read on the host, so a decode step can be captured in a CUDA graph
(engine/cuda_graph.py fills ``encoder_lens`` per replay; padding rows carry 1 key).
Checked against the reference (attention/cross.py) by tests/test_cross_triton.py, on a GPU
and under Triton's interpreter.
"""

from __future__ import annotations

import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.triton.decode import paged_decode


def cross_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, group: int,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D], the reference's contract (attention/cross.py). Reads
    ``kv_cache`` [2, blocks, bs, KVH, D] through ``batch.block_tables[group]``; writes nothing."""
    key = ("triton_cross", group)
    if key not in batch.scratch:
        from qkv.attention.triton.backend import decode_keys

        longest = decode_keys(batch, batch.max_encoder_len or None)  # sizes the kernel's splits
        if batch.max_query_len == 1:
            batch.scratch[key] = (batch.block_tables[group], batch.encoder_lens - 1, batch.query_start_loc, longest)
        else:
            T = q.shape[0]
            seq = torch.repeat_interleave(torch.arange(batch.num_seqs, device=q.device), batch.query_lens,
                                          output_size=T)
            rows = torch.arange(T + 1, device=q.device)
            batch.scratch[key] = (batch.block_tables[group][seq].contiguous(), batch.encoder_lens[seq] - 1, rows,
                                  longest)
    tables, last, qsl, longest = batch.scratch[key]
    return paged_decode(q.contiguous(), kv_cache, tables, last, scale, max_seq_len=longest, query_start_loc=qsl)
