"""Tensor parallelism over torch.distributed (issue 21): one process per rank, each holding a
slice of every layer's heads, of the MLP's intermediate units and of the vocabulary.

  parallel_state.py  the process group (gloo on the CPU, NCCL on CUDA) and its collectives
  linear.py          how a weight is sliced (column-, row-, vocab-parallel) and the layers that reduce
  shard.py           a model's per-rank config, its sharded weights, and the hooks that make it parallel
  step.py            one step as every rank runs it: the packed batch and the forward over it
  worker.py          the loop of ranks 1..N-1: receive a step's batch, run the same forward
  executor.py        rank 0: starts the workers, broadcasts each step, turns a dead rank into an error
"""

import os


def layout_forced() -> bool:
    """``QKV_TP_LAYOUT=1``: an engine of ``tensor_parallel_size=1`` runs through the
    tensor-parallel layout all the same (rank 0's executor and runner, a one-rank group, the
    sharded model with its collectives and graphs), so a benchmark can measure what the layout
    costs against the plain engine. Unset or "0": the plain one-process engine."""
    raw = os.environ.get("QKV_TP_LAYOUT", "0")
    if raw not in ("0", "1"):
        raise ValueError(f"QKV_TP_LAYOUT must be 0 or 1, got {raw!r}")
    return raw == "1"
