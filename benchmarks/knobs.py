"""Module defaults set from the command line (an A/B of a kernel option without editing the
code): gpu_bench.py ``--packed-set`` and mixed_step_profile.py ``--set``/its variants.

Keys: ``NAME`` (``qkv/attention/triton/packed.py``'s), ``module.NAME`` (that module under
``qkv.attention.triton``: ``packed_prefill.HALVES``) or a full ``qkv.x.y.NAME``
(``qkv.kvcache.kv_pages.HEAD_MAJOR``). JSON lists become the tuples the modules hold; a default
held by plane bits (a dict) is updated at the keys given, and refuses anything but a dict.
"""

from __future__ import annotations

import importlib


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def set_defaults(knobs: dict, flag: str = "--set") -> dict:
    """Set each knob; returns the values they replaced (for ``set_defaults(old)`` after)."""
    old = {}
    for key, value in knobs.items():
        mod_name, _, name = key.rpartition(".")
        path = mod_name if mod_name.startswith("qkv.") else f"qkv.attention.triton.{mod_name or 'packed'}"
        mod = importlib.import_module(path)
        old[key] = cur = getattr(mod, name)
        value = _tuples(value)
        if isinstance(cur, dict):
            if not isinstance(value, dict):
                raise SystemExit(f"{flag} {key}: a default by bits ({cur}); give a dict such as "
                                 f'{{"{key}": {{"4": ...}}}}, not {value!r}')
            value = {**cur, **{int(k): _tuples(v) for k, v in value.items()}}
        setattr(mod, name, value)
    return old
