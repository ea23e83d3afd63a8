"""How transformers reads a ``config.json``, reproduced field by field for ``ModelConfig.from_hf``.

Each rule cites the HF behaviour it copies (``Qwen2Config.__post_init__``, the modeling files'
``bias=`` arguments, ``standardize_rope_params``), so a config means here what it means there.
"""

from __future__ import annotations

from typing import Any

from qkv.config import ARCHITECTURES, ROPE_SCALINGS, ConfigError, bounded_int


def hf_fields(d: dict, source: str) -> dict:
    """``ModelConfig`` fields from an HF config dict, read the way transformers reads them."""
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: no 'model_type' field")
    checkpoint_dtype = _declared_dtype(d)  # before a nested text_config replaces d
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
            return bounded_int(names[0], need(*names), 1 << 20)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def number(name: str, value: Any) -> float:
        """A float field (ModelConfig checks its range; this keeps float() from guessing)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        return float(value)

    eos = d.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    common = dict(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
        checkpoint_dtype=checkpoint_dtype or _declared_dtype(d),
    )
    if model_type == "whisper":
        from qkv.config_whisper import whisper_fields

        return whisper_fields(d, source, common)
    if model_type == "bart":
        from qkv.config_bart import bart_fields

        return bart_fields(d, source, common)
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
        rope_theta=number("rope_theta", rope_theta or 10000.0),
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
        cfg["rope_local_theta"] = number("rope_local_base_freq", rope_local or 10000.0)
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
        if kv_heads != heads:  # MLA ran every head from the latent regardless; HF fails at its first step
            raise ConfigError(f"{source}: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} "
                              f"for {model_type} (MLA has a latent, not KV heads)")
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


def _declared_dtype(d: dict) -> str | None:
    """The weights' dtype a config declares: transformers 5 writes "dtype", 4.x "torch_dtype"
    (when both are, "dtype" is read). Anything but a string is ignored."""
    for key in ("dtype", "torch_dtype"):
        if isinstance(d.get(key), str):
            return d[key]
    return None
