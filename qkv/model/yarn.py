"""YaRN RoPE scaling (as DeepSeek-V2/V3 configs use it), matching HF's ``_compute_yarn_parameters``.

Low-frequency dimensions (wavelength longer than the original context) are interpolated by
``factor``, high-frequency ones are kept, and a linear ramp between ``beta_fast`` and
``beta_slow`` rotations blends the two. The attention factor scales cos and sin (so q.k by
its square); DeepSeek additionally folds ``mscale_all_dim`` into the softmax scale, which is
``softmax_scale_factor`` below and is applied by the MLA layer, not here.
"""

from __future__ import annotations

import math

import torch


def get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor) for rotary dimension ``dim``."""
    factor = scaling.get("factor")
    orig = scaling.get("original_max_position_embeddings")
    if factor is None or orig is None:
        raise ValueError(f"YaRN rope scaling needs 'factor' and 'original_max_position_embeddings': {scaling}")
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 - ramp  # 1 where the original frequency is kept
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def softmax_scale_factor(scaling: dict | None) -> float:
    """Extra factor on the softmax scale: DeepSeek's ``mscale(factor, mscale_all_dim) ** 2``."""
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return 1.0
    m = scaling.get("mscale_all_dim", 0)
    return get_mscale(scaling["factor"], m) ** 2 if m else 1.0
