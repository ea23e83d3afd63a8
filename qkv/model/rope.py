"""RoPE frequency variants, matching HF's ``modeling_rope_utils`` (transformers 5).

``rope_inv_freq`` gives the inverse frequencies every position uses at load time. Two variants
change them with the sequence length, exactly as HF's ``dynamic_rope_update`` does:

- ``dynamic`` (NTK): a sequence longer than ``max_position_embeddings`` rotates with a larger
  base, ``base * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2))``, L its length.
- ``longrope``: a sequence longer than ``original_max_position_embeddings`` divides the
  frequencies by ``long_factor`` instead of ``short_factor``.

HF picks the frequencies once per forward call from ``max(position_ids) + 1`` and applies them
to every token of that call. qkv does the same per request and step: a request's tokens in a
step rotate by the frequencies of its length after the step (``num_computed + query_len``).
So ``LLM.logits`` over a whole prompt equals HF's full-sequence forward. Caveat: once a
sequence is past the threshold, HF's own cached decode differs from its full forward (cached
keys keep the frequencies of the call that computed them, only the new token uses the new
ones); qkv's decode reproduces HF's cached decode (``generate``), not a full recompute, and a
prompt split by chunked prefill rotates each chunk by the length reached at that chunk, as HF
would if fed the same chunks with a cache.
"""

from __future__ import annotations

import math

import torch

from qkv.config import ROPE_SCALINGS as SUPPORTED


def rope_kind(scaling: dict | None) -> str:
    s = scaling or {}
    return s.get("rope_type", s.get("type")) or "default"


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(dim: int, base: float, scaling: dict | None,
                  max_position_embeddings: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale (attention factor) at load time,
    i.e. for sequences no longer than ``length_threshold``."""
    kind = rope_kind(scaling)
    inv_freq = _base_inv_freq(dim, base)
    if kind in ("default", "dynamic"):  # dynamic equals default up to max_position_embeddings
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        from qkv.model.yarn import yarn_inv_freq

        return yarn_inv_freq(dim, base, scaling)
    if kind == "longrope":
        return _longrope(dim, base, scaling, "short_factor")
    raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: {', '.join(SUPPORTED)})")


def _longrope(dim: int, base: float, scaling: dict, which: str) -> tuple[torch.Tensor, float]:
    ext = torch.tensor(scaling[which], dtype=torch.float32)
    if ext.shape != (dim // 2,):
        raise ValueError(f"longrope {which} has {ext.numel()} entries, the rotary dimension needs {dim // 2}")
    orig, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * base ** shape), float(attention_factor)


def length_threshold(scaling: dict | None, max_position_embeddings: int) -> int | None:
    """Sequences longer than this use ``long_inv_freq``; None when the frequencies never change."""
    kind = rope_kind(scaling)
    if kind == "dynamic":
        return max_position_embeddings
    if kind == "longrope":
        return scaling["original_max_position_embeddings"]
    return None


def fixed_long_inv_freq(dim: int, base: float, scaling: dict | None) -> torch.Tensor | None:
    """longrope's long-sequence frequencies [dim/2] (fp32, CPU): the same for every sequence
    past the threshold, so a module keeps them on its device (a host-to-device copy per step
    cannot be captured into a CUDA graph). None for the kinds whose frequencies follow the length."""
    if rope_kind(scaling) != "longrope":
        return None
    return _longrope(dim, base, scaling, "long_factor")[0]


def long_inv_freq(dim: int, base: float, scaling: dict, max_position_embeddings: int,
                  seq_len: torch.Tensor) -> torch.Tensor:
    """Inverse frequencies [T, dim/2] for tokens of sequences of length ``seq_len`` [T]
    (only rows longer than ``length_threshold`` are used). fp32 in HF's order of operations."""
    fixed = fixed_long_inv_freq(dim, base, scaling)
    if fixed is not None:
        return fixed.to(seq_len.device)[None].expand(seq_len.shape[0], -1)
    factor = scaling["factor"]
    length = torch.clamp(seq_len.float(), min=float(max_position_embeddings))
    scaled = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
    return 1.0 / (scaled[:, None] ** exponent[None])
