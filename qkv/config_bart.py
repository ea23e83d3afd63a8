"""How transformers reads a BART ``config.json`` (``BartConfig``), for ``ModelConfig.from_hf``.

BART is a text encoder-decoder: the encoder reads up to ``max_position_embeddings`` token ids
(``encoder_len``, the longest encoder input, sizing the cross-attention cache), the decoder
generates. The decoder is what ``ModelConfig``'s common fields describe; the encoder's sizes go
to ``extra`` with ``encoder_input="tokens"`` (engine/encoder.py checks the ids).
"""

from __future__ import annotations

from qkv.config_encdec import model_and_heads, sizer


def bart_fields(d: dict, source: str, common: dict) -> dict:
    """``ModelConfig`` fields of an HF BartConfig dict (defaults as BartConfig's)."""

    size = sizer(d, source)
    hidden, heads, enc_heads = model_and_heads(size, source, 1024, 16)
    positions = size("max_position_embeddings", 1024)
    return dict(
        **common,
        hidden_size=hidden,
        num_layers=size("decoder_layers", 12),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=size("decoder_ffn_dim", 4096),
        max_position_embeddings=positions,
        norm_eps=1e-5,  # nn.LayerNorm's default: BartConfig has no eps field
        hidden_act=d.get("activation_function", "gelu"),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        extra=dict(encoder_layers=size("encoder_layers", 12), encoder_attention_heads=enc_heads,
                   encoder_ffn_dim=size("encoder_ffn_dim", 4096), encoder_len=positions, encoder_input="tokens",
                   decoder_start_token_id=d.get("decoder_start_token_id", 2),
                   scale_embedding=bool(d.get("scale_embedding", False))),
    )
