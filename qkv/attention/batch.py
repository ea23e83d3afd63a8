"""AttentionBatch: what every attention backend reads about the current step.

The runner builds one per forward pass. Tokens of all sequences are packed into one
flat batch of ``T`` tokens: sequence ``b`` owns rows ``query_start_loc[b]:query_start_loc[b+1]``,
which are its positions ``num_computed[b] ... num_computed[b] + query_lens[b] - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionBatch:
    query_start_loc: torch.Tensor  # [B+1] int64
    num_computed: torch.Tensor  # [B] int64: tokens already cached before this step
    query_lens: torch.Tensor  # [B] int64: new tokens this step
    max_query_len: int
    max_seq_len: int  # max over b of num_computed + query_lens
    block_size: int
    block_tables: list[torch.Tensor]  # per layer group: [B, max_blocks] int64
    slot_mappings: list[torch.Tensor]  # per layer group: [T] int64, -1 = do not write
    ring_blocks: list[int | None]  # per layer group: ring length in blocks, None = full
    logits_indices: torch.Tensor | None = None  # rows whose logits are sampled
    encoder_lens: torch.Tensor | None = None  # [B] int64: cross-attention keys per sequence (encoder-decoder)
    max_encoder_len: int = 0  # max of encoder_lens, known on the host (0: unknown, e.g. in a graph)
    # Built for a CUDA graph (engine/cuda_graph.py): kernels size themselves for any length, in
    # the eager warm-up as in the capture, so the warm-up compiles every kernel variant the
    # capture launches (a Triton compile inside a capture invalidates it).
    graph: bool = False
    # Per-step values a backend derives once and every layer reuses (gather indices, masks).
    scratch: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.query_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1
