"""Longest sequences first: the order in which a decode launch hands its sequences to programs.

A decode launch's grid is (sequence, KV head, split), and the GPU starts programs in that order
as slots free up. When a launch has more programs than the SMs hold at once, the programs
started last set its end. The 768 x 1000 in / 1000 out run has 384 sequences x 8 KV heads =
3,072 single-warp programs of the int4 kernel, against about 2,100 resident. Programs of
1,000-2,000 keys each, taken in index order, end at ~1.57x the time of the same work spread
evenly. Longest first, every KV head of a sequence before the next sequence, they end at ~1.22x.
Sorted within each head's run of the grid instead, ~1.51x. These are list-scheduling
simulations (benchmarks/decode_order_sim.py). Measured on an H200 (2026-12-04, docs/benchmarks.md):
the int4 kernel at that shape takes 285 us instead of 371 (42.5% -> 55.3% of the copy rate),
fp8's 344.5 instead of 362.3, and the whole run gains 1.4% (int4) and 0.4% (fp8).

By default (``QKV_DECODE_LPT=0`` switches it off) the kernels walk their (sequence, KV head)
grid in ``order``'s sequence order, heads together, where ``order`` sorts the step's sequences
by length, longest first. It costs one argsort a step, kept in the batch's scratch, inside CUDA
graphs too. Each program computes what it computed before, so outputs are the same bit for bit.
The packed decode kernel (packed_fast.py) and the float one (decode.py) use it. The float one
does not use it in its batch-1 graph prologue, which reads the lengths before the previous
kernel ends.
"""

from __future__ import annotations

import os

import torch

ON = os.environ.get("QKV_DECODE_LPT", "1") != "0"
MIN_ROWS = 1024  # (sequence, KV head) rows of a launch below which all programs are resident anyway


def longest_first(num_computed: torch.Tensor, kv_heads: int, scratch: dict | None = None) -> torch.Tensor | None:
    """The launch's sequence order, longest first (int32 [B], on num_computed's device), or
    None where it does not apply (switched off, or too few rows to matter). ``scratch``: the
    step's dict (AttentionBatch.scratch); the order is computed once a step and shared by the
    step's layers."""
    if not ON or num_computed.shape[0] * kv_heads < MIN_ROWS:
        return None
    order = None if scratch is None else scratch.get("decode_order")
    if order is None or order.shape[0] != num_computed.shape[0]:
        order = torch.argsort(num_computed, descending=True).to(torch.int32)
        if scratch is not None:
            scratch["decode_order"] = order
    return order
