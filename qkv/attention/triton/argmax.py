"""Greedy tokens on the GPU: the first index of each row's maximum in two small launches.

torch's ``argmax`` over one 128k-wide row of logits runs as one reduction that measured 38.5 us
a step in a Llama-3-8B batch-1 decode profile (H200, docs/benchmarks.md), about 1% of the step.
Here chunks of the row reduce in parallel (first maximum of each chunk), then one program per
row picks the first chunk holding the row's maximum: the same index as ``torch.argmax`` (the
first maximum; rows without NaN, which logits never hold).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_kernel(X, VAL, IDX, V, stride, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    j = tl.argmax(x, 0, tie_break_left=True)
    tl.store(VAL + row * C + c, tl.max(x, 0))
    tl.store(IDX + row * C + c, c * BLOCK + j)


@triton.jit
def _pick_kernel(VAL, IDX, OUT, C, C_PAD: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, C_PAD)
    v = tl.load(VAL + row * C + i, mask=i < C, other=float("-inf"))
    j = tl.argmax(v, 0, tie_break_left=True)
    tl.store(OUT + row, tl.load(IDX + row * C + j).to(tl.int64))


def argmax(logits: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for 2-D logits [N, V] (int64 [N])."""
    N, V = logits.shape
    C = triton.cdiv(V, block)
    val = torch.empty((N, C), dtype=torch.float32, device=logits.device)
    idx = torch.empty((N, C), dtype=torch.int32, device=logits.device)
    out = torch.empty((N,), dtype=torch.int64, device=logits.device)
    if N:
        _chunk_kernel[(N, C)](logits, val, idx, V, logits.stride(0), C, BLOCK=block, num_warps=8)
        _pick_kernel[(N,)](val, idx, out, C, C_PAD=max(16, triton.next_power_of_2(C)), num_warps=1)
    return out
