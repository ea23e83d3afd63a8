"""One step as every rank runs it: the batch rank 0 broadcasts, and the forward over it.

Rank 0 packs (``pack``) what its runner prepared: token ids, positions, the AttentionBatch's
block tables and slot mappings, the copy-on-write copies. The block pool and block tables are
the same on every rank (only the heads in each block differ), so a worker needs no scheduler
and no cache manager state: it unpacks the batch and runs ``run`` on its shard, taking part
in the same collectives in the same order.
"""

from __future__ import annotations

import numpy as np
import torch

from qkv.attention.batch import AttentionBatch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def pack(copies: list, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
         all_logits: bool) -> dict:
    """The step as host arrays (the pipe to each worker pickles them)."""
    return dict(copies=list(copies), input_ids=_np(input_ids), positions=_np(positions),
                query_start_loc=_np(batch.query_start_loc), num_computed=_np(batch.num_computed),
                query_lens=_np(batch.query_lens), max_query_len=batch.max_query_len,
                max_seq_len=batch.max_seq_len, block_tables=[_np(t) for t in batch.block_tables],
                slot_mappings=[_np(s) for s in batch.slot_mappings],
                logits_indices=None if batch.logits_indices is None else _np(batch.logits_indices),
                all_logits=all_logits)


def unpack(msg: dict, device: torch.device, block_size: int, ring_blocks: list):
    """(copies, input ids, positions, AttentionBatch, all_logits) on ``device``."""
    def t(a):
        return torch.from_numpy(a).to(device)

    batch = AttentionBatch(
        query_start_loc=t(msg["query_start_loc"]), num_computed=t(msg["num_computed"]),
        query_lens=t(msg["query_lens"]), max_query_len=msg["max_query_len"], max_seq_len=msg["max_seq_len"],
        block_size=block_size, block_tables=[t(a) for a in msg["block_tables"]],
        slot_mappings=[t(a) for a in msg["slot_mappings"]], ring_blocks=list(ring_blocks),
        logits_indices=None if msg["logits_indices"] is None else t(msg["logits_indices"]))
    return msg["copies"], t(msg["input_ids"]), t(msg["positions"]), batch, msg["all_logits"]


@torch.inference_mode()
def run(runner, copies: list, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
        all_logits: bool) -> torch.Tensor:
    """ModelRunner.execute after ``prepare``, on any rank: float32 logits over the whole
    vocabulary (gathered), every row with ``all_logits``, else the sampled rows."""
    runner._copy_blocks(copies)
    for rope in runner.ropes:
        rope.ensure(batch.max_seq_len)
    hidden = runner.model(input_ids, positions, batch)
    if not all_logits:
        hidden = hidden[batch.logits_indices]
    return runner.model.compute_logits(hidden)
