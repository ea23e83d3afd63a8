"""The CUDA watch of a tensor-parallel group (executor._watch): a worker that exits unasked
aborts the group's communicators (so a collective inside a replayed CUDA graph, outside NCCL's
watchdog, returns instead of waiting on the card for good); one that exits because rank 0 is
stopping the group aborts nothing. Checked with a stand-in group: NCCL's abort itself needs GPUs."""

from __future__ import annotations

import multiprocessing
import threading
import time

from qkv.distributed.executor import _watch


class Group:
    def __init__(self):
        self.aborted = threading.Event()

    def abort(self):
        self.aborted.set()


def _watched(stop_first: bool) -> bool:
    proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.3,), daemon=True)
    proc.start()
    pg, stopping = Group(), threading.Event()
    t = threading.Thread(target=_watch, args=([proc.sentinel], pg, stopping), daemon=True)
    t.start()
    if stop_first:  # rank 0 stops the group while the worker still runs (it exits 0.3 s later)
        stopping.set()
    proc.join(5)
    t.join(5)
    assert not t.is_alive()  # the watch ends either way
    return pg.aborted.is_set()


def test_a_worker_exiting_unasked_aborts_the_group():
    assert _watched(stop_first=False)


def test_a_worker_asked_to_stop_aborts_nothing():
    assert not _watched(stop_first=True)
