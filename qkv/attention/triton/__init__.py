"""Triton GPU kernels: paged decode (GQA, split-K), varlen prefill over a paged prefix,
fused KV write, MLA decode, and the fused norm/RoPE/activation ops of the hot path.

Importing this package needs ``triton``; ``register()`` adds the backend under "triton".
"""

from __future__ import annotations


def available() -> bool:
    """Whether the Triton backend can run here (triton importable and a CUDA device, or the
    interpreter switched on with TRITON_INTERPRET=1)."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def register() -> None:
    from qkv.attention import backend
    from qkv.attention.triton.backend import paged_attention
    from qkv.attention.triton.mla import mla_paged_attention

    backend.register("triton", paged_attention, mla=mla_paged_attention)


_FUSED: list = []


def fused_ops():
    """The fused-op module, or None when triton is missing (checked once)."""
    if not _FUSED:
        try:
            from qkv.attention.triton import fused
        except ImportError:
            fused = None
        _FUSED.append(fused)
    return _FUSED[0]


_SAMPLING: list = []


def gpu_sampling():
    """The one-launch GPU sampler module, or None when triton is missing (checked once)."""
    if not _SAMPLING:
        try:
            from qkv.attention.triton import sampling
        except ImportError:
            sampling = None
        _SAMPLING.append(sampling)
    return _SAMPLING[0]


_ARGMAX: list = []


def gpu_argmax():
    """The two-launch GPU argmax module (greedy tokens), or None when triton is missing."""
    if not _ARGMAX:
        try:
            from qkv.attention.triton import argmax
        except ImportError:
            argmax = None
        _ARGMAX.append(argmax)
    return _ARGMAX[0]
