"""The process of one rank > 0: join the group, build its shard and its cache, run each step.

It holds no scheduler: rank 0 sends each step's packed batch (step.py) over a pipe, and the
worker runs the same forward on its shard. It exits when rank 0 says so, when the pipe closes
or its parent is gone (checked every second while idle), or on any error (printed, and sent
to rank 0 while it waits for start-up); a collective that a dead peer leaves hanging fails
after the group's timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import torch

from qkv.attention import backend
from qkv.distributed import step
from qkv.distributed.checkpoint import CheckpointFiles
from qkv.distributed.parallel_state import connect
from qkv.distributed.shard import Layout, build_shard

POLL_S = 1.0


def _recv(conn, parent: int):
    """The next message from rank 0; None when rank 0 is gone."""
    while not conn.poll(POLL_S):
        if os.getppid() != parent:
            return None
    try:
        return conn.recv()
    except (EOFError, OSError):
        return None


def main(rank: int, size: int, port: int, config, weights: dict | None, groups: list[int], device: str,
         dtype: torch.dtype, timeout_s: float, threads: int, conn, attention_backend: str = "reference") -> None:
    """Entry point of the spawned process (``executor.TensorParallelExecutor`` starts it);
    ``weights``: this rank's shard, or a ``CheckpointFiles`` it reads its shard from itself;
    ``attention_backend``: rank 0's (registered here again: this is another process)."""
    from qkv.engine.runner import ModelRunner
    from qkv.kvcache.manager import KVCacheManager

    parent = os.getppid()
    # Ctrl-C reaches the whole process group: rank 0 handles it, and this rank exits when rank
    # 0's pipe closes, instead of dying with a traceback of its own mid-collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        group = connect(rank, size, port, dev, timeout_s)
        layout = Layout.of(config, size)
        if isinstance(weights, CheckpointFiles):  # read only this rank's slices from the files
            weights = weights.read_shard(layout, rank)
        model = build_shard(config, groups, weights, layout, group, dev, dtype)
        del weights
        if attention_backend != "reference":
            from qkv.engine import gpu

            attention_backend = gpu.select_backend(attention_backend)
        backend.use(model, attention_backend)
        while True:  # start-up: memory profiling (CUDA), then the cache
            msg = _recv(conn, parent)
            if msg is None or msg == "shutdown":  # rank 0 failed while this rank was starting
                return
            if msg[0] != "profile":
                break
            from qkv.engine import gpu

            specs, block_size, max_tokens, max_num_seqs, utilization, kv_dtype = msg[1:]
            conn.send(("budget", gpu.profile_kv_budget(model, specs, block_size, max_tokens, max_num_seqs,
                                                       utilization, dev, kv_dtype)))
        _, specs, block_size, n_blocks, prefix_caching, kv_dtype = msg
        kv = KVCacheManager(specs, block_size, n_blocks, prefix_caching)
        runner = ModelRunner(model, kv, dev, kv_dtype)
        conn.send(("ready", runner.kv_cache_bytes))
        while (msg := _recv(conn, parent)) is not None and msg != "shutdown":
            if isinstance(msg, dict):  # an eager step
                step.run(runner, *step.unpack(msg, dev, kv.block_size, kv.ring))
            elif msg[0] == "graph":  # a decode step replayed from this rank's graphs
                runner.graphs.load(msg)
            else:  # ("graphs", max_num_seqs, max_model_len): capture them, as rank 0 does
                from qkv.distributed.graphs import TensorParallelGraphs

                runner.graphs = TensorParallelGraphs(runner, *msg[1:], group)
                conn.send(("captured", runner.graphs.capture()))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then the process ends
        traceback.print_exc()
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        sys.exit(1)
