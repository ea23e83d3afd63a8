"""EncoderRunner: runs the encoder of newly admitted requests and fills their cross pages.

Contract: the scheduler admits a request (its cross blocks taken by ``KVCacheManager.allocate``,
its ``encoder_len`` charged to the step's token budget); before that step's decoder pass the
runner calls ``run``, which encodes every scheduled request whose cross blocks are not yet
written (a batch of them at once), writes each decoder layer's cross K/V into those blocks and
marks the request encoded. The blocks are freed with the request (``KVCacheManager.free``); a
preempted request is encoded again when it is readmitted, from ``Request.encoder_features``.
"""

from __future__ import annotations

import hashlib

import torch

from qkv.engine.scheduler import ScheduledBatch
from qkv.kvcache.manager import KVCacheManager


class EncoderRunner:
    def __init__(self, model, kv: KVCacheManager, device: torch.device):
        self.model, self.kv, self.device = model, kv, device
        self.group = kv.cross.index(True)  # all cross layers share one group (equal specs)
        self.num_encoded = 0  # requests encoded so far (preemptions re-encode)

    @torch.inference_mode()
    def run(self, sched: ScheduledBatch) -> None:
        todo = [r for r in sched.requests if self.kv.needs_encoder(r.request_id)]
        if not todo:
            return
        bs = self.kv.block_size
        enc = self.model.encode_requests([r.encoder_features for r in todo])  # each [encoder_len, hidden]
        slots = []
        for r, h in zip(todo, enc):
            table = self.kv.block_tables(r.request_id)[self.group]
            pos = torch.arange(r.encoder_len)
            slots.append(torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs)
        rows = torch.cat(enc)
        self.model.write_cross_kv(rows, torch.cat(slots).to(self.device))
        for r in todo:
            self.kv.mark_encoded(r.request_id)
        self.num_encoded += len(todo)


def is_encoder_decoder(config) -> bool:
    from qkv.kvcache.cross import encoder_len

    return encoder_len(config) > 0


def check_device(config, device: torch.device, packed=None) -> None:
    """Encoder-decoder models run on the CPU and on CUDA (the Triton backend reads the cross
    pages with the paged decode kernel: attention/triton/cross.py), but the cross-attention
    path does not read packed int8/int4 pages (``packed``: the engine's packed K/V formats, None
    for float pages), so those are refused by name rather than run wrong."""
    if is_encoder_decoder(config) and packed is not None:
        raise ValueError(f"kv_dtype {packed.label}: {config.model_type}'s cross-attention cache does not read "
                         f"int8/int4 pages yet; use a float kv_dtype (fp8, bfloat16, float16, float32)")


def encoder_input(config, features, cache_salt: str | None) -> tuple[torch.Tensor | None, int, str | None]:
    """Check one request's encoder input; return (features on the CPU, encoder_len, cache salt).

    An encoder-decoder model needs ``features``; a decoder-only model refuses them. Whisper:
    a float log-mel tensor [num_mel_bins, 2 * encoder_len]. A text encoder (BART,
    ``extra["encoder_input"] == "tokens"``): the encoder's token ids, a list or a 1-D integer
    tensor of 1..encoder_len ids in the vocabulary. The salt folds in a SHA-256 of the input, so
    the prefix cache never shares decoder blocks between requests with different encoder input
    (the same prompt ids over other audio attend to other cross K/V, so their K/V differ)."""
    from qkv.kvcache.cross import encoder_len

    n = encoder_len(config)
    if not n:
        if features is not None:
            raise ValueError(f"encoder_features given, but {config.model_type} has no encoder")
        return None, 0, cache_salt
    tokens = config.extra.get("encoder_input") == "tokens"
    if features is None:
        what = f"encoder token ids (1..{n})" if tokens else f"log-mel [{config.extra['num_mel_bins']}, {2 * n}]"
        raise ValueError(f"{config.model_type} is an encoder-decoder model: each prompt needs encoder_features "
                         f"({what})")
    if tokens:
        features, n = _encoder_tokens(config, features, n)
    else:
        features = _log_mel(config, features, n)
    digest = hashlib.sha256(features.numpy().tobytes()).hexdigest()
    return features, n, f"{cache_salt or ''}\x00encoder:{digest}"


def _log_mel(config, features, n: int) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"encoder_features must be a torch.Tensor, got {type(features).__name__}")
    shape = (config.extra["num_mel_bins"], 2 * n)
    if tuple(features.shape) != shape or not features.is_floating_point():
        raise ValueError(f"encoder_features must be a float log-mel tensor of shape {list(shape)}, got "
                         f"{features.dtype} {list(features.shape)}")
    features = features.detach().to("cpu", torch.float32).contiguous()
    # A finite sum implies finite elements (an inf or nan anywhere makes it inf or nan): one
    # reduction, no [mels, frames] mask, for the common case; the mask only when the sum is not.
    if not bool(torch.isfinite(features.sum())) and not bool(torch.isfinite(features).all()):
        raise ValueError("encoder_features contain nan or inf")
    return features


def _encoder_tokens(config, ids, most: int) -> tuple[torch.Tensor, int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"encoder_features of {config.model_type} must be 1-D integer token ids, got "
                             f"{ids.dtype} {list(ids.shape)}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not ids or len(ids) > most:
        raise ValueError(f"encoder_features of {config.model_type} must be 1 to {most} encoder token ids")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"encoder token ids out of the vocabulary (integers in [0, {config.vocab_size})): {bad[:5]}")
    return torch.tensor(ids, dtype=torch.long), len(ids)
