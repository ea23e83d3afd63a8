"""Logits processors: vLLM's per-request options as batched tensor ops on the logits.

``apply(logits, reqs)`` returns the logits the sampler draws from. Only rows whose request
sets an option (``SamplingParams.processes_logits``) are touched; a batch without any returns
``logits`` itself, so requests without options pay nothing. Every option is one scatter or
mask over the whole batch: the host builds index lists from what it already knows (the
tokens of every due request have been read when sampling starts, async scheduling included:
``LLMEngine.step`` pops step n's tokens before sampling step n+1) and sends them to the
device without waiting for it. Python loops run over requests and their tokens, never over
the vocabulary.

Order and semantics follow vLLM v1: allowed_token_ids, bad_words, min_tokens (and Whisper's
suppress_token_ids at every step, begin_suppress_token_ids at the first output token) and logit_bias
first, then the penalties (repetition over prompt and output tokens, HF's formula; presence
and frequency over output tokens, OpenAI's), then min_p, relative to the most likely token
after temperature, expressed here on the logits (``l >= l_max + T ln min_p``) so that it
holds for any sampling path.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qkv.engine.request import Request

NEG_INF = float("-inf")


def _to(device: torch.device, x, dtype=np.int64) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=dtype)).to(device, non_blocking=True)


def apply(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """logits [N, V] float32, one row per request -> processed logits (a new tensor when any
    row is processed, else ``logits``)."""
    rows = [i for i, r in enumerate(reqs) if r.params.processes_logits]
    if not rows:
        return logits
    logits = logits.clone()
    device, V = logits.device, logits.shape[1]
    _allowed(logits, reqs, rows, device, V)
    _banned(logits, reqs, rows, device)
    _bias(logits, reqs, rows, device)
    _penalties(logits, reqs, rows, device, V)
    _min_p(logits, reqs, rows, device)
    return logits


def _allowed(logits, reqs, rows, device, V) -> None:
    rr, cc, limited = [], [], []
    for i in rows:
        ids = reqs[i].params.allowed_token_ids
        if ids is not None:
            limited.append(i)
            rr += [len(limited) - 1] * len(ids)
            cc += ids
    if not limited:
        return
    keep = torch.zeros(len(limited), V, dtype=torch.bool, device=device)
    keep[_to(device, rr), _to(device, cc)] = True
    idx = _to(device, limited)
    logits[idx] = logits[idx].masked_fill(~keep, NEG_INF)


def _banned(logits, reqs, rows, device) -> None:
    """bad_words (the last token of a word whose earlier tokens end the output); while the
    output is shorter than min_tokens, eos and stop_token_ids; suppress_token_ids always, and
    begin_suppress_token_ids while the output is empty (Whisper's SuppressTokens and
    SuppressBlank): set to -inf."""
    rr, cc = [], []
    for i in rows:
        r = reqs[i]
        out = r.output_token_ids
        for word in r.bad_words_ids:
            prefix = word[:-1]
            if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix):] == prefix):
                rr.append(i)
                cc.append(word[-1])
        if len(out) < r.params.min_tokens:
            rr += [i] * len(r.min_tokens_ids)
            cc += r.min_tokens_ids
        suppress = r.params.suppress_token_ids or []
        if not out and r.params.begin_suppress_token_ids:
            suppress = suppress + r.params.begin_suppress_token_ids
        rr += [i] * len(suppress)
        cc += suppress
    if rr:
        logits[_to(device, rr), _to(device, cc)] = NEG_INF


def _bias(logits, reqs, rows, device) -> None:
    rr, cc, vv = [], [], []
    for i in rows:
        bias = reqs[i].params.logit_bias
        if bias:
            rr += [i] * len(bias)
            cc += list(bias)
            vv += list(bias.values())
    if rr:
        logits.index_put_((_to(device, rr), _to(device, cc)), _to(device, vv, np.float32).to(logits.dtype),
                          accumulate=True)


def _penalties(logits, reqs, rows, device, V) -> None:
    pen = [i for i in rows if reqs[i].params.presence_penalty or reqs[i].params.frequency_penalty
           or reqs[i].params.repetition_penalty != 1.0]
    if not pen:
        return
    n = len(pen)
    out_r, out_c, prompt_r, prompt_c = [], [], [], []
    for j, i in enumerate(pen):
        r = reqs[i]
        out = r.output_token_ids
        out_r += [j] * len(out)
        out_c += out
        if r.params.repetition_penalty != 1.0:
            prompt = r.prompt_token_ids
            prompt_r += [j] * len(prompt)
            prompt_c += prompt
    counts = torch.zeros(n, V, dtype=torch.float32, device=device)
    if out_r:
        counts.index_put_((_to(device, out_r), _to(device, out_c)), torch.ones(len(out_r), device=device),
                          accumulate=True)
    seen = counts > 0
    if prompt_r:
        seen[_to(device, prompt_r), _to(device, prompt_c)] = True
    p = np.array([[reqs[i].params.repetition_penalty, reqs[i].params.frequency_penalty,
                   reqs[i].params.presence_penalty] for i in pen], dtype=np.float32)
    p = _to(device, p, np.float32)
    idx = _to(device, pen)
    x = logits[idx].float()
    rep = p[:, 0:1]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - p[:, 1:2] * counts - p[:, 2:3] * (counts > 0).float()
    logits[idx] = x.to(logits.dtype)


def _min_p(logits, reqs, rows, device) -> None:
    mp = [i for i in rows if reqs[i].params.min_p > 0 and not reqs[i].params.greedy]
    if not mp:
        return
    # p_i >= min_p * p_max after temperature T  <=>  l_i >= l_max + T ln(min_p)
    shift = _to(device, [reqs[i].params.temperature * math.log(reqs[i].params.min_p) for i in mp], np.float32)
    idx = _to(device, mp)
    x = logits[idx]
    floor = x.max(dim=-1, keepdim=True).values + shift[:, None].to(x.dtype)
    logits[idx] = x.masked_fill(x < floor, NEG_INF)
