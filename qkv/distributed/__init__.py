"""Tensor parallelism over torch.distributed (issue 21): one process per rank, each holding a
slice of every layer's heads, of the MLP's intermediate units and of the vocabulary.

  parallel_state.py  the process group (gloo on the CPU, NCCL on CUDA) and its collectives
  linear.py          how a weight is sliced (column-, row-, vocab-parallel) and the layers that reduce
  shard.py           a model's per-rank config, its sharded weights, and the hooks that make it parallel
  step.py            one step as every rank runs it: the packed batch and the forward over it
  worker.py          the loop of ranks 1..N-1: receive a step's batch, run the same forward
  executor.py        rank 0: starts the workers, broadcasts each step, turns a dead rank into an error
"""
