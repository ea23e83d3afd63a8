"""CUDA graphs for tensor-parallel decode steps: every rank captures its own, collectives inside.

Each rank captures the same batch sizes (engine/cuda_graph.py's ``DecodeGraphs``) over its
shard, in the same order, so the NCCL all-reduces and the logits' all-gather are recorded in
every rank's graphs and meet at replay as they do in eager steps. NCCL supports capture once
the communicator exists: the memory profile's eager forward and each size's eager warm-up pass
create it before any capture. Gloo cannot be captured (its collectives run on the host), and
on the CPU there are no graphs: there every step stays eager (``TPGroup.can_capture``).

A graph step: rank 0 stages the step in its static buffers as a one-process engine does,
sends the workers the staged host rows (positions, slots and block tables; ``pack``), then
replays. Each worker copies them into its own buffers (``load``) and replays the same size.
With async scheduling rank 0's input ids are gathered on its device from the previous step's
sampled tokens, which the host never sees: so the graphs (of a group of two or more) begin
with a broadcast of rank 0's input ids, and the host ids a worker receives are never used.
"""

from __future__ import annotations

import torch

from qkv.distributed.parallel_state import TPGroup
from qkv.engine.cuda_graph import DecodeGraphs


class TensorParallelGraphs(DecodeGraphs):
    """``DecodeGraphs`` of one rank; ``group`` is the tensor-parallel group."""

    def __init__(self, runner, max_num_seqs: int, max_model_len: int, group: TPGroup):
        super().__init__(runner, max_num_seqs, max_model_len)
        if any(runner.kv.cross):
            raise ValueError("encoder-decoder models are not supported with tensor parallelism")
        self.group = group

    def _forward(self, n: int) -> torch.Tensor:
        if self.group.size > 1:  # rank 0's ids, gathered on its device (async scheduling)
            self.group.broadcast(self.input_ids[:n], 0)
        return super()._forward(n)

    def pack(self, n: int, size: int, copies: list) -> tuple:
        """Rank 0, after ``stage``: the message that makes a worker replay this step. The
        per-row inputs, and of each block table only the columns this step's rows can read
        (up to the longest sequence's last block; a ring's whole width)."""
        N, G, h = self.sizes[-1], len(self.max_blocks), self._host
        longest = int(h[N:N + n].max()) // self.block_size + 1  # positions: the last token's block
        tables = [t[:size, :min(w, longest)].copy() for t, w in zip(self._host_tables, self.max_blocks)]
        return ("graph", n, size, list(copies), h[:(4 + G) * N].copy(), tables)

    @torch.inference_mode()
    def load(self, msg: tuple) -> None:
        """A worker: stage rank 0's packed step (``pack``) and replay it."""
        _, n, size, copies, head, tables = msg
        self.runner._copy_blocks(copies)
        self._copied.synchronize()  # the last step's copy has read the pinned buffer
        h = self._host
        h[:head.size] = head
        for host, t in zip(self._host_tables, tables):
            host[:t.shape[0], :t.shape[1]] = t
        N, G = self.sizes[-1], len(self.max_blocks)
        end = (5 * N + size * self.max_blocks[0]) if G == 1 else self.buf.numel()  # as rank 0 copies
        self.buf[:end].copy_(self.host[:end], non_blocking=True)
        self._copied.record()
        self.replay(n, size)

