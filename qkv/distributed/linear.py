"""Column-, row- and vocab-parallel layers, as Megatron-LM and vLLM split them.

  column-parallel (QKV, gate/up): each rank holds a slice of the output rows; no collective,
      the next layer consumes the slice (this rank's heads, this rank's intermediate units).
  row-parallel (O, down): each rank holds the matching slice of the input columns and
      produces a partial sum; one all-reduce per layer makes it whole. A bias is loaded on
      rank 0 only (zeros elsewhere) so the sum adds it once.
  vocab-parallel (embedding, lm_head): each rank holds ``ceil(V / N)`` rows of the vocabulary
      (the last rank padded with zero rows); the embedding all-reduces (a token's row lives on
      one rank, the others contribute zeros) and the logits are all-gathered and cut to V.

The attention and MLP modules stay the single-device ones built from the per-rank config
(qkv/distributed/shard.py); the all-reduce is a forward hook on the whole module, so the
fused CUDA paths (which call the linears' weights directly) are reduced the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qkv.distributed.parallel_state import TPGroup


def column_slice(w: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    """The output rows ``[a, b)`` of each range, concatenated (a weight or a bias)."""
    return torch.cat([w[a:b] for a, b in rows], 0).contiguous()


def row_slice(w: torch.Tensor, cols: list[tuple[int, int]]) -> torch.Tensor:
    """The input columns ``[a, b)`` of each range, concatenated."""
    return torch.cat([w[:, a:b] for a, b in cols], 1).contiguous()


def vocab_slice(w: torch.Tensor, rank: int, per_rank: int) -> torch.Tensor:
    """Rows ``[rank * per_rank, (rank + 1) * per_rank)``, padded with zero rows past the vocabulary."""
    part = w[rank * per_rank:(rank + 1) * per_rank]
    if part.shape[0] < per_rank:
        part = torch.cat([part, part.new_zeros(per_rank - part.shape[0], *part.shape[1:])], 0)
    return part.contiguous()


def reduce_output_hook(group: TPGroup):
    """A forward hook that all-reduces a row-parallel module's output (its partial sum)."""

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return group.all_reduce(output)

    return hook


class VocabParallelEmbedding(nn.Embedding):
    """This rank's ``per_rank`` rows of the embedding; tokens of other ranks embed to zeros,
    and the all-reduce gives every rank the full embedding of every token."""

    def __init__(self, per_rank: int, hidden: int, group: TPGroup):
        super().__init__(per_rank, hidden)
        self.group, self.start = group, group.rank * per_rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return self.group.all_reduce(out)


def gathered_logits(compute_logits, group: TPGroup, vocab_size: int):
    """Wrap a model's ``compute_logits`` (this rank's vocabulary slice; any soft-cap is
    elementwise, so it may run before the gather) into one returning all ``vocab_size`` columns."""

    def compute(hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat(group.all_gather(compute_logits(hidden)), dim=-1)[..., :vocab_size]

    return compute
