"""How a KV cache budget is split between layer groups, and how much context it buys.

Every layer group has its own pool (kvcache/manager.py). A full-attention or MLA group grows
one block per ``block_size`` tokens of every sequence; a sliding-window group holds at most
a ring (or a window table) per sequence. A sequence never holds more blocks of a sliding
group than of a full one: its ring or window covers a subset of the positions its full
table covers. So sliding blocks past the full groups' count could never all be in use, and
the split is

    full groups:    G blocks each, the largest G whose bytes fit the budget, where
    sliding groups: min(cap, G) blocks, cap being what ``max_num_seqs`` sequences can hold:
        ring (prefix caching off):  max_num_seqs * ring_blocks
        window table (on):          max_num_seqs * (ring_blocks + 1) + the blocks one step's
                                    token budget adds (a chunk's blocks are held until the
                                    step ends)

Gemma 3 270M (fp32, 1 GiB, 64 sequences, blocks of 16) used to reserve 64 full rings,
2,112 sliding blocks = 96.7% of the budget, and left 362 global blocks = 5,792 tokens of
global context. With the split above both groups get 1,820 blocks = 29,120 tokens
(docs/kv-cache.md). A model of full layers only is unchanged: its groups share the budget.
"""

from __future__ import annotations

from qkv.kvcache.manager import KVCacheManager, group_layers
from qkv.kvcache.spec import CacheSpec, CrossAttention, SlidingWindow, cdiv


def sliding_caps(specs: list[CacheSpec], block_size: int, max_num_seqs: int, prefix_caching: bool = True,
                 max_num_batched_tokens: int = 2048) -> list[int | None]:
    """Per layer group: the most blocks a sliding group can ever have in use (None: a full group)."""
    caps = []
    for spec, _ in group_layers(specs):
        if not isinstance(spec, SlidingWindow):
            caps.append(None)
        elif prefix_caching:
            ring = spec.ring_blocks(block_size) + 1
            caps.append(max_num_seqs * ring + cdiv(max_num_batched_tokens, block_size))
        else:
            caps.append(max_num_seqs * spec.ring_blocks(block_size))
    return caps


def plan_num_blocks(specs: list[CacheSpec], block_size: int, max_num_seqs: int, budget_bytes: int | None = None,
                    num_blocks: int | list[int] | None = None, *, prefix_caching: bool = True,
                    max_num_batched_tokens: int = 2048, max_model_len: int | None = None) -> list[int]:
    """Blocks per layer group (the module doc gives the rule). ``num_blocks``: an int is G
    (sliding groups still get at most their cap); a list gives every group's count as is.
    Cross-attention groups (encoder-decoder models) are planned first by kvcache/cross.py."""
    grouped = group_layers(specs)
    if isinstance(num_blocks, (list, tuple)):
        if len(num_blocks) != len(grouped) or not all(isinstance(n, int) and n >= 1 for n in num_blocks):
            kinds = [s.kind for s, _ in grouped]
            raise ValueError(f"num_kv_blocks {list(num_blocks)} must give one positive count per layer "
                             f"group ({len(grouped)}: {', '.join(kinds)})")
        return list(num_blocks)
    if any(isinstance(s, CrossAttention) for s, _ in grouped):
        from qkv.kvcache.cross import plan_with_cross

        return plan_with_cross(specs, block_size, max_num_seqs, budget_bytes, num_blocks, max_model_len,
                               prefix_caching=prefix_caching, max_num_batched_tokens=max_num_batched_tokens)
    caps = sliding_caps(specs, block_size, max_num_seqs, prefix_caching, max_num_batched_tokens)
    if num_blocks is not None:
        return [num_blocks if c is None else min(num_blocks, c) for c in caps]
    block_bytes = [s.bytes_per_token * block_size * len(layers) for s, layers in grouped]
    full_bytes = sum(b for b, c in zip(block_bytes, caps) if c is None)

    def cost(g: int) -> int:
        return g * full_bytes + sum(min(c, g) * b for b, c in zip(block_bytes, caps) if c is not None)

    lo, hi = 0, budget_bytes // full_bytes if full_bytes else max(caps)
    while lo < hi:  # the largest G whose cost fits: cost grows with G
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget_bytes else (lo, mid - 1)
    return [lo if c is None else min(c, lo) for c in caps]


def context_capacity(kv: KVCacheManager, max_model_len: int) -> tuple[int, int | None]:
    """(tokens one sequence can reach, tokens of global context all sequences hold together).
    The first is what admission accepts, capped by the model's context; the second is the
    smallest full group's pool in tokens (None: every layer slides, no global context)."""
    one = kv.max_tokens()
    one = max_model_len if one is None else min(one, max_model_len)
    full = [g.pool.num_blocks * kv.block_size for g in kv.groups
            if not isinstance(g.spec, (SlidingWindow, CrossAttention))]
    return one, min(full, default=None)


def capacity_line(kv: KVCacheManager, max_model_len: int, cache_bytes: int) -> str:
    """The engine's start-up line: bytes, blocks per group, and the context they buy."""
    one, together = context_capacity(kv, max_model_len)
    pools = ", ".join(f"{g.spec.kind} {g.pool.num_blocks}" for g in kv.groups)
    total = f"{together:,} tokens of global context for all sequences together" if together is not None \
        else "sliding windows only"
    return (f"KV cache: {cache_bytes / 2**20:,.1f} MiB, blocks of {kv.block_size} ({pools}) = {total}; "
            f"one sequence up to {one:,} tokens")
