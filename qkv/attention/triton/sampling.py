"""Temperature sampling on the GPU in a fixed number of launches, whatever the batch.

The torch sampler draws each seeded row's exponential noise from that request's own
``torch.Generator``: one launch per row, 256 per step at batch 256, plus a sort of the whole
vocabulary for every row. Here one kernel draws every row's noise from Philox keyed by
``(row seed, token index)``, where a seeded request's row seed is a hash of its seed and its
position: its tokens stay reproducible and independent of the rest of the batch (they differ
from the CPU sampler's, which uses torch's generators). Rows without top-k/top-p skip the sort:
``argmax(p / E)`` with E ~ Exp(1) samples from p over tokens in any order.
"""

from __future__ import annotations

import random

import torch
import triton
import triton.language as tl


@triton.jit
def _exp_noise_kernel(OUT, SEEDS, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(SEEDS + row)
    u = tl.rand(seed, offs)  # uniform in [0, 1)
    e = tl.maximum(-tl.log(1.0 - u), 1e-20)  # Exp(1); the floor keeps p / e finite
    tl.store(OUT + row * stride + offs, e, mask=offs < V)


def exponential_noise(n: int, V: int, seeds: torch.Tensor) -> torch.Tensor:
    """[n, V] float32 Exp(1) noise, row i from Philox keyed by ``seeds[i]`` (int64 < 2**31)."""
    out = torch.empty((n, V), dtype=torch.float32, device=seeds.device)
    BLOCK = 4096
    _exp_noise_kernel[(n, triton.cdiv(V, BLOCK))](out, seeds, V, out.stride(0), BLOCK=BLOCK, num_warps=8)
    return out


def row_seed(seed: int | None, position: int) -> int:
    """A request's row seed at ``position``: fixed by (seed, position); random when unseeded."""
    if seed is None:
        return random.getrandbits(31)
    return hash((seed, position)) & 0x7FFFFFFF


def sample(logits: torch.Tensor, reqs, greedy_tokens: torch.Tensor) -> torch.Tensor | None:
    """Token ids [N] for rows that need neither top-k nor top-p; None when some row does (the
    caller then takes the sorting path). No host synchronization."""
    V = logits.shape[1]
    if any(0 < r.params.top_k < V or r.params.top_p < 1.0 for r in reqs):
        return None
    device = logits.device
    host = torch.tensor([[r.params.temperature or 1.0 for r in reqs],
                         [row_seed(r.seed, r.num_tokens) for r in reqs],
                         [r.params.greedy for r in reqs]], dtype=torch.float64)
    host = host.to(device, non_blocking=True)
    temps, seeds, is_greedy = host[0].float(), host[1].long(), host[2].bool()
    probs = (logits / temps[:, None]).softmax(dim=-1)
    choice = (probs / exponential_noise(len(reqs), V, seeds)).argmax(dim=-1)
    return torch.where(is_greedy, greedy_tokens, choice)
