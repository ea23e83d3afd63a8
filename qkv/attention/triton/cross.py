"""Cross (encoder-decoder) attention on the GPU through the paged decode kernel.

Cross attention has no causal mask: every query of sequence ``b`` sees all
``encoder_lens[b]`` keys of its cross table. That is exactly what ``paged_decode`` computes for
one query whose sequence holds ``encoder_lens[b]`` keys, so each query token becomes its own
decode "sequence": its row of the block table is its request's cross table and its key count
is the encoder length. No new kernel, and decode and prefill rows are handled alike.

Status: NOT yet run. tests/test_cross_triton.py compares it with the reference
(attention/cross.py) on a CUDA GPU; the decode kernel does not run under Triton 3.6's CPU
interpreter, and this work had no device time. Nothing calls it: the engine refuses
encoder-decoder models on CUDA (engine/encoder.py) until that test passes on a GPU.
"""

from __future__ import annotations

import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.triton.decode import paged_decode


def cross_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, group: int,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D], the reference's contract (attention/cross.py)."""
    key = ("triton_cross", group)
    if key not in batch.scratch:
        T = q.shape[0]
        seq = torch.repeat_interleave(torch.arange(batch.num_seqs, device=q.device), batch.query_lens, output_size=T)
        # One decode "sequence" per query token: its request's table, and keys [0, encoder_len - 1].
        batch.scratch[key] = (batch.block_tables[group][seq].contiguous(), batch.encoder_lens[seq] - 1,
                              int(batch.encoder_lens.max()))
    tables, last, longest = batch.scratch[key]
    return paged_decode(q.contiguous(), kv_cache, tables, last, scale, max_seq_len=longest)
