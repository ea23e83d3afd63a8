"""Programmatic dependent launch (PDL) between the decode step's Triton kernels (Hopper and later).

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream
is still running (once every program of that one has started, or called
``gdc_launch_dependents``); ``gdc_wait`` then blocks until the earlier kernel has finished and
its writes are visible. Work before the wait overlaps the earlier kernel's tail: the GEMVs
load their weight tile there (weights are never written by the step), so at batch 1 a
projection's DRAM latency hides behind the kernel before it. CUDA-graph stream capture keeps
the launch attribute as a programmatic edge between the two kernel nodes.

The contract each kernel with a ``PDL`` constexpr keeps, so that "the kernel before me has
finished" stays transitive along the stream: every program calls ``sync(PDL)`` exactly once,
before any load of data another kernel writes, before any store, and before it can return.

Switch (read at import; ``configure`` changes it before graph capture): ``QKV_PDL`` = ``0``
(off), ``1`` (wait, then let the next kernel launch) or ``2`` (the default: let the next kernel
launch at the very start, then wait, so kernels further down the stream may start their
prologues too). Off under the interpreter and below compute capability 9.0. Qwen3-0.6B's
batch-1 decode on an H200: 1,115 tok/s without, 1,230 with mode 1, 1,290 with mode 2; with the
in-kernel split merge 1,368 (mode 2) against 1,140 before (docs/benchmarks.md).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MODE = 0


def configure(mode: int | str | None) -> None:
    """Set the PDL mode (0, 1 or 2; see the module doc). Recapture CUDA graphs after changing it."""
    global MODE
    mode = int(mode or 0)
    if mode not in (0, 1, 2):
        raise ValueError(f"QKV_PDL: {mode} is not 0 (off), 1 or 2")
    MODE = mode


configure(os.environ.get("QKV_PDL", "2"))
_CAPABLE: dict = {}


def mode(device) -> int:
    """The PDL mode for a launch on ``device`` (a torch device or tensor): 0 where unsupported."""
    if MODE == 0 or INTERPRET:
        return 0
    import torch

    dev = getattr(device, "device", device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    ok = _CAPABLE.get(idx)
    if ok is None:
        ok = _CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return MODE if ok else 0


def launch(device) -> tuple[int, dict]:
    """(the ``PDL`` constexpr, the extra launch keywords) for a launch on ``device``."""
    m = mode(device)
    return m, ({"launch_pdl": True} if m else {})


@triton.jit
def sync(PDL: tl.constexpr):
    """Wait for the kernel before this one (and let the next one launch); no-op when PDL == 0."""
    if PDL == 1:
        gdc_wait()
        gdc_launch_dependents()
    elif PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
