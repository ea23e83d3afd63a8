"""Property tests of BlockPool and KVCacheManager (hypothesis).

BlockPool runs against a plain model of who holds which reference; KVCacheManager runs
random allocate / append / fork / free sequences with a content model of the pages, so a
prefix hit on the wrong block or a shared block written in place is caught by its content.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qkv.kvcache.manager import KVCacheManager
from qkv.kvcache.pool import BlockPool, OutOfBlocks
from qkv.kvcache.prefix import block_key, chain_keys
from qkv.kvcache.spec import FullAttention

N = 8


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(N)
        self.held: list[int] = []  # one entry per reference we own
        self.released_order: list[int] = []  # blocks in the order they reached ref 0

    @rule(n=st.integers(0, N + 1))
    def allocate(self, n):
        avail = self.pool.num_available
        if n > avail:
            with pytest.raises(OutOfBlocks):
                self.pool.allocate(n)
            return
        got = self.pool.allocate(n)
        assert len(set(got)) == n and all(self.pool.ref_count[b] == 1 for b in got)
        assert not set(got) & set(self.held)  # never hands out a block someone holds
        self.held += got

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99))
    def ref_held(self, i):
        b = self.held[i % len(self.held)]
        self.pool.ref(b)
        self.held.append(b)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99))
    def release(self, i):
        b = self.held.pop(i % len(self.held))
        self.pool.release([b])

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 99), key=st.integers(0, 5))
    def set_hash(self, i, key):
        b = self.held[i % len(self.held)]
        h, before = bytes([key]), self.pool.block_hash[b]
        self.pool.set_hash(b, h)
        # A block keeps its first key; a key keeps its first block.
        if before is None:
            assert self.pool.lookup(h) is not None
        else:
            assert self.pool.block_hash[b] == before

    @rule(key=st.integers(0, 5))
    def hit(self, key):
        """A prefix hit takes a reference to whatever block holds the key, cached or in use."""
        b = self.pool.lookup(bytes([key]))
        if b is not None:
            assert self.pool.block_hash[b] == bytes([key])
            self.pool.ref(b)
            self.held.append(b)

    @rule()
    def reset(self):
        self.pool.reset_prefix_cache()
        assert self.pool.num_cached == 0

    @invariant()
    def balanced(self):
        p = self.pool
        assert p.num_free + p.num_cached + p.num_in_use == N
        assert min(p.num_free, p.num_cached, p.num_in_use) >= 0
        assert all(c >= 0 for c in p.ref_count)
        assert p.ref_count == [self.held.count(b) for b in range(N)]
        assert p.num_cached == sum(1 for b in range(N) if p.ref_count[b] == 0 and p.block_hash[b] is not None)
        assert all(p.block_hash[b] == h for h, b in p.hash_to_block.items())

    def teardown(self):
        self.pool.release(self.held)
        assert self.pool.num_in_use == 0
        assert self.pool.num_free + self.pool.num_cached == N


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_lru_evicts_oldest_release_first_and_tail_first():
    pool = BlockPool(6)
    a = pool.allocate(3)
    b = pool.allocate(3)
    for i, blk in enumerate(a + b):
        pool.set_hash(blk, bytes([i]))
    pool.release(a[::-1])  # a sequence frees tail first
    pool.release(b[::-1])
    assert pool.num_cached == 6
    got = pool.allocate(2)
    assert got == [a[2], a[1]]  # a's tail goes first; its head and all of b stay cached
    assert pool.lookup(bytes([0])) == a[0] and pool.lookup(bytes([2])) is None
    pool.ref(a[0])  # a hit pulls a cached block out of the queue
    assert pool.allocate(3) == [b[2], b[1], b[0]]
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    with pytest.raises(RuntimeError):
        pool.release([a[1], a[1]])


def test_prefix_keys_chain_and_salt():
    toks = list(range(10))
    keys = chain_keys(toks, 4)
    assert len(keys) == 2 and keys[1] == block_key(keys[0], toks[4:8])
    assert chain_keys(toks, 4, salt="x")[0] != keys[0]
    assert chain_keys([9, 9, 9, 9] + toks[4:8], 4)[1] != keys[1]  # a key covers its whole prefix
    assert chain_keys(toks, 4, start=1, parent=keys[0]) == keys[1:]


# ------------------------------------------------------------------------ KVCacheManager

def _req(rid, tokens, salt=None):
    return SimpleNamespace(request_id=rid, all_token_ids=list(tokens), num_computed_tokens=0, cache_salt=salt)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["new", "compute", "append", "fork", "free"]),
                              st.integers(0, 99), st.integers(1, 9)), max_size=40),
       bs=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 20), prefix=st.booleans())
def test_manager_random_ops(ops, bs, num_blocks, prefix):
    kv = KVCacheManager([FullAttention(1, 4)], bs, num_blocks, prefix)
    pool = kv.groups[0].pool
    mem = [None] * (num_blocks * bs)  # which (token, position) each slot holds
    reqs = []
    count = 0

    def read_ok(r):
        table = kv.block_tables(r.request_id)[0]
        return all(mem[kv.slot(0, table, p)] == (r.all_token_ids[p], p) for p in range(r.num_computed_tokens))

    for op, i, k in ops:
        if op == "new":
            r = _req(f"r{count}", [(i + j) % 3 for j in range(k + 3)], salt="s" if i % 5 == 0 else None)
            count += 1
            hit = kv.match_prefix(r)
            assert hit % bs == 0 and hit < len(r.all_token_ids)
            r.num_computed_tokens = hit
            assert read_ok(r)  # a hit serves exactly this prompt's tokens
            reqs.append(r)
        elif reqs:
            r = reqs[i % len(reqs)]
            if op == "compute":
                n = min(k, len(r.all_token_ids) - r.num_computed_tokens)
                if n > 0:
                    copies = kv.allocate(r, n)
                    if copies is not None:
                        for _, src, dst in copies:
                            mem[dst * bs:(dst + 1) * bs] = mem[src * bs:(src + 1) * bs]
                        table = kv.block_tables(r.request_id)[0]
                        for p in range(r.num_computed_tokens, r.num_computed_tokens + n):
                            assert pool.ref_count[table[p // bs]] == 1  # written only when private
                            mem[kv.slot(0, table, p)] = (r.all_token_ids[p], p)
                        r.num_computed_tokens += n
                        kv.cache_blocks(r)
            elif op == "append":
                r.all_token_ids.append(k % 3)
            elif op == "fork" and r.num_computed_tokens == len(r.all_token_ids):
                child = _req(f"r{count}", r.all_token_ids, r.cache_salt)
                count += 1
                child.num_computed_tokens = r.num_computed_tokens
                kv.fork(r, child)
                reqs.append(child)
            elif op == "free":
                kv.free(r)
                reqs.remove(r)
        for r in reqs:
            assert read_ok(r)  # nobody else wrote into this request's computed blocks
        assert pool.num_free + pool.num_cached + pool.num_in_use == num_blocks
        assert all(c >= 0 for c in pool.ref_count)
        assert sum(pool.ref_count) == sum(len(kv.block_tables(r.request_id)[0]) for r in reqs)
    for r in reqs:
        kv.free(r)
    assert pool.num_in_use == 0 and pool.num_free + pool.num_cached == num_blocks
