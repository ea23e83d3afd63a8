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
}

# Largest value each size field may take: far above any released model, far below what
# would exhaust memory (a typo like num_hidden_layers=1e9 is refused, not allocated).
_INT_BOUNDS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_layers": 10_000, "num_heads": 1 << 12,
    "num_kv_heads": 1 << 12, "head_dim": 1 << 12, "intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 26,
}
MAX_PARAMS = 10**13


def _bounded_int(name: str, value: Any, hi: int) -> int:
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

    def __post_init__(self) -> None:
        """Validate before anything is allocated: a bad field raises ConfigError naming it
        (``from_hf`` prefixes the source file). Covers HF and GGUF, which both end here."""
        for name, hi in _INT_BOUNDS.items():
            setattr(self, name, _bounded_int(name, getattr(self, name), hi))
        for name in ("sliding_window", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, _bounded_int(name, getattr(self, name), 1 << 20))
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
        fields = _hf_fields(d, source)
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _hf_fields(d: dict, source: str) -> dict:
    """``ModelConfig`` fields from an HF config dict, read the way transformers reads them."""
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: no 'model_type' field")
    if model_type == "gemma3" and "text_config" in d:
        d = {**d["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: unsupported architecture {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )

    def need(*names: str) -> Any:
        for n in names:
            if d.get(n) is not None:
                return d[n]
        raise ConfigError(f"{source}: missing required field {names[0]!r} for {model_type}")

    def need_int(*names: str) -> int:
        """A size that is divided by before ModelConfig validates: check it here."""
        try:
            return _bounded_int(names[0], need(*names), 1 << 20)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    eos = d.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    common = dict(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
    )
    if model_type == "gpt2":
        hidden = need_int("n_embd", "hidden_size")
        heads = need_int("n_head", "num_attention_heads")
        if hidden % heads:
            raise ConfigError(f"{source}: n_embd={hidden} is not a multiple of n_head={heads}")
        return dict(
            **common,
            hidden_size=hidden,
            num_layers=need("n_layer", "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=d.get("n_inner") or 4 * hidden,
            max_position_embeddings=need("n_positions", "max_position_embeddings"),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            hidden_act=d.get("activation_function", "gelu_new"),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
        )

    hidden = need_int("hidden_size")
    heads = need_int("num_attention_heads")
    # HF keeps an explicit 0 (and then fails); only a missing/null field means "as many as heads".
    kv_heads = heads if d.get("num_key_value_heads") is None else d["num_key_value_heads"]
    rope_scaling = d.get("rope_scaling")
    rope_params = d.get("rope_parameters")  # transformers >= 5 folds theta and scaling here
    rope_theta = d.get("rope_theta")
    rope_local = d.get("rope_local_base_freq")
    if isinstance(rope_params, dict):
        if "full_attention" in rope_params:  # per-layer-type parameters (Gemma 3)
            local = rope_params.get("sliding_attention") or {}
            if local.get("rope_type", local.get("type")) not in (None, "default"):
                raise ConfigError(f"{source}: RoPE scaling of the sliding_attention layers is not supported "
                                  f"(rope_parameters.sliding_attention={local})")
            rope_local = local.get("rope_theta", rope_local)
            rope_params = rope_params["full_attention"]
        rope_theta = rope_theta or rope_params.get("rope_theta")
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_scaling or rope_params
    rope_scaling = _rope_scaling(rope_scaling, d, source)
    n_layers = need("num_hidden_layers")
    cfg = dict(
        **common,
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=d.get("head_dim") or hidden // heads,
        intermediate_size=need("intermediate_size"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        hidden_act=d.get("hidden_act") or d.get("hidden_activation") or "silu",
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        **_biases(d, model_type),
    )
    if model_type in ("qwen3", "gemma3_text"):
        cfg["qk_norm"] = True
    if model_type == "mistral":
        # MistralConfig has no use_sliding_window or layer_types: a window, when set, is
        # every layer's (HF only warns about a layer_types field, and ignores it).
        if d.get("sliding_window") is not None:
            cfg["sliding_window"] = d["sliding_window"]
    if model_type in ("qwen2", "qwen3"):
        # As Qwen2Config.__post_init__: the window exists only with use_sliding_window;
        # an explicit layer_types wins over max_window_layers (default 28).
        window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
        types = d.get("layer_types")
        if types is None:
            mwl = d.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= mwl else "full_attention"
                     for i in range(n_layers)]
        cfg["layer_types"] = _layer_types(types, n_layers, source)
        if "sliding" in cfg["layer_types"]:
            if window is None:
                raise ConfigError(
                    f"{source}: layer_types has sliding_attention layers but no sliding window "
                    f"(sliding_window={d.get('sliding_window')!r}, "
                    f"use_sliding_window={d.get('use_sliding_window', False)!r})"
                )
            cfg["sliding_window"] = window
    if model_type == "gemma3_text":
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention=True is not supported")
        cfg["sliding_window"] = need("sliding_window")
        cfg["rope_local_theta"] = float(rope_local or 10000.0)
        cfg["query_pre_attn_scalar"] = d.get("query_pre_attn_scalar", cfg["head_dim"])
        cfg["final_logit_softcapping"] = d.get("final_logit_softcapping")
        cfg["tie_word_embeddings"] = d.get("tie_word_embeddings", True)
        types = d.get("layer_types")
        if not types:
            pattern = d.get("sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(n_layers)]
        cfg["layer_types"] = _layer_types(types, n_layers, source)
    if model_type in ("deepseek_v2", "deepseek_v3"):
        cfg.update(
            q_lora_rank=d.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            layer_types=["mla"] * n_layers,
            head_dim=need("qk_nope_head_dim") + need("qk_rope_head_dim"),
        )
        cfg["extra"] = {
            k: d.get(k)
            for k in (
                "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
                "routed_scaling_factor", "topk_method", "n_group", "topk_group",
                "norm_topk_prob", "scoring_func", "rope_interleave",
            )
        }
    return cfg


# HF layer type names qkv runs, and the legacy name transformers still remaps.
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "attention": "full"}


def _layer_types(types: Any, n_layers: int, source: str) -> list[str]:
    """HF ``layer_types`` -> qkv's ("full"/"sliding"); refuses any other kind by name."""
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"{source}: layer_types must list one type per layer ({n_layers}), got {types!r}")
    for i, t in enumerate(types):
        if t not in _LAYER_TYPES:
            raise ConfigError(
                f"{source}: layer_types[{i}]={t!r} is not supported "
                f"(supported: full_attention, sliding_attention)"
            )
    return [_LAYER_TYPES[t] for t in types]


def _biases(d: dict, model_type: str) -> dict[str, bool]:
    """Which projections carry a bias, exactly as each HF modeling file builds them."""
    attn = bool(d.get("attention_bias", False))
    mlp = bool(d.get("mlp_bias", False))
    if model_type == "llama":
        return dict(qkv_bias=attn, o_bias=attn, mlp_bias=mlp)
    if model_type == "mistral":  # hard-coded bias=False everywhere
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False)
    if model_type == "qwen2":  # hard-coded: q/k/v always, o and MLP never
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False)
    if model_type in ("qwen3", "gemma3_text"):  # attention_bias on q/k/v/o, MLP never
        return dict(qkv_bias=attn, o_bias=attn, mlp_bias=False)
    if model_type == "deepseek_v2":  # attention_bias on q_a/kv_a/o; mlp_bias on dense and shared MLPs
        return dict(qkv_bias=attn, o_bias=attn, mlp_bias=mlp)
    if model_type == "deepseek_v3":
        return dict(qkv_bias=attn, o_bias=attn, mlp_bias=False)
    raise AssertionError(model_type)


def _rope_scaling(scaling: dict | None, d: dict, source: str) -> dict | None:
    """HF's ``standardize_rope_params`` for the scaled variants: ``rope_type`` set, and
    ``original_max_position_embeddings`` (a top-level field wins, as for Phi-3) and ``factor``
    (YaRN/LongRoPE default: max_position_embeddings / original) filled in."""
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be an object, got {scaling!r}")
    partial = (scaling or {}).get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial} is not supported")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    if kind == "default":
        return None
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"{source}: unsupported RoPE scaling {kind!r} (supported: {', '.join(ROPE_SCALINGS)})")
    out = {**scaling, "rope_type": kind}
    max_pos = d.get("max_position_embeddings", 2048)
    if kind in ("llama3", "yarn", "longrope"):
        if d.get("original_max_position_embeddings") is not None:
            out["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        out.setdefault("original_max_position_embeddings", max_pos)
    if kind in ("yarn", "longrope") and out.get("factor") is None:
        out["factor"] = max_pos / out["original_max_position_embeddings"]
    needs = {"linear": ("factor",), "dynamic": ("factor",), "yarn": (),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}
    for key in needs[kind]:
        if out.get(key) is None:
            raise ConfigError(f"{source}: rope_scaling of type {kind!r} needs {key!r}")
    return out
