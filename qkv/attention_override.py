"""Attention overrides: change how a loaded model's layers attend, without touching its weights.

Today one knob exists, ``dilation`` (Longformer's dilated sliding window): a sliding layer of
window ``W`` and dilation ``d`` lets the query at position ``i`` see keys ``i, i-d, ...,
i-(W-1)*d``, the same number of keys spread over ``W*d`` positions. No released checkpoint
is trained that way, so it is an experiment on a sliding-window model (Mistral, Gemma 3):

    LLM(path, attention_override={"dilation": 2})            # every sliding layer
    LLM(path, attention_override={"dilation": [1, 2, 1, 3]})  # one entry per layer
    qkv generate --attention-override '{"dilation": 2}' ...

A key this module does not know is refused by name, and so is a dilation on a layer that does
not slide (full attention has no window to dilate): nothing is silently ignored.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

from qkv.config import ConfigError

# The largest dilation accepted: far beyond any useful one, small enough that W * d stays sane.
MAX_DILATION = 1 << 16
KEYS = ("dilation",)


def normalize_dilation(value: Any, layer_types: list[str]) -> list[int]:
    """One dilation per layer from an int (every sliding layer; the others stay 1) or a list
    of one int per layer. Raises ConfigError naming the field (and the layer)."""
    n = len(layer_types)
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding"]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"dilation has {len(value)} entries for {n} layers")
        out = [_one(f"dilation[{i}]", d) for i, d in enumerate(value)]
        if bad := [i for i, d in enumerate(out) if d > 1 and layer_types[i] != "sliding"]:
            raise ConfigError(f"dilation > 1 on layers {bad}, which are {layer_types[bad[0]]!r} attention: only "
                              f"sliding-window layers can be dilated (sliding layers: {sliding or 'none'})")
        return out
    d = _one("dilation", value)
    if d > 1 and not sliding:
        raise ConfigError(f"dilation={d} needs sliding-window layers; this model has none "
                          f"(layer kinds: {sorted(set(layer_types))})")
    return [d if kind == "sliding" else 1 for kind in layer_types]


def _one(name: str, d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {d!r}")
    if not 1 <= d <= MAX_DILATION:
        raise ConfigError(f"{name}={d} is out of range (1..{MAX_DILATION})")
    return int(d)


def parse_override(text: str | dict | None, source: str = "--attention-override") -> dict:
    """The override as a dict: a JSON object string (the CLI's) or a dict (``LLM``'s)."""
    if text is None:
        return {}
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(text, dict):
        raise ConfigError(f"{source}: expected a JSON object such as {{\"dilation\": 2}}, got {type(text).__name__}")
    if unknown := sorted(set(text) - set(KEYS)):
        raise ConfigError(f"{source}: unknown keys {unknown} (known: {', '.join(KEYS)})")
    return text


def apply_attention_override(config, override: str | dict | None, source: str = "attention_override"):
    """``config`` (a ModelConfig) with the override applied; the same object when there is none.
    ConfigError names ``source`` and the field."""
    changes = parse_override(override, source)
    if not changes:
        return config
    try:
        return config.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
