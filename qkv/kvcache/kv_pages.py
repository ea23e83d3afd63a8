"""Packed KV pages: int8/int4 values and their scales in one uint8 page per block.

A layer's packed cache is a uint8 tensor ``[num_blocks, page_bytes]`` (``spec.cache_shape``)
carrying its ``PageLayout`` as the attribute ``kv_layout`` (``new_cache`` sets it; the
runner's tensor is the one every layer and backend receives, so the attribute travels with
it). One page = one block of ``block_size`` tokens, planes one after the other, each plane
its packed values first, then its scales:

    [K values: bs x rows x value_bytes(width)] [K scales: bs x rows x groups, fp16 (int8) or e5m3 bytes (int4)]
    [V values ...] [V scales ...]                       (no V plane for an MLA latent)

with rows x width = kv heads x head_dim (MLA: 1 x (kv_lora_rank + rope_dim)). Values and
scales apart keep a kernel's loads contiguous: a tile of tokens reads one run of packed
bytes and one run of scales. ``page_bytes == block_size * spec.bytes_per_token`` exactly,
so the pool, ``qkv memory`` and the runner's allocation agree to the byte.

Within a plane the rows are token-major (token t's row of head h is ``t * rows + h``) or, with
``PageLayout.head_major`` (set by ``HEAD_MAJOR_BY_BITS`` when the layout is made: int4 pages are),
head-major (``h * bs + t``): a decode program reads one head's tokens, which then lie in one run
(1 KB of int4 values for 16 tokens of head_dim 128) instead of 64 B every 512. Same bytes either
way; MLA's one row is both.
The Triton kernels compute rows in ``attention/triton/page_rows.py``.

Every 16-bit region must start at an even byte: widths must be multiples of 4.

Integer K and V planes of width a power of two store ``hadamard(x)`` (an orthonormal rotation
of the head dimension, QuaRot's trick) rather than x: a few key channels carry most of a key's
magnitude (RoPE'd outlier channels), and one group scale per 16 values then rounds every other
channel of the group to zero. Rotated, each channel carries a mix of all of them, so a group's
absmax is close to its typical value. Scores are unchanged, since ``(Hq).(Hk) = q.k``: the
backends rotate the query instead of un-rotating keys, and rotate the output
(``P (H v) = H (P v)``, H its own inverse) instead of every value. ``read`` returns vectors in the
rotated space. SmolLM2 int4 perplexity (groups of 32, fp16 scales): +20.6% unrotated, +7.99%
rotated; the current format's in docs/kv-cache.md.
MLA latents are not rotated (the absorbed kernels read them as they are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkv.kvcache.kv_int import SCALE_DTYPE, PackedKV, PlaneFormat, dequantize, hadamard, quantize

# Whether a layout stores each plane's rows head-major (the module doc), by the narrower plane's
# bits, as the decode kernel picks its tiling. H200, session 18, one call: int4's decode kernel at
# 32 x 8k 112.3 us head-major against 136.2 token-major (with V's words keys-fastest, packed.V_WORDS
# 5), at the 1000/1000 run's shape 219 against 251 us, its prefill over 2,048 cached 4.94 against
# 5.21 ms, the 1000/1000 run 12,910 out tok/s against 12,690. int8 stays token-major: its engine
# run is the same (10,587 against 10,609) and its prefill's own rows 11% slower head-major.
HEAD_MAJOR_BY_BITS = {4: True, 8: False}
# None: HEAD_MAJOR_BY_BITS; True or False: every layout made from now on (tests, benchmarks).
HEAD_MAJOR: bool | None = None


@dataclass(frozen=True)
class Plane:
    fmt: PlaneFormat
    rows: int
    width: int
    values_at: int  # byte offset in the page
    scales_at: int  # byte offset in the page (== end of values for a float plane)
    end: int
    rotated: bool = False  # stores hadamard(x): see the module doc


@dataclass(frozen=True)
class PageLayout:
    block_size: int
    planes: tuple[Plane, ...]  # (K, V) or (latent,)
    head_major: bool = False  # rows h * block_size + t, not t * rows + h (module doc)

    @property
    def page_bytes(self) -> int:
        return self.planes[-1].end


def plane_shapes(spec) -> list[tuple[int, int]]:
    """(rows, width) of each plane of ``spec``: K and V heads, or the one MLA latent row."""
    if spec.kind == "mla":
        return [(1, spec.kv_lora_rank + spec.rope_dim)]
    return [(spec.num_kv_heads, spec.head_dim)] * 2


def token_bytes(packed: PackedKV, spec) -> int:
    fmts = (packed.k, packed.v)
    return sum(f.token_bytes(r, w) for f, (r, w) in zip(fmts, plane_shapes(spec)))


def layout(spec, block_size: int) -> PageLayout:
    packed: PackedKV = spec.packed
    at, planes = 0, []
    for fmt, (rows, width) in zip((packed.k, packed.v), plane_shapes(spec)):
        if width % 4:
            raise ValueError(f"a packed {packed.label} KV cache needs head widths that are multiples of 4, got {width}")
        vals = block_size * rows * fmt.value_bytes(width)
        scales = block_size * rows * fmt.scale_count(width) * fmt.scale_bytes
        rotated = fmt.is_int and spec.kind != "mla" and width & (width - 1) == 0
        planes.append(Plane(fmt, rows, width, at, at + vals, at + vals + scales, rotated))
        at += vals + scales
    bits = min(p.fmt.bits for p in planes)
    head_major = HEAD_MAJOR_BY_BITS.get(bits, False) if HEAD_MAJOR is None else bool(HEAD_MAJOR)
    return PageLayout(block_size, tuple(planes), head_major)


def new_cache(spec, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed cache tensor for one layer of ``spec``; a packed one carries its ``kv_layout``.
    On the CPU its pages become resident only when written (kvcache/zero_pages.py)."""
    from qkv.kvcache.zero_pages import zeros

    t = zeros(spec.cache_shape(num_blocks, block_size), dtype=dtype, device=device)
    if getattr(spec, "packed", None) is not None:
        t.kv_layout = layout(spec, block_size)
    return t


def layout_of(cache: torch.Tensor) -> PageLayout | None:
    return getattr(cache, "kv_layout", None)


# ---------------------------------------------------------------- reference reads and writes
def _regions(cache: torch.Tensor, p: Plane, bs: int, head_major: bool = False):
    """Views of plane ``p``'s values [blocks, bs, rows, value bytes] and scales [blocks, bs, rows, groups]
    (head-major pages: the same views, strided)."""
    def rows_of(region):
        if head_major:
            return region.unflatten(1, (p.rows, bs, -1)).transpose(1, 2)
        return region.unflatten(1, (bs, p.rows, -1))

    vals = cache[:, p.values_at:p.scales_at]
    if not p.fmt.is_int:
        return rows_of(vals.view(p.fmt.float_dtype)), None
    vals = rows_of(vals)
    scales = cache[:, p.scales_at:p.end]
    if p.fmt.scale_bytes == 2:
        scales = scales.view(SCALE_DTYPE)
    return vals, rows_of(scales)


def read(cache: torch.Tensor, plane: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Plane ``plane``'s vectors at ``slots`` (any shape S) -> [*S, rows, width] in ``dtype``."""
    lay = cache.kv_layout
    p, bs = lay.planes[plane], lay.block_size
    vals, scales = _regions(cache, p, bs, lay.head_major)
    blk, pos = slots // bs, slots % bs
    if scales is None:
        return vals[blk, pos].to(dtype)
    return dequantize(vals[blk, pos], scales[blk, pos], p.fmt, dtype)


def write(cache: torch.Tensor, plane: int, x: torch.Tensor, slots: torch.Tensor) -> None:
    """Store x [N, rows, width] at ``slots`` [N] (all >= 0), quantized as the plane's format."""
    lay = cache.kv_layout
    p, bs = lay.planes[plane], lay.block_size
    vals, scales = _regions(cache, p, bs, lay.head_major)
    blk, pos = slots // bs, slots % bs
    if scales is None:
        from qkv.kvcache.kv_quant import to_cache

        vals[blk, pos] = to_cache(x, p.fmt.float_dtype)
        return
    q, s = quantize(hadamard(x) if p.rotated else x, p.fmt)
    vals[blk, pos] = q
    scales[blk, pos] = s


def stored(cache: torch.Tensor, plane: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` as plane ``plane`` would read it back (kv_int.as_stored; rotated, if the plane is)."""
    from qkv.kvcache.kv_int import as_stored

    p = cache.kv_layout.planes[plane]
    return as_stored(hadamard(x) if p.rotated else x, p.fmt)


def rotated(cache: torch.Tensor, plane: int) -> bool:
    return cache.kv_layout.planes[plane].rotated


def with_packed(specs: list, packed: PackedKV | None) -> list:
    """``specs`` storing packed pages of ``packed`` (unchanged when None)."""
    if packed is None:
        return specs
    if packed.k != packed.v and any(s.kind == "mla" for s in specs):
        # The latent is stored in K's format: V's was dropped unsaid ("int8,int4" ran as int8).
        raise ValueError(f"kv_dtype {packed.label}: an MLA latent is one plane, keys and values alike, so K and V "
                         f"cannot be stored apart; give one format")
    from dataclasses import replace

    return [replace(s, packed=packed, dtype_bytes=1) for s in specs]
