"""Which attention implementation the layers call.

``reference`` (plain torch) runs everywhere and is the oracle; a GPU backend registers
itself under another name with the same signature and is chosen by ``set_backend``.
"""

from __future__ import annotations

from typing import Callable

from qkv.attention import reference

_BACKENDS: dict[str, Callable] = {"reference": reference.paged_attention}
_current = "reference"


def register(name: str, fn: Callable) -> None:
    _BACKENDS[name] = fn


def set_backend(name: str) -> None:
    global _current
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (have: {', '.join(_BACKENDS)})")
    _current = name


def current() -> str:
    return _current


def attention(q, k, v, kv_cache, batch, group, scale, window=None, softcap=None):
    """q [T, H, D], k/v [T, KVH, D]; writes k/v into ``kv_cache`` and returns [T, H, Dv]."""
    return _BACKENDS[_current](q, k, v, kv_cache, batch, group, scale, window, softcap)
