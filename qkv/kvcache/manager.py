"""KVCacheManager: each request's block tables, prefix hits, and copy-on-write.

Layers with equal cache specs form a *group*; each group has its own BlockPool and every
request has one block table per group. A full-attention table grows one block per
``block_size`` tokens. A sliding-window group keeps only the last ``ring_blocks`` blocks, in
one of two ways:
  - without prefix caching, a ring: position ``p`` lives in block ``(p // block_size) % ring``,
    and blocks are overwritten in place;
  - with prefix caching, a window: the table is indexed by position like a full one, and after
    each step the blocks that fell out of the window are released (keyed, so they stay
    cached) and replaced by the *null page*, a page past the pool that is never written or
    read. A prefix hit then needs every full group's blocks of the prefix and each window
    group's last ``ceil(W / block_size)`` of them.

Ownership contract:
  - ``match_prefix`` and ``allocate`` take references on behalf of the request;
  - ``free`` gives every one of them back (the scheduler calls it on finish, abort and
    preemption), so after any run ``free + cached == total`` in every pool;
  - a block is written only while its request holds the only reference: ``allocate``
    copies a shared block first and returns the (src, dst) pairs the runner must copy.

Cross-attention groups (encoder-decoder models, kvcache/cross.py) hold one table per request of
``ceil(request.encoder_len / block_size)`` blocks, taken by the first ``allocate`` and written by
the encoder (engine/encoder.py) before that step's decoder reads them; they are never keyed
(the prefix cache shares only decoder blocks, whose keys the engine salts with the audio's
hash), never grow and never need copy-on-write (forks only read them). ``free`` gives them back
in table order, so the pool hands the next request a consecutive run, which the CPU cross
attention reads as a view instead of a gather (attention/cross.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qkv.kvcache.pool import BlockPool
from qkv.kvcache.prefix import block_key
from qkv.kvcache.spec import CacheSpec, CrossAttention, SlidingWindow, cdiv


@dataclass
class LayerGroup:
    spec: CacheSpec
    layers: list[int]
    pool: BlockPool


@dataclass
class _Seq:
    tables: list[list[int]]  # one block table per group
    keys: list[bytes] = field(default_factory=list)  # prefix keys of the full blocks hashed so far
    dropped: list[int] = field(default_factory=list)  # per group: table entries before this are null
    blocks_seen: int = -1  # cdiv(num_computed_tokens, block_size) at the last cache_blocks
    encoded: bool = False  # cross groups: the encoder's K/V are written (engine/encoder.py)


def group_layers(specs: list[CacheSpec]) -> list[tuple[CacheSpec, list[int]]]:
    groups: dict[CacheSpec, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s, []).append(i)
    return list(groups.items())


class KVCacheManager:
    def __init__(self, specs: list[CacheSpec], block_size: int, num_blocks: list[int] | int,
                 enable_prefix_caching: bool = True):
        self.block_size = block_size
        grouped = group_layers(specs)
        if isinstance(num_blocks, int):
            num_blocks = [num_blocks] * len(grouped)
        self.groups = [LayerGroup(spec, layers, BlockPool(n)) for (spec, layers), n in zip(grouped, num_blocks)]
        self.enable_prefix_caching = enable_prefix_caching
        sliding = [isinstance(s, SlidingWindow) for s, _ in grouped]
        self.ring = [s.ring_blocks(block_size) if w and not enable_prefix_caching else None
                     for (s, _), w in zip(grouped, sliding)]
        # Positions a window group's queries may read back (a dilated window spreads over more).
        self.window = [s.span if w and enable_prefix_caching else None for (s, _), w in zip(grouped, sliding)]
        self.null = [g.pool.num_blocks if w is not None else None for g, w in zip(self.groups, self.window)]
        self.cross = [isinstance(s, CrossAttention) for s, _ in grouped]
        self._seqs: dict[str, _Seq] = {}

    # ---------------------------------------------------------------- queries
    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._seqs[request_id].tables

    def num_pages(self, group: int) -> int:
        """Pages the group's cache tensor holds: the pool's blocks, plus the null page."""
        return self.groups[group].pool.num_blocks + (self.null[group] is not None)

    def blocks_needed(self, num_tokens: int, encoder_len: int | None = None) -> list[int]:
        """Per group: the most blocks a sequence of ``num_tokens`` tokens holds at once when
        it runs alone, one token per step at worst. A window table holds one block more than
        a ring: it lets go of a block only after the step that left it (``cache_blocks``),
        so crossing into a new block briefly holds ``ring_blocks + 1``. Cross groups: the
        blocks of ``encoder_len`` positions (what ``allocate`` takes), else of the longest."""
        bs = self.block_size
        return [cdiv(encoder_len, bs) if c and encoder_len is not None
                else min(cdiv(num_tokens, bs), g.spec.ring_blocks(bs) + 1) if w is not None
                else g.spec.blocks_needed(num_tokens, bs) for g, w, c in zip(self.groups, self.window, self.cross)]

    def can_ever_fit(self, num_tokens: int, encoder_len: int | None = None) -> bool:
        return all(n <= g.pool.num_blocks for n, g in zip(self.blocks_needed(num_tokens, encoder_len), self.groups))

    def max_tokens(self) -> int | None:
        """The longest sequence ``can_ever_fit`` admits (None: any length, every group slides
        and its pool holds a whole ring). This is the context one sequence can reach."""
        bs, limits = self.block_size, []
        for g, w in zip(self.groups, self.window):
            n = g.pool.num_blocks
            if isinstance(g.spec, SlidingWindow) and n >= g.spec.ring_blocks(bs) + (w is not None):
                continue  # the group never holds more than its pool
            if isinstance(g.spec, CrossAttention):
                continue  # its size is the encoder's, not the sequence's (can_ever_fit checks it)
            limits.append(n * bs)
        return min(limits, default=None)

    def chunk_limit(self, request) -> int | None:
        """The most new tokens ``request`` can take in one step and still fit each window
        group's pool on its own (None: no limit). A window table holds every block of the
        chunk plus the window before it until the step ends, so a chunk of C tokens needs
        about ``ring_blocks + C / block_size`` blocks: a long prefill chunk can outgrow a pool
        that the sequence's length fits. For a request that ``can_ever_fit`` this is at least
        1, so capping the chunk by it lets an admitted request always run once alone."""
        seq, bs, start = self._seqs[request.request_id], self.block_size, request.num_computed_tokens
        limits = [(self.groups[g].pool.num_blocks + seq.dropped[g]) * bs - start
                  for g, w in enumerate(self.window) if w is not None]
        return min(limits, default=None)

    def slot(self, group: int, table: list[int], pos: int) -> int:
        """Flat cache slot of position ``pos`` in one group's block table."""
        idx = pos // self.block_size
        if self.ring[group] is not None:
            idx %= self.ring[group]
        return table[idx] * self.block_size + pos % self.block_size

    # ---------------------------------------------------------------- prefix
    def match_prefix(self, request, lookup: bool = True) -> int:
        """Open the request's tables with the longest cached prefix of its tokens; return
        the number of tokens served. Never the whole prompt: the last prompt token is always
        computed so that there are logits to sample from. ``lookup=False`` opens empty tables."""
        assert request.request_id not in self._seqs, f"{request.request_id} already has blocks"
        seq = _Seq(tables=[[] for _ in self.groups], dropped=[0] * len(self.groups))
        self._seqs[request.request_id] = seq
        if not lookup:
            return 0
        keys = self._cached_keys(request)
        n = len(keys)
        for g, group in enumerate(self.groups):
            if self.cross[g]:
                continue  # allocated and written fresh for every request
            first = 0 if self.window[g] is None else max(0, n - cdiv(self.window[g], self.block_size))
            table = seq.tables[g]
            table += [self.null[g]] * first
            seq.dropped[g] = first
            for k in keys[first:n]:
                b = group.pool.lookup(k)
                group.pool.ref(b)
                table.append(b)
        seq.keys = keys
        return n * self.block_size

    def cached_prefix(self, request) -> int:
        """The tokens ``match_prefix`` would serve ``request`` now; takes nothing, changes nothing."""
        return len(self._cached_keys(request)) * self.block_size

    def _cached_keys(self, request) -> list:
        """The keys of the longest prefix of full blocks (the last prompt token excluded) that
        every group holds: full groups every block of it, window groups those their window sees."""
        if not self.enable_prefix_caching:
            return []
        tokens, bs = request.all_token_ids, self.block_size
        full = [g for g, w in enumerate(self.window) if w is None and not self.cross[g]]
        keys, parent = [], None
        for i in range((len(tokens) - 1) // bs):
            parent = block_key(parent, tokens[i * bs:(i + 1) * bs], request.cache_salt)
            if any(self.groups[g].pool.lookup(parent) is None for g in full):
                break
            keys.append(parent)
        n = len(keys)  # the longest prefix every window group can also serve
        while n and not all(self.groups[g].pool.lookup(k) is not None
                            for g, w in enumerate(self.window) if w is not None
                            for k in keys[max(0, n - cdiv(w, bs)):n]):
            n -= 1
        return keys[:n]

    def cache_blocks(self, request) -> None:
        """After a step: key the request's new full, computed blocks so that later requests can
        reuse them; window groups then release the blocks no later query of it can see."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[request.request_id]
        tokens, bs = request.all_token_ids, self.block_size
        # Nothing filled since the last call and no window group can have lost a block: a
        # decode step is here bs - 1 times out of bs.
        blocks = -(-request.num_computed_tokens // bs)
        if blocks == seq.blocks_seen and request.num_computed_tokens // bs == len(seq.keys):
            return
        seq.blocks_seen = blocks
        for i in range(len(seq.keys), request.num_computed_tokens // bs):
            key = block_key(seq.keys[-1] if seq.keys else None, tokens[i * bs:(i + 1) * bs], request.cache_salt)
            for g, group in enumerate(self.groups):
                if not self.cross[g] and seq.tables[g][i] != self.null[g]:
                    group.pool.set_hash(seq.tables[g][i], key)
            seq.keys.append(key)
        # Window groups: blocks no later query can see leave the table (keyed, so cached).
        for g, w in enumerate(self.window):
            if w is None:
                continue
            table, ring = seq.tables[g], self.groups[g].spec.ring_blocks(bs)
            for i in range(seq.dropped[g], cdiv(request.num_computed_tokens, bs) - ring):
                if table[i] != self.null[g]:
                    self.groups[g].pool.release([table[i]])
                    table[i] = self.null[g]
                seq.dropped[g] = i + 1

    # ---------------------------------------------------------------- allocation
    def allocate(self, request, num_new_tokens: int) -> list[tuple[int, int, int]] | None:
        """Make the tables cover positions ``[num_computed, num_computed + num_new_tokens)``.

        Returns the copies ``(group, src, dst)`` to perform before the forward pass (copy-on-write
        of shared blocks about to be written), or None when a pool is short: then nothing changed.
        """
        seq = self._seqs[request.request_id]
        start = request.num_computed_tokens
        end = start + num_new_tokens
        bs = self.block_size
        if num_new_tokens > 0 and start // bs == (end - 1) // bs and self._covered_and_private(seq, start // bs):
            return []  # most decode steps: nothing to grow, nothing to copy
        plan = []
        for g, group in enumerate(self.groups):
            table = seq.tables[g]
            if self.cross[g]:  # the encoder's blocks, once; read-only afterwards
                grow = cdiv(request.encoder_len, bs) - len(table)
                if grow > group.pool.num_available:
                    return None
                plan.append((grow, []))
                continue
            need = cdiv(end, bs) if self.window[g] is not None else group.spec.blocks_needed(end, bs)
            grow = need - len(table)
            # Blocks already in the table that this step writes and that others also hold.
            idxs = range(start // bs, cdiv(end, bs))
            if self.ring[g] is not None:
                idxs = {i % self.ring[g] for i in idxs}
            shared = [i for i in idxs if i < len(table) and table[i] != self.null[g]
                      and group.pool.ref_count[table[i]] > 1]
            if grow + len(shared) > group.pool.num_available:
                return None
            plan.append((grow, shared))
        copies = []
        for g, (grow, shared) in enumerate(plan):
            pool, table = self.groups[g].pool, seq.tables[g]
            table.extend(pool.allocate(grow))
            for i in shared:
                (new,) = pool.allocate(1)
                copies.append((g, table[i], new))
                pool.release([table[i]])
                table[i] = new
        return copies

    def _covered_and_private(self, seq: _Seq, block: int) -> bool:
        """Whether every group's table already holds logical block ``block`` (the only one a
        step writing inside it touches) as a real block that no one else references. Then
        ``allocate``'s general path would grow nothing (the table reaches past ``block``) and
        copy nothing (the block is private), so it may return [] without planning."""
        for g, table in enumerate(seq.tables):
            if self.cross[g]:
                if table:
                    continue  # taken at admission, never written again
                return False  # the encoder's blocks are not taken yet
            i = block if self.ring[g] is None else block % self.ring[g]
            if i >= len(table):
                return False
            b = table[i]
            if b == self.null[g] or self.groups[g].pool.ref_count[b] != 1:
                return False
        return True

    def free(self, request) -> None:
        """Give back every reference the request holds. Tail blocks are released first so
        the LRU evicts a sequence's tail before the prefix others are more likely to share."""
        seq = self._seqs.pop(request.request_id, None)
        if seq is None:
            return
        for g, table in enumerate(seq.tables):
            if self.cross[g]:  # never cached: given back in order, so the next request's run is consecutive
                self.groups[g].pool.release(table)
                continue
            self.groups[g].pool.release([b for b in reversed(table) if b != self.null[g]])

    def fork(self, parent, child) -> None:
        """Let ``child`` share all of ``parent``'s blocks (parallel sampling). Whoever writes
        a shared block first gets a private copy from ``allocate``."""
        src = self._seqs[parent.request_id]
        seq = _Seq(tables=[list(t) for t in src.tables], keys=list(src.keys), dropped=list(src.dropped),
                   encoded=src.encoded)
        for g, table in enumerate(seq.tables):
            for b in table:
                if b != self.null[g]:
                    self.groups[g].pool.ref(b)
        self._seqs[child.request_id] = seq

    def has(self, request_id: str) -> bool:
        return request_id in self._seqs

    # ---------------------------------------------------------------- encoder
    @property
    def has_cross(self) -> bool:
        return any(self.cross)

    def needs_encoder(self, request_id: str) -> bool:
        """Whether the request's cross blocks are taken but not yet written by its encoder."""
        return self.has_cross and not self._seqs[request_id].encoded

    def mark_encoded(self, request_id: str) -> None:
        self._seqs[request_id].encoded = True

    # ---------------------------------------------------------------- stats
    def usage(self) -> dict[str, int]:
        pools = [g.pool for g in self.groups]
        return {
            "num_blocks_total": sum(p.num_blocks for p in pools),
            "num_blocks_free": sum(p.num_free for p in pools),
            "num_blocks_cached": sum(p.num_cached for p in pools),
            "num_blocks_in_use": sum(p.num_in_use for p in pools),
        }
