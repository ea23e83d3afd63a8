"""Which attention implementation the layers call.

``reference`` (plain torch) runs everywhere and is the oracle; a GPU backend registers
itself under another name with the same signature and is chosen by ``set_backend``.
"""

from __future__ import annotations

from typing import Callable

from qkv.attention import reference

_BACKENDS: dict[str, Callable] = {"reference": reference.paged_attention}
_MLA_BACKENDS: dict[str, Callable] = {}  # the reference MLA is imported on first use
_current = "reference"


def register(name: str, fn: Callable, mla: Callable | None = None) -> None:
    """Add a backend; ``mla`` is its MLA attention (same signature as the reference's)."""
    _BACKENDS[name] = fn
    if mla is not None:
        _MLA_BACKENDS[name] = mla


def set_backend(name: str) -> None:
    global _current
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (have: {', '.join(_BACKENDS)})")
    _current = name


def current() -> str:
    return _current


def attention(q, k, v, kv_cache, batch, group, scale, window=None, softcap=None, dilation=1):
    """q [T, H, D], k/v [T, KVH, D]; writes k/v into ``kv_cache`` and returns [T, H, Dv].
    ``dilation`` d: a query at i sees keys i, i-d, ..., i-(window-1)*d (needs ``window``)."""
    return _BACKENDS[_current](q, k, v, kv_cache, batch, group, scale, window, softcap, dilation)


def mla_attention(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed):
    """MLA over the latent cache (see attention/mla_reference.py for the contract); backends
    without an MLA implementation use the reference."""
    fn = _MLA_BACKENDS.get(_current)
    if fn is None:
        from qkv.attention.mla_reference import mla_paged_attention as fn
    return fn(q_nope, q_pe, c_kv, k_pe, kv_cache, batch, group, scale, w_uk, w_uv, absorbed)
