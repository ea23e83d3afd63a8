"""Rank 0 of a tensor-parallel engine: it lives in the engine's process, owns the scheduler
and the cache manager (the LLMEngine around it), starts ranks 1..N-1 (worker.py) and
broadcasts every step to them before running its own shard of the same step.

Failure is an error, never a hang: before each step rank 0 checks that every worker is
alive; a worker that dies mid-step closes its sockets, which fails rank 0's next collective
at once; one that hangs fails it after ``timeout_s``. Either way rank 0 raises
``TensorParallelError`` naming the rank, its pid and exit code, stops the other workers, and
every later step raises the same error (the engine must be rebuilt).
"""

from __future__ import annotations

import os
import threading
import time
import weakref

import torch

from qkv.distributed import step
from qkv.distributed.checkpoint import CheckpointFiles
from qkv.distributed.parallel_state import JOIN_TIMEOUT_S, TensorParallelError, connect, master_store
from qkv.distributed.shard import Layout, build_shard, rank_config, shard_weights
from qkv.engine.runner import ModelRunner


def default_timeout_s() -> float:
    """Seconds one collective may take (a hung rank is detected after this): ``QKV_TP_TIMEOUT_S``,
    else 60. Start-up (joining the group, profiling, allocating) is bounded by JOIN_TIMEOUT_S."""
    raw = os.environ.get("QKV_TP_TIMEOUT_S", "60")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"QKV_TP_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return value


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: ``cuda:r`` on CUDA (one GPU per rank), the CPU otherwise."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def _watch(sentinels: list, pg, stopping: threading.Event) -> None:
    """CUDA, N > 1: abort the NCCL communicators as soon as a worker exits unasked. A collective
    captured in a replayed graph is outside NCCL's watchdog, so rank 0 would otherwise wait on
    the card for good; aborted, it returns, and rank 0's next ``check`` raises naming the rank."""
    from multiprocessing.connection import wait

    while not stopping.is_set():
        if wait(sentinels, timeout=1.0):
            if not stopping.is_set():
                try:
                    pg.abort()
                except Exception:  # noqa: BLE001 - the group is failing anyway; check() reports it
                    pass
            return


def _stop(procs: list, conns: list, stopping: threading.Event | None = None) -> None:
    """Ask every live worker to exit; kill one that has not within 1 s (it may be hung or
    stopped, and then ignores SIGTERM; a working one exits within milliseconds)."""
    if stopping is not None:
        stopping.set()  # workers exiting now are asked to: not a failure for ``_watch``
    for c in conns:
        try:
            c.send("shutdown")
        except OSError:
            pass
    deadline = time.monotonic() + 1.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(2.0)


def worker_context():
    """``forkserver``: one clean, single-threaded server process (started on first use, with
    torch and the worker code imported once) forks each rank, so an engine's ranks start in a
    fraction of a second instead of each importing torch (seconds); nothing of the engine's
    process (threads, CUDA state) is inherited, as with ``spawn``. ``spawn`` where there is no
    forkserver (not POSIX)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return torch.multiprocessing.get_context("spawn")
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["qkv.distributed.worker"])
    return ctx


class TensorParallelExecutor:
    """Spawns and drives ranks 1..N-1. ``model`` is rank 0's shard; ``specs`` (from
    ``rank_config``) are the per-rank cache specs the engine plans its pools with.

    Weights: from a safetensors checkpoint every rank, rank 0 too, reads only its own slices
    from the files (checkpoint.py; ``self.checkpoint`` names them); any other source (GGUF, a
    dict) is read whole here and each worker is sent its slice (``shard_weights``)."""

    def __init__(self, config, weights: dict | None, size: int, device: torch.device, dtype: torch.dtype,
                 groups: list[int], timeout_s: float | None = None, attention_backend: str = "reference"):
        timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        self.layout = Layout.of(config, size)
        self.size, self.timeout_s = size, timeout_s
        if device.type == "cuda":
            if device.index not in (None, 0):
                raise ValueError(f"tensor_parallel_size={size} uses cuda:0..cuda:{size - 1}; pass device 'cuda'")
            if torch.cuda.device_count() < size:
                raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; "
                                 f"{torch.cuda.device_count()} are visible")
            device = torch.device("cuda", 0)
        self.device = device
        self.rank_config = rank_config(config, self.layout)
        self._failed: TensorParallelError | None = None
        store = master_store(size)
        ctx = worker_context()
        self.procs, self.conns = [], []
        from qkv.distributed import worker

        threads = torch.get_num_threads()
        self.checkpoint = CheckpointFiles.of(weights)
        for r in range(1, size):
            ours, theirs = ctx.Pipe()
            shard = self._shard(weights, r) if self.checkpoint is None else self.checkpoint
            p = ctx.Process(target=worker.main, name=f"qkv-tp-rank{r}", daemon=True,
                            args=(r, size, store.port, config, shard, groups, str(rank_device(device, r)),
                                  dtype, timeout_s, threads, theirs, attention_backend))
            p.start()
            theirs.close()
            self.procs.append(p)
            self.conns.append(ours)
        stopping = threading.Event()
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns, stopping)
        try:
            self.group = connect(0, size, store.port, device, timeout_s, store=store)
            if device.type == "cuda" and self.procs:
                threading.Thread(target=_watch, args=([p.sentinel for p in self.procs], self.group.pg, stopping),
                                 name="qkv-tp-watch", daemon=True).start()
            shard = self._shard(weights, 0)
            self.model = build_shard(config, groups, shard, self.layout, self.group, device, dtype)
        except Exception as e:
            raise self.failure(e) from e

    def _shard(self, weights, rank: int) -> dict | None:
        """Rank ``rank``'s weights: read from the files (a checkpoint), else sliced from ``weights``."""
        if self.checkpoint is not None:
            return self.checkpoint.read_shard(self.layout, rank)
        return shard_weights(weights, self.layout, rank) if weights is not None else None

    # ---------------------------------------------------------------- lifecycle
    def _collect(self, tag: str, what: str) -> list:
        """Each worker's reply ``(tag, value)`` in rank order; TensorParallelError naming the
        rank when one reports an error, exits, or does not answer within the join timeout."""
        deadline = time.monotonic() + max(self.timeout_s, JOIN_TIMEOUT_S)
        values = []
        for r, c in enumerate(self.conns, start=1):
            while not c.poll(0.5):
                self.check()
                if time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel rank {r} did not {what} in time")
            reply = c.recv()
            if reply[0] != tag:
                raise TensorParallelError(f"tensor-parallel rank {r} failed to {what}: {reply[1]}")
            values.append(reply[1])
        return values

    def profile_kv_budget(self, model, specs, block_size: int, max_tokens: int, max_num_seqs: int,
                          utilization: float, device: torch.device, kv_dtype: torch.dtype | None = None) -> int:
        """``gpu.profile_kv_budget`` on every rank at once (its forward pass runs the
        collectives, so all ranks must run it); the smallest rank's budget, which every rank
        then allocates."""
        from qkv.engine import gpu

        try:
            for c in self.conns:
                c.send(("profile", specs, block_size, max_tokens, max_num_seqs, utilization, kv_dtype))
            own = gpu.profile_kv_budget(model, specs, block_size, max_tokens, max_num_seqs, utilization,
                                        device, kv_dtype)
            return min([own, *self._collect("budget", "profile its memory")])
        except Exception as e:
            raise self.failure(e) from e

    def start_cache(self, specs: list, block_size: int, n_blocks: list[int], prefix_caching: bool,
                    kv_dtype: torch.dtype, kv) -> "TensorParallelRunner":
        """Have every worker allocate its cache shard (same blocks, its heads); rank 0's runner."""
        try:
            for c in self.conns:
                c.send(("init", specs, block_size, n_blocks, prefix_caching, kv_dtype))
            self._collect("ready", "start")
        except Exception as e:
            raise self.failure(e) from e
        return TensorParallelRunner(self, self.model, kv, self.device, kv_dtype)

    def capture_graphs(self, runner: "TensorParallelRunner", max_num_seqs: int, max_model_len: int) -> None:
        """Every rank captures its decode graphs (graphs.py), the collectives inside; then
        rank 0's runner replays them for pure decode steps and has the workers replay theirs."""
        from qkv.distributed.graphs import TensorParallelGraphs
        from qkv.engine import gpu

        try:
            for c in self.conns:
                c.send(("graphs", max_num_seqs, max_model_len))
            graphs = TensorParallelGraphs(runner, max_num_seqs, max_model_len, self.group)
            t = graphs.capture()
            t = max([t, *self._collect("captured", "capture its CUDA graphs")])
        except Exception as e:
            raise self.failure(e) from e
        runner.graphs = graphs
        gpu.log(f"captured CUDA graphs for decode batch sizes {graphs.sizes} on {self.size} rank(s), "
                f"all-reduces inside, in {t:.1f} s")

    def shutdown(self) -> None:
        self._finalizer()

    @property
    def failed(self) -> TensorParallelError | None:
        """The error that ended the group, None while it works (the server's /health reads it)."""
        return self._failed

    # ---------------------------------------------------------------- steps
    def broadcast(self, msg: dict) -> None:
        self.check()
        for c in self.conns:
            c.send(msg)

    def check(self) -> None:
        """Raise TensorParallelError if the group failed before or a worker has exited."""
        if self._failed is not None:
            raise self._failed
        dead = [(r, p) for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
        if dead:
            raise self.failure(None)

    def failure(self, cause: BaseException | None) -> TensorParallelError:
        """The error describing why the group failed (dead ranks first); stops the others."""
        if isinstance(cause, TensorParallelError) and self._failed is cause:
            return cause
        deadline = time.monotonic() + 0.5  # a rank killed mid-step may still be exiting
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                for r, p in enumerate(self.procs, start=1) if p.exitcode is not None]
        if dead:
            parts = dead
        elif cause is not None and not isinstance(cause, Exception):
            parts = [f"rank 0 was interrupted mid-step ({type(cause).__name__})"]
        else:
            parts = [f"rank 0 failed (collective timeout {self.timeout_s:g} s)"]
        if cause is not None and str(cause):
            parts.append(str(cause))
        msg = f"tensor parallelism (size {self.size}) failed: {'; '.join(parts)}; the engine cannot continue"
        self._failed = TensorParallelError(msg)
        self.shutdown()
        return self._failed


class TensorParallelRunner(ModelRunner):
    """Rank 0's ModelRunner: prepares the step as usual, broadcasts it, runs its own shard.
    A pure decode step with graphs (``graphs``, set by ``capture_graphs``) is staged, sent
    and replayed instead (graphs.py)."""

    def __init__(self, executor: TensorParallelExecutor, model, kv, device, kv_dtype):
        super().__init__(model, kv, device, kv_dtype)
        self.executor = executor

    @torch.inference_mode()
    def execute(self, sched, all_logits: bool = False, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        self.executor.check()
        try:
            if self.graphs is not None and not all_logits and self.graphs.can_run(sched):
                self._copy_blocks(sched.copies)
                n, size = self.graphs.stage(sched, prev_tokens)
                self.executor.broadcast(self.graphs.pack(n, size, sched.copies))
                return self.graphs.replay(n, size)
            input_ids, positions, batch = self.prepare(sched, prev_tokens)
            self.executor.broadcast(step.pack(sched.copies, input_ids, positions, batch, all_logits))
            return step.run(self, sched.copies, input_ids, positions, batch, all_logits)
        except (RuntimeError, OSError, EOFError) as e:
            raise self.executor.failure(e) from e
        except BaseException as e:  # interrupted (Ctrl-C) mid-step: the ranks are out of step for good
            self.executor.failure(e)
            raise
