"""A token's row in a plane of a packed page (``kvcache/kv_pages.py``): token-major (``t * KVH + h``,
a token's heads side by side) or head-major (``h * BS + t``, a head's tokens in one run, what a
decode program reads). Every packed kernel finds rows here, with ``HEAD_MAJOR`` from the cache's
``PageLayout.head_major``; only ``kv_pages._regions`` knows the same thing on the torch side.

The decode kernels' tiles of keys (``packed_fast``) find their pages and rows here too: per key
through the block table (``_keys``), or, for tiles aligned to pages, as one or two scalar entries
(``_keys_one_page``), loaded a tile ahead (``_page_entries`` then ``_keys_entries``)."""

import triton
import triton.language as tl


@triton.jit
def page_row(t, h, KVH: tl.constexpr, BS: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Row of token ``t`` (its position in the page, < BS) of KV head ``h``."""
    if HEAD_MAJOR:
        row = h * BS + t
    else:
        row = t * KVH + h
    return row


@triton.jit
def _keys(BT_ROW, start, hi, ring, page_bytes, kvh, KVH: tl.constexpr, BS: tl.constexpr,
          BLOCK_N: tl.constexpr, HAS_RING: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Keys [start, start + BLOCK_N): (valid mask, byte offset of each key's page, its row in
    the page's planes for this KV head)."""
    pos = start + tl.arange(0, BLOCK_N)
    nmask = pos < hi
    pg = pos // BS
    if HAS_RING:
        pg = pg % ring
    blk = tl.load(BT_ROW + pg, mask=nmask, other=0).to(tl.int64)
    return nmask, blk * page_bytes, page_row(pos % BS, kvh, KVH, BS, HEAD_MAJOR)


@triton.jit
def _page_entries(BT_ROW, start, hi, ring, BS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RING: tl.constexpr):
    """The block-table entries (scalars) of a page-aligned tile's page(s): (first, second; the
    second is the first when BLOCK_N <= BS). Past ``hi``: 0 (not read)."""
    pg = start // BS
    if HAS_RING:
        pg = pg % ring
    e0 = tl.load(BT_ROW + pg, mask=start < hi, other=0)
    e1 = e0
    if BLOCK_N > BS:
        pg2 = start // BS + 1
        if HAS_RING:
            pg2 = pg2 % ring
        e1 = tl.load(BT_ROW + pg2, mask=start + BS < hi, other=0)
    return e0, e1


@triton.jit
def _keys_entries(e0, e1, start, hi, page_bytes, kvh, KVH: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_MAJOR: tl.constexpr):
    """``_keys_one_page`` from entries ``_page_entries`` loaded earlier (``ONE_PAGE`` 2: a tile
    ahead, so the copies' addresses never wait on a block-table load)."""
    pos = start + tl.arange(0, BLOCK_N)
    if BLOCK_N > BS:
        base = tl.where(tl.arange(0, BLOCK_N) < BS, e0.to(tl.int64) * page_bytes, e1.to(tl.int64) * page_bytes)
    else:
        base = tl.zeros([BLOCK_N], tl.int64) + e0.to(tl.int64) * page_bytes
    nmask = pos < hi  # (before the row: the token-major build's op order, and so its SASS, unchanged)
    t = pos % BS
    if HEAD_MAJOR and BLOCK_N <= BS:  # one page: the tile's rows are one run, as arange shows the
        t = start % BS + tl.arange(0, BLOCK_N)  # compiler (500 -> 473 SASS a 16-key tile, sm_90)
    return nmask, base, page_row(t, kvh, KVH, BS, HEAD_MAJOR)


@triton.jit
def _keys_one_page(BT_ROW, start, hi, ring, page_bytes, kvh, KVH: tl.constexpr, BS: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_RING: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """``_keys`` for tiles aligned to pages (``ONE_PAGE``: tiles start at multiples of BLOCK_N,
    and BLOCK_N divides BS or is 2 BS): a tile's block-table entries are one or two scalar
    loads and its page offsets scalars (splat), not a load and a 64-bit product per key."""
    pos = start + tl.arange(0, BLOCK_N)
    pg = start // BS
    if BLOCK_N > BS:  # two pages
        pg2 = pg + 1
        if HAS_RING:
            pg2 = pg2 % ring
        blk2 = tl.load(BT_ROW + pg2, mask=start + BS < hi, other=0).to(tl.int64) * page_bytes
    if HAS_RING:
        pg = pg % ring
    blk = tl.load(BT_ROW + pg).to(tl.int64) * page_bytes
    if BLOCK_N > BS:
        base = tl.where(tl.arange(0, BLOCK_N) < BS, blk, blk2)
    else:
        base = tl.zeros([BLOCK_N], tl.int64) + blk
    nmask = pos < hi  # (before the row: the token-major build's op order, and so its SASS, unchanged)
    t = pos % BS
    if HEAD_MAJOR and BLOCK_N <= BS:  # one page: the tile's rows are one run, as arange shows the
        t = start % BS + tl.arange(0, BLOCK_N)  # compiler (500 -> 473 SASS a 16-key tile, sm_90)
    return nmask, base, page_row(t, kvh, KVH, BS, HEAD_MAJOR)
