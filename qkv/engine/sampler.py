"""Sampler: one token per logits row, on the logits' device.

Greedy rows take the argmax. Other rows apply temperature, then top-k and top-p on the
sorted distribution (sorted only when one of them is asked), and draw by inverse CDF: one
uniform number a row against the cumulative probabilities. A request with a seed draws it
from its own generator, so its tokens do not depend on what else is in the batch. (The GPU's
kernel, ``attention/triton/sampling.py``, races exponentials instead: seeded draws differ
between the devices.)
"""

from __future__ import annotations

import os

import torch

from qkv.engine.request import Request


def _generator(req: Request, device: torch.device) -> torch.Generator | None:
    if req.seed is None:
        return None
    if req.generator is None or req.generator.device != device:
        req.generator = torch.Generator(device=device).manual_seed(req.seed)
    return req.generator


FAST_ARGMAX = os.environ.get("QKV_FAST_ARGMAX", "1") != "0"


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)``; on CUDA through the two-launch Triton argmax when triton is
    there (torch's one-row reduction over a 128k vocabulary took ~1% of a Llama-8B step)."""
    if FAST_ARGMAX and logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1:
        from qkv.attention.triton import gpu_argmax

        fast = gpu_argmax()
        if fast is not None:
            return fast.argmax(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """logits [N, V] float32, one row per request -> token ids [N] (int64, same device)."""
    greedy_tokens = greedy(logits)
    if all(r.params.greedy for r in reqs):
        return greedy_tokens
    if logits.is_cuda:  # one launch for every row's noise instead of one per seeded row
        from qkv.attention.triton import gpu_sampling

        fast = gpu_sampling()
        out = fast.sample(logits, reqs, greedy_tokens) if fast is not None else None
        if out is not None:
            return out
    device = logits.device
    temps = torch.tensor([r.params.temperature or 1.0 for r in reqs], device=device, dtype=torch.float32)
    logits = logits / temps[:, None]
    V = logits.shape[1]
    ks = [r.params.top_k if r.params.top_k > 0 else V for r in reqs]
    ps = [r.params.top_p for r in reqs]
    # Each row draws one uniform u (a seeded request from its own generator, so its token does
    # not depend on what else shares the batch) and takes the first token whose cumulative
    # probability passes u: inverse-CDF sampling, one random number a row where the
    # exponential race needs one per vocabulary entry (1-3 ms a row on a CPU). A row is sorted
    # (a full sort of the vocabulary) only when its own top-k or top-p cuts the distribution.
    cut = [k < V or p < 1.0 for k, p in zip(ks, ps)]
    u = torch.empty(len(reqs), dtype=torch.float32, device=device)
    for i, r in enumerate(reqs):
        u[i : i + 1].uniform_(generator=_generator(r, device))
    sampled = None if all(cut) else _draw(logits.softmax(dim=-1), u)
    if any(cut):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if any(k < V for k in ks):
            rank = torch.arange(V, device=device)[None, :]
            sorted_logits = sorted_logits.masked_fill(rank >= torch.tensor(ks, device=device)[:, None],
                                                      float("-inf"))
        if any(p < 1.0 for p in ps):
            probs = sorted_logits.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
            drop = before > torch.tensor(ps, device=device)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        choice = _draw(sorted_logits.softmax(dim=-1), u)
        ranked = order.gather(1, choice[:, None]).squeeze(1)
        sampled = ranked if sampled is None else torch.where(torch.tensor(cut, device=device), ranked, sampled)
    is_greedy = torch.tensor([r.params.greedy for r in reqs], device=device)
    return torch.where(is_greedy, greedy_tokens, sampled)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability exceeds ``u`` times the row's total
    (a token of probability 0 is never drawn: its cumulative sum equals its predecessor's)."""
    cdf = probs.cumsum(dim=-1)
    x = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
