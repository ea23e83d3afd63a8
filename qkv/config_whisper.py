"""How transformers reads a Whisper ``config.json`` (``WhisperConfig``), for ``ModelConfig.from_hf``.

The decoder is what ``ModelConfig``'s common fields describe (its layers, heads, FFN, learned
positions up to ``max_target_positions``); the encoder's sizes go to ``extra``. ``encoder_len``
(``max_source_positions``, 1500 for every released Whisper) is the number of encoder output
positions: the conv stem halves the ``2 * max_source_positions`` mel frames of a 30 s window.
It sizes the cross-attention cache (kvcache/cross.py).
"""

from __future__ import annotations

from typing import Any

from qkv.config import ConfigError
from qkv.config_encdec import model_and_heads, sizer


def whisper_fields(d: dict, source: str, common: dict) -> dict:
    """``ModelConfig`` fields of an HF WhisperConfig dict (defaults as WhisperConfig's)."""

    size = sizer(d, source)
    hidden, heads, enc_heads = model_and_heads(size, source, 384, 6)
    act = d.get("activation_function", "gelu")
    extra: dict[str, Any] = dict(
        encoder_layers=size("encoder_layers", 4), encoder_attention_heads=enc_heads,
        encoder_ffn_dim=size("encoder_ffn_dim", 1536), num_mel_bins=size("num_mel_bins", 80),
        encoder_len=size("max_source_positions", 1500),
        decoder_start_token_id=d.get("decoder_start_token_id", 50257),
        # Whisper's decoding rules (audio/speech_engine.py): never these tokens; not these first.
        suppress_tokens=_ids(d.get("suppress_tokens"), "suppress_tokens", source),
        begin_suppress_tokens=_ids(d.get("begin_suppress_tokens"), "begin_suppress_tokens", source),
    )
    return dict(
        **common,
        hidden_size=hidden,
        num_layers=size("decoder_layers", 4),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=size("decoder_ffn_dim", 1536),
        max_position_embeddings=size("max_target_positions", 448),
        norm_eps=1e-5,  # nn.LayerNorm's default: WhisperConfig has no eps field
        hidden_act=act,
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=True,  # q and v only: k_proj has no bias (model/whisper.py)
        o_bias=True,
        mlp_bias=True,
        extra=extra,
    )


def _ids(value, name: str, source: str) -> list[int]:
    """A list of token ids (None: empty); anything else is refused naming the field."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(type(t) is int and t >= 0 for t in value):
        raise ConfigError(f"{source}: {name} must be a list of token ids, got {value!r}")
    return list(value)
