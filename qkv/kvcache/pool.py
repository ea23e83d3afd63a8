"""BlockPool: the fixed set of KV blocks, their reference counts, and the LRU of cached ones.

Every block is in exactly one of three states, which is the invariant the tests check:
  - in use:   ``ref_count > 0`` (some request's block table points at it)
  - cached:   ``ref_count == 0`` and it holds a hashed, full block a later request may reuse
  - free:     ``ref_count == 0`` and nothing worth keeping
so ``num_free + num_cached + num_in_use == num_blocks`` always.

Cached and free blocks share one eviction queue (oldest release first). Allocation takes
from its head; a cached block taken there is evicted (its hash forgotten). A prefix hit on a
cached block pulls it out of the queue wherever it is.

Contract: the pool never frees on its own. Whoever calls ``allocate`` or ``ref`` owns one
reference and must hand it back through ``release``.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Blocks with ref_count 0, oldest release first. Values are unused.
        self._evictable: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._num_cached = 0

    # ------------------------------------------------------------ counts
    @property
    def num_available(self) -> int:
        """Blocks ``allocate`` can hand out now (free plus evictable cached)."""
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        return self._num_cached

    @property
    def num_free(self) -> int:
        return len(self._evictable) - self._num_cached

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._evictable)

    # ------------------------------------------------------------ alloc/free
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks with ref_count 1; the caller owns them. Evicts cached blocks LRU."""
        if n > len(self._evictable):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._evictable)} available")
        out = []
        for _ in range(n):
            b, _ = self._evictable.popitem(last=False)
            self._forget_hash(b)
            self.ref_count[b] = 1
            out.append(b)
        return out

    def ref(self, b: int) -> None:
        """Add a reference to block ``b`` (a prefix hit or a fork)."""
        if self.ref_count[b] == 0:
            del self._evictable[b]
            if self.block_hash[b] is not None:
                self._num_cached -= 1
        self.ref_count[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. Blocks reaching zero join the eviction queue
        in the order given, so pass a sequence's blocks tail first: its tail is evicted first."""
        for b in blocks:
            if self.ref_count[b] <= 0:
                raise RuntimeError(f"block {b} released more often than referenced")
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self._evictable[b] = None
                if self.block_hash[b] is not None:
                    self._num_cached += 1

    # ------------------------------------------------------------ prefix cache
    def lookup(self, h: bytes) -> int | None:
        return self.hash_to_block.get(h)

    def set_hash(self, b: int, h: bytes) -> None:
        """Mark in-use block ``b`` as holding the full block keyed ``h``.

        If another block already holds ``h`` (two requests computed the same block at once),
        the first stays the canonical copy and ``b`` stays unhashed."""
        if self.block_hash[b] is not None or h in self.hash_to_block:
            return
        self.block_hash[b] = h
        self.hash_to_block[h] = b

    def _forget_hash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            del self.hash_to_block[h]
            self.block_hash[b] = None
            self._num_cached -= 1

    def reset_prefix_cache(self) -> None:
        for b in list(self._evictable):
            self._forget_hash(b)
