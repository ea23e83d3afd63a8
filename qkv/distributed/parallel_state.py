"""One tensor-parallel group: its rank, size and the collectives the sharded layers call.

The group is a ``torch.distributed`` process group object created from a TCPStore, not the
global default group: the engine's process (rank 0) may be a user's script or the server,
and two engines, or an engine rebuilt after a failure, must not fight over global state.
Every collective has a bounded timeout (``timeout_s``): a rank that hangs makes the others
fail with an error instead of waiting forever; a rank that dies closes its sockets, which
gloo reports at once.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


class TensorParallelError(RuntimeError):
    """A rank died, a collective failed or timed out: the tensor-parallel engine cannot go on."""


@dataclass
class TPGroup:
    rank: int
    size: int
    pg: object  # ProcessGroupGloo | ProcessGroupNCCL
    timeout_s: float

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; returns ``t``."""
        self.pg.allreduce([t]).wait()
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank, in place; returns ``t``."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([t], opts).wait()
        return t

    @property
    def can_capture(self) -> bool:
        """Whether this group's collectives can be captured in a CUDA graph: NCCL's can
        (after one eager collective has set up the communicator), gloo's cannot (host side)."""
        nccl = getattr(dist, "ProcessGroupNCCL", None)  # absent from CPU builds of torch
        return nccl is not None and isinstance(self.pg, nccl)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (equal shapes), in rank order."""
        t = t.contiguous()
        outs = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([outs], [t]).wait()
        return outs


# Joining waits for every rank to start (spawn imports torch: seconds on a loaded machine),
# which the collectives' timeout, meant to catch a hung rank within a step, must not bound.
JOIN_TIMEOUT_S = 300.0


def connect(rank: int, size: int, port: int, device: torch.device, timeout_s: float,
            store: dist.TCPStore | None = None) -> TPGroup:
    """Join the group whose TCPStore listens on 127.0.0.1:``port`` (rank 0 passes the store it
    created). Blocks until all ``size`` ranks have joined, at most ``JOIN_TIMEOUT_S``; each
    collective then fails after ``timeout_s``."""
    join = datetime.timedelta(seconds=JOIN_TIMEOUT_S)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = join
        pg = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = join
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        pg = dist.ProcessGroupGloo(store, rank, size, opts)
    pg.set_timeout(datetime.timedelta(seconds=timeout_s))  # joined: now bound each collective
    return TPGroup(rank, size, pg, timeout_s)


def master_store(size: int) -> dist.TCPStore:
    """Rank 0's store on a free loopback port (``store.port``); workers connect to it."""
    return dist.TCPStore("127.0.0.1", 0, size, True, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
                         wait_for_workers=False)
