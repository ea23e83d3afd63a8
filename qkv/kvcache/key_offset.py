"""A fixed offset subtracted from every key before an integer K plane quantizes it.

Softmax is unchanged when every key a query sees moves by the same vector mu: each score
``q.(k - mu) = q.k - q.mu`` loses the same amount, so the attention weights and the output are
the same in exact arithmetic, whatever mu is (the attention module's keys have no softcap, sink
or bias term, where this would not hold). What mu changes is what the cache must store: models
with a key bias (Qwen2/2.5, GPT-2) add the same large vector ``b`` to every key before RoPE, a
few channels of it far larger than the keys' varying part, and a 16-value int4 group sized to
that bias rounds the part that carries the scores to a few levels. Subtracting it first
quantizes only what varies.

After RoPE the bias is rotated by each key's position, ``R_p b``, so no single vector removes
it exactly; mu is its mean over positions ``0 .. positions - 1`` (the RoPE table's rows): the
slow channel pairs (where the largest biases sit) keep nearly all of ``b``, the fast ones
average to ~0. Without RoPE (GPT-2) mu is ``b`` itself and removes the bias exactly. Every key's
stored bytes still depend on that key alone (mu is a constant of the layer), so every cache
property holds.
"""

from __future__ import annotations

import torch

POSITIONS = 4096


def key_offset(bias: torch.Tensor, rope=None, positions: int = POSITIONS) -> torch.Tensor:
    """mu [kv heads, head_dim] (fp32) for key bias ``bias`` [kv heads, head_dim] under ``rope``
    (a ``layers.RotaryEmbedding``, neox-style halves, or None)."""
    b = bias.detach().float()
    if rope is None:
        return b
    rope.ensure(positions - 1)
    c = rope.cos[:positions].float().mean(0)
    s = rope.sin[:positions].float().mean(0)
    b1, b2 = b.chunk(2, dim=-1)
    return b * c + torch.cat([-b2, b1], dim=-1) * s
