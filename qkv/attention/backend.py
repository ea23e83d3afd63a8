"""Attention implementations by name, and which one a model calls.

``reference`` (plain torch) runs everywhere and is the oracle; a GPU backend registers itself
under another name with the same signature (``register``). The registry is process-wide; the
*choice* is not: it belongs to each engine's model. Every module that calls attention declares
``attention_backend`` (class default "reference") and passes it to ``attention`` /
``mla_attention``; the engine sets it once with ``use(model, name)`` after building the model.
So a CUDA engine on Triton and a CPU engine on the reference live side by side in one process,
and a model built outside an engine (tests, tools) runs the reference unless told otherwise.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from qkv.attention import reference

_BACKENDS: dict[str, Callable] = {"reference": reference.paged_attention}
_MLA_BACKENDS: dict[str, Callable] = {}  # the reference MLA is imported on first use


def register(name: str, fn: Callable, mla: Callable | None = None) -> None:
    """Add a backend; ``mla`` is its MLA attention (same signature as the reference's)."""
    _BACKENDS[name] = fn
    if mla is not None:
        _MLA_BACKENDS[name] = mla


def check(name: str) -> str:
    """``name`` if a backend of that name is registered, else ValueError listing those that are."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (have: {', '.join(_BACKENDS)})")
    return name


def use(model: nn.Module, name: str) -> None:
    """Make every module of ``model`` that declares ``attention_backend`` call backend ``name``.
    Affects this model only; call it again before graph capture if it changes."""
    check(name)
    for m in model.modules():
        if hasattr(m, "attention_backend"):
            m.attention_backend = name


def attention(q, k, v, kv_cache, batch, group, scale, window=None, softcap=None, dilation=1, *,
              name: str = "reference"):
    """q [T, H, D], k/v [T, KVH, D]; writes k/v into ``kv_cache`` and returns [T, H, Dv] through
    backend ``name``. ``dilation`` d: a query at i sees keys i, i-d, ..., i-(window-1)*d (needs ``window``)."""
    return _BACKENDS[name](q, k, v, kv_cache, batch, group, scale, window, softcap, dilation)


def mla_attention(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed, *,
                  name: str = "reference"):
    """MLA over the latent cache (see attention/mla_reference.py for the contract) through backend
    ``name``; backends without an MLA implementation use the reference."""
    fn = _MLA_BACKENDS.get(name)
    if fn is None:
        from qkv.attention.mla_reference import mla_paged_attention as fn
    return fn(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed)
