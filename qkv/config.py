"""ModelConfig: one normalized description of every supported model.

HF ``config.json`` files and GGUF metadata both become a ``ModelConfig``; the
models, the cache specs and the memory tool read nothing else. Every layer
carries its attention kind (``layer_types``), so a model may mix full and
sliding-window layers (Gemma 3) and the cache manager sees that per layer.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A model description is incomplete, inconsistent or unsupported."""


# HF ``model_type`` -> qkv architecture (the model class that runs it).
ARCHITECTURES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "whisper": "whisper",  # encoder-decoder: config_whisper.py, model/whisper.py
    "bart": "bart",  # text encoder-decoder: config_bart.py, model/bart.py
}

# Largest value each size field may take: far above any released model, far below what
# would exhaust memory (a typo like num_hidden_layers=1e9 is refused, not allocated).
_INT_BOUNDS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_layers": 10_000, "num_heads": 1 << 12,
    "num_kv_heads": 1 << 12, "head_dim": 1 << 12, "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 26,
}
MAX_PARAMS = 10**13


def bounded_int(name: str, value: Any, hi: int) -> int:
    """``value`` as an int in 1..hi, else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 0 < value <= hi:
        raise ConfigError(f"{name}={value} is out of range (1..{hi})")
    return int(value)


def _finite(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, "
                          f"got {value!r}")


# RoPE scaling types qkv implements (qkv/model/rope.py), as HF's ``rope_type`` names them.
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass
class ModelConfig:
    model_type: str  # as HF names it: "llama", "qwen2", "gpt2", ...
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3
    sliding_window: int | None = None
    # One entry per layer: "full" or "sliding" (or "mla" for DeepSeek).
    layer_types: list[str] = field(default_factory=list)
    query_pre_attn_scalar: float | None = None  # Gemma 3 scales q by this^-0.5
    final_logit_softcapping: float | None = None
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # architecture details (MoE sizes, ...)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Per layer (an int means every sliding layer): Longformer's dilated window, attention_override.py.
    dilation: list[int] | int = 1
    # The weights' dtype as the checkpoint declares it (HF "dtype"/"torch_dtype"; "bfloat16" for
    # GGUF); None when unknown (random-weight shapes). Read only by engine/dtype.py ("auto").
    checkpoint_dtype: str | None = None

    def __post_init__(self) -> None:
        """Validate before anything is allocated: a bad field raises ConfigError naming it
        (``from_hf`` prefixes the source file). Covers HF and GGUF, which both end here."""
        for name, hi in _INT_BOUNDS.items():
            setattr(self, name, bounded_int(name, getattr(self, name), hi))
        for name in ("sliding_window", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, bounded_int(name, getattr(self, name), 1 << 20))
        _finite("norm_eps", self.norm_eps, allow_zero=True)
        _finite("rope_theta", self.rope_theta)
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name))
        for key in ("factor", "attention_factor"):
            if self.rope_scaling and self.rope_scaling.get(key) is not None:
                _finite(f"rope_scaling.{key}", self.rope_scaling[key])
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            self.layer_types = [kind] * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if bad := sorted(set(self.layer_types) - {"full", "sliding", "mla"}):
            raise ConfigError(f"layer_types: unsupported kinds {bad} (supported: full, sliding, mla)")
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types has sliding layers but sliding_window is not set")
        from qkv.attention_override import normalize_dilation  # (imports ConfigError from here)

        self.dilation = normalize_dilation(self.dilation, self.layer_types)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if (n := self.approx_num_params()) > MAX_PARAMS:
            raise ConfigError(f"implies ~{n:.3g} parameters (num_hidden_layers={self.num_layers}, "
                              f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}); limit {MAX_PARAMS:.0e}")

    def approx_num_params(self) -> int:
        """Weights the description implies (exact ints, no allocation): the bound that stops a
        typo'd size before any tensor exists."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        ex = self.extra or {}
        experts = int(ex.get("n_routed_experts") or 0) * 3 * h * int(ex.get("moe_intermediate_size") or 0)
        return self.num_layers * (attn + mlp + experts) + 2 * self.vocab_size * h

    @property
    def arch(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def max_context(self) -> int:
        """Positions the model encodes: ``max_position_embeddings``, times the factor under
        dynamic NTK scaling, whose point is to stretch past that length (vLLM derives its
        ``max_model_len`` the same way)."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "dynamic":
            return int(self.max_position_embeddings * scaling.get("factor", 1.0))
        return self.max_position_embeddings

    @property
    def attention_kind(self) -> str:
        if self.kv_lora_rank:
            return "MLA"
        if self.num_kv_heads == 1:
            return "MQA"
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Normalize an HF ``config.json`` dict. Raises ConfigError naming ``source``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        from qkv.config_hf import hf_fields  # HF's reading rules, kept in their own file

        fields = hf_fields(d, source)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
