"""A token's row in a plane of a packed page (``kvcache/kv_pages.py``): token-major (``t * KVH + h``,
a token's heads side by side) or head-major (``h * BS + t``, a head's tokens in one run, what a
decode program reads). Every packed kernel finds rows here, with ``HEAD_MAJOR`` from the cache's
``PageLayout.head_major``; only ``kv_pages._regions`` knows the same thing on the torch side."""

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
