"""KV cache quantization: K/V (and MLA latents) stored in fp8 e4m3, attention computed in the
model's dtype.

Storing a token's K and V in one byte per element instead of two halves the cache: twice the
tokens fit in the same memory, and a memory-bound decode step reads half the KV bytes. The
cast is per element with a scale of 1 (e4m3's range is +-448, far beyond the K/V values of
the models we run); values past the range saturate rather than turn into NaN.

The contract every backend keeps, so that results do not depend on chunking, prefix caching
or batch composition: attention always sees K/V *as stored*. Keys read back from the cache
are fp8 rounded, so this step's own keys must be too, even where a kernel reads them from
``k``/``v`` rather than from the pages (``as_stored``).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast for storing in a cache of ``cache_dtype`` (saturating for fp8)."""
    if is_fp8(cache_dtype):
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(cache_dtype)


def as_stored(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as it reads back from a cache of ``cache_dtype``, in ``x``'s dtype."""
    if cache_dtype == x.dtype:
        return x
    return to_cache(x, cache_dtype).to(x.dtype)


def compute_dtype(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute attention in: the cache's, unless the cache is fp8 (then
    the query's: fp8 tiles are widened as they are loaded)."""
    return q_dtype if is_fp8(cache_dtype) else cache_dtype
