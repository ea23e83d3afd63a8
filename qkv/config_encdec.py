"""What BART's and Whisper's ``config.json`` share, as transformers reads them: sizes bounded and
named, and ``d_model`` split evenly by the decoder's and the encoder's attention heads."""

from __future__ import annotations

from collections.abc import Callable

from qkv.config import ConfigError, bounded_int


def sizer(d: dict, source: str) -> Callable[[str, int], int]:
    """``size(name, default)``: ``d[name]`` (or the default) as a bounded int; ConfigError
    naming the field and ``source`` otherwise."""

    def size(name: str, default: int) -> int:
        try:
            return bounded_int(name, d.get(name, default), 1 << 20)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    return size


def model_and_heads(size: Callable[[str, int], int], source: str, hidden: int, heads: int) -> tuple[int, int, int]:
    """(d_model, decoder heads, encoder heads), defaults as given; each head count divides d_model."""
    hidden = size("d_model", hidden)
    dec, enc = size("decoder_attention_heads", heads), size("encoder_attention_heads", heads)
    for name, h in (("decoder_attention_heads", dec), ("encoder_attention_heads", enc)):
        if hidden % h:
            raise ConfigError(f"{source}: d_model={hidden} is not a multiple of {name}={h}")
    return hidden, dec, enc
