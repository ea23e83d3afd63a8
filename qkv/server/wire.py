"""The messages between the front end and the engine process, as msgpack.

Front end -> engine (one PUSH socket, engine PULLs):

    ["add", head_ids, prompts, params, cache_salt, features]   one submission (n samples per prompt)
    ["abort", head_ids]                                         end these requests and their samples
    ["finish", sample_ids, kept]                                end these samples: a stop string matched at
                                                                output token kept[i] (later ones were not served)

Engine -> front end (one PUSH socket, front end PULLs):

    ["added", head_ids[0], error]       the submission was taken (error None) or refused: [kind, message]
    ["out", outputs, waiting, stats]    every output of one engine step, in one message
    ["failed", head_ids, message]       a step failed: these requests ended with an error

One ``out`` entry per sample that got a token: ``[sample_id, index, token, finish_reason,
num_cached_tokens, logprobs, prompt_logprobs]`` where ``logprobs`` is None or this token's
``[[token, logprob, rank, text], ...]`` and ``prompt_logprobs`` is sent once, with a
sample's first token. ``waiting`` counts sequences waiting for a seat; ``stats`` is the
engine's ``stats()`` dict or None (sent at most every ``STATS_EVERY_S``).
"""

from __future__ import annotations

import dataclasses

from qkv.engine.request import Logprob, SamplingParams

STATS_EVERY_S = 0.05  # how stale /metrics may be while the engine is busy


def packer():
    import msgpack

    return msgpack.Packer(use_bin_type=True).pack


def unpack(data: bytes):
    import msgpack

    # Integer map keys: logit_bias is {token id: bias}.
    return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)


def params_to_wire(p: SamplingParams) -> dict:
    """SamplingParams as a plain dict; the engine rebuilds (and re-validates) it."""
    d = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    so = d.get("structured_outputs")
    if so is not None:
        d["structured_outputs"] = {k: v for k, v in dataclasses.asdict(so).items() if v is not None and v is not False}
    return d


def params_from_wire(d: dict) -> SamplingParams:
    return SamplingParams(**d)


def logprobs_to_wire(entry: dict | None) -> list | None:
    if entry is None:
        return None
    return [[t, lp.logprob, lp.rank, lp.decoded_token] for t, lp in entry.items()]


def logprobs_from_wire(entry: list | None) -> dict | None:
    if entry is None:
        return None
    return {t: Logprob(lp, rank, text) for t, lp, rank, text in entry}


def tensor_to_wire(t) -> list | None:
    """An encoder input (Whisper's log-mel) as [dtype, shape, bytes]."""
    if t is None:
        return None
    a = t.detach().cpu().contiguous().numpy()
    return [a.dtype.str, list(a.shape), a.tobytes()]


def tensor_from_wire(w: list | None):
    if w is None:
        return None
    import numpy as np
    import torch

    dtype, shape, data = w
    return torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy())
