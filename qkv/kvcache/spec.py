"""Cache specs: what one attention layer costs per token, and which tokens it keeps.

This file is where the attention variants differ for memory purposes. The block pool,
the cache manager, the scheduler and ``qkv memory`` ask a spec; none of them knows
model names.

bytes per token per layer, element size ``s``:
  - full attention (MHA/GQA/MQA): ``2 * num_kv_heads * head_dim * s`` (a K and a V vector)
  - sliding window ``W``: the same per token, but a sequence holds at most
    ``ceil(W / block_size) + 1`` blocks: a ring, position ``i`` at ring slot ``i mod ring``;
    dilated by ``d``, the window's keys spread over ``W*d`` positions: ``ceil(W*d / block_size) + 1``
  - MLA: ``(kv_lora_rank + rope_dim) * s``: one latent and one shared RoPE key, no x2
  - cross attention (encoder-decoder): as full attention per encoder position, but a sequence
    holds ``ceil(encoder_len / block_size)`` blocks whatever its decoder length (kvcache/cross.py)
  - packed (``packed`` set: int8/int4, or K and V in different formats): each plane's values
    plus its group scales (fp16 for int8, e5m3 bytes for int4), ``kv_pages.token_bytes``; one block is one uint8 page
    ``[values | scales]`` per plane (layout in kvcache/kv_pages.py), ``dtype_bytes`` 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkv.kvcache.kv_int import PackedKV


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Paged:
    """What every spec computes the same way from its per-token ``entry_shape``."""

    @property
    def bytes_per_token(self) -> int:
        if self.packed is not None:
            from qkv.kvcache.kv_pages import token_bytes

            return token_bytes(self.packed, self)
        return math.prod(self.entry_shape) * self.dtype_bytes

    def packed_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """A packed cache: one uint8 page per block."""
        return (num_blocks, block_size * self.bytes_per_token)

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return cdiv(num_tokens, block_size)


@dataclass(frozen=True)
class FullAttention(_Paged):
    """MHA, GQA or MQA: every past token's K and V stay cached."""

    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 4
    packed: PackedKV | None = None
    kind = "full"

    @property
    def entry_shape(self) -> tuple[int, ...]:
        """Shape of one token's cache entry, [K|V, kv heads, head_dim]."""
        return (2, self.num_kv_heads, self.head_dim)

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache tensor: a K plane and a V plane of pages."""
        if self.packed is not None:
            return self.packed_shape(num_blocks, block_size)
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class SlidingWindow(FullAttention):
    """Attention over the last ``window`` tokens only: a rolling buffer of blocks.

    The ring holds ``ceil(window / block_size) + 1`` blocks: the window can straddle
    one more block boundary than it spans, so one extra block keeps every token the
    newest query can see while the next block fills.
    """

    window: int = 0
    dilation: int = 1  # keys i, i-d, ..., i-(window-1)*d: as many keys over window*d positions
    kind = "sliding"

    @property
    def span(self) -> int:
        """Positions a query's keys may lie in: ``window * dilation`` (``window`` undilated)."""
        return self.window * self.dilation

    def ring_blocks(self, block_size: int) -> int:
        return cdiv(self.span, block_size) + 1

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return min(cdiv(num_tokens, block_size), self.ring_blocks(block_size))


@dataclass(frozen=True)
class MLA(_Paged):
    """Multi-head latent attention: one compressed latent plus one RoPE key per token."""

    kv_lora_rank: int
    rope_dim: int
    dtype_bytes: int = 4
    packed: PackedKV | None = None  # the latent row in ``packed.k``'s format
    kind = "mla"

    @property
    def entry_shape(self) -> tuple[int, ...]:
        return (self.kv_lora_rank + self.rope_dim,)

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One layer's cache tensor: pages of [latent | rope key] rows."""
        if self.packed is not None:
            return self.packed_shape(num_blocks, block_size)
        return (num_blocks, block_size, self.kv_lora_rank + self.rope_dim)


@dataclass(frozen=True)
class CrossAttention(FullAttention):
    """Encoder-decoder attention: the K/V of the encoder output, one entry per encoder
    position. Written once when the request's encoder runs, read by every decoder step, never
    appended to, freed with the request. ``encoder_len`` is the longest encoder output (1500
    for Whisper); a sequence holds its blocks whatever its decoder length."""

    encoder_len: int = 0
    kind = "cross"

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        return cdiv(self.encoder_len, block_size)


CacheSpec = FullAttention | SlidingWindow | MLA | CrossAttention


def layer_specs(config, dtype_bytes: int) -> list[CacheSpec]:
    """One cache spec per layer of ``config`` (a ModelConfig)."""
    specs: list[CacheSpec] = []
    for kind in config.layer_types:
        if kind == "mla":
            specs.append(MLA(config.kv_lora_rank, config.qk_rope_head_dim, dtype_bytes))
        elif kind == "sliding":
            specs.append(SlidingWindow(config.num_kv_heads, config.head_dim, dtype_bytes, window=config.sliding_window,
                                       dilation=config.dilation[len(specs)]))
        else:
            specs.append(FullAttention(config.num_kv_heads, config.head_dim, dtype_bytes))
    from qkv.kvcache.cross import cross_specs  # encoder-decoder models: one more cache per decoder layer

    return specs + cross_specs(config, dtype_bytes)
