"""Property tests of the Scheduler over a real KVCacheManager, with no model.

The model is replaced by a *content model* of the KV pages: every slot remembers which token
was written there. Each step checks that what a request is about to attend to (every
earlier position, or the window of a sliding layer) holds exactly that request's tokens:
so a wrong prefix hit, a missed copy-on-write or a block freed while still in use shows up
as wrong content, not only as wrong counts. The "sampler" is a hash of the sequence so far,
so a request's output tokens are fixed by its prompt, whatever happens around it.

Hypothesis drives random interleavings of add (n=1..3 samples), step (schedule, compute,
sample, finish), abort and forced preemption, on pools small enough to preempt on their own.
After every operation: ``free + cached + in_use == total`` in every pool, no reference count
below zero, references equal to the block tables that hold them. At the end: no leaked block.
"""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.engine.request import Request, SamplingParams, Status
from qkv.engine.scheduler import RequestTooLarge, Scheduler
from qkv.kvcache.manager import KVCacheManager
from qkv.kvcache.spec import FullAttention, SlidingWindow

VOCAB = 5  # a small alphabet makes shared prefixes (and prefix hits) common


def fake_sample(tokens: list[int]) -> int:
    return hashlib.sha256(str(tokens).encode()).digest()[0] % VOCAB


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(fake_sample(seq))
    return seq[len(prompt):]


class Sim:
    """Drives a Scheduler the way LLMEngine does, with the content model in place of the runner."""

    def __init__(self, specs, block_size: int, num_blocks: int, budget: int, max_seqs: int, prefix: bool):
        self.kv = KVCacheManager(specs, block_size, num_blocks, prefix)
        self.sched = Scheduler(self.kv, budget, max_seqs, max_model_len=10_000)
        self.bs = block_size
        self.mem = [[None] * (g.pool.num_blocks * block_size) for g in self.kv.groups]
        self.live: list[Request] = []  # every unfinished request, forks included
        self.done: list[Request] = []
        self.n_steps = 0

    # ------------------------------------------------------------ operations
    def add(self, prompt: list[int], max_tokens: int, n: int, salt: str | None) -> None:
        params = SamplingParams(n=n, max_tokens=max_tokens)
        head = Request(prompt, params, cache_salt=salt)
        kids = [Request(prompt, params, f"{head.request_id}/{i}", salt, index=i) for i in range(1, n)]
        try:
            self.sched.add(head)
        except RequestTooLarge:
            assert not self.kv.can_ever_fit(head.max_total_tokens) or n > self.sched.max_num_seqs
            return
        head.forks = kids
        self.live += [head] + kids

    def step(self) -> None:
        batch = self.sched.schedule()
        self.n_steps += 1
        for g, src, dst in batch.copies:
            assert self.kv.groups[g].pool.ref_count[dst] == 1
            lo, hi = src * self.bs, (src + 1) * self.bs
            self.mem[g][dst * self.bs:(dst + 1) * self.bs] = self.mem[g][lo:hi]
        for req, n in zip(batch.requests, batch.num_new_tokens):
            assert req.status == Status.RUNNING and n >= 1
            start = req.num_computed_tokens
            tables = self.kv.block_tables(req.request_id)
            for g, group in enumerate(self.kv.groups):
                window = getattr(group.spec, "window", 0) or None
                first = 0 if window is None else max(0, start - window)
                for p in range(first, start):  # what this request's queries will read
                    assert self.mem[g][self.kv.slot(g, tables[g], p)] == (req.all_token_ids[p], p), (req, g, p)
                for p in range(start, start + n):  # blocks written are private to the writer
                    blk = tables[g][(p // self.bs) % (self.kv.ring[g] or 10**9)]
                    assert group.pool.ref_count[blk] == 1, (req, g, p)
                    self.mem[g][self.kv.slot(g, tables[g], p)] = (req.all_token_ids[p], p)
        due = self.sched.update(batch)
        for req in list(due):
            for child in req.forks:
                if not child.finished:
                    self.sched.fork(req, child)
                    due.append(child)
            req.forks = []
        assert len(self.sched.running) <= self.sched.max_num_seqs  # siblings had their seats
        for req in due:
            req.all_token_ids.append(fake_sample(req.all_token_ids))
            if req.num_output_tokens >= req.params.max_tokens:
                self.sched.finish(req, "length")
        self._settle()

    def abort(self, i: int) -> None:
        if self.live:
            req = self.live[i % len(self.live)]
            self.sched.finish(req, "abort")
            self._settle()

    def preempt(self, i: int) -> None:
        """Force what the scheduler does when the pool runs dry, to any running request."""
        if self.sched.running:
            req = self.sched.running[i % len(self.sched.running)]
            self.sched.running.remove(req)
            self.sched._preempt(req)

    def _settle(self) -> None:
        for r in [r for r in self.live if r.finished]:
            self.live.remove(r)
            self.done.append(r)

    # ------------------------------------------------------------ invariants
    def check(self) -> None:
        held = [[0] * g.pool.num_blocks for g in self.kv.groups]
        for seq in self.kv._seqs.values():
            for g, table in enumerate(seq.tables):
                for b in table:
                    if b != self.kv.null[g]:  # the null page stands for blocks out of the window
                        held[g][b] += 1
        for g, group in enumerate(self.kv.groups):
            pool = group.pool
            assert pool.num_free + pool.num_cached + pool.num_in_use == pool.num_blocks
            assert min(pool.num_free, pool.num_cached, pool.num_in_use) >= 0
            assert all(c >= 0 for c in pool.ref_count)
            assert pool.ref_count == held[g]  # every reference is some table's
            assert pool.num_cached == sum(1 for b in range(pool.num_blocks)
                                          if pool.ref_count[b] == 0 and pool.block_hash[b] is not None)
            assert all(pool.block_hash[b] == h for h, b in pool.hash_to_block.items())
        running, waiting = set(map(id, self.sched.running)), set(map(id, self.sched.waiting))
        assert not running & waiting
        assert len(self.sched.running) == len(running) and len(self.sched.waiting) == len(waiting)
        for r in self.sched.running:
            assert self.kv.has(r.request_id) and r.status == Status.RUNNING
        for r in self.sched.waiting:
            assert not self.kv.has(r.request_id) and r.status == Status.WAITING
        for r in self.done:
            assert not self.kv.has(r.request_id)

    def check_no_leak(self) -> None:
        for group in self.kv.groups:
            pool = group.pool
            assert pool.num_in_use == 0 and all(c == 0 for c in pool.ref_count)
            assert pool.num_free + pool.num_cached == pool.num_blocks
        assert not self.kv._seqs


STEMS = [[1, 2, 3, 4, 0, 1, 2, 3, 4, 0], [3, 3, 3, 3, 3, 3, 3, 3]]
# Prompts mostly start with one of two stems, so that prefix hits are common.
prompts = st.builds(lambda stem, k, tail: (stem[:k] + tail) or [0], st.sampled_from(STEMS + [[]]),
                    st.integers(0, 10), st.lists(st.integers(0, VOCAB - 1), max_size=6))
add = st.tuples(st.just("add"), prompts, st.integers(1, 8), st.integers(1, 3), st.sampled_from([None, None, "t"]))
ops = st.lists(st.one_of(
    add, add,
    st.tuples(st.just("step")), st.tuples(st.just("step")), st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 99)),
    st.tuples(st.just("preempt"), st.integers(0, 99)),
), max_size=40)
FULL = FullAttention(num_kv_heads=1, head_dim=4)
SLIDE = SlidingWindow(num_kv_heads=1, head_dim=4, window=5)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(sim: Sim, ops) -> None:
    for op in ops:
        getattr(sim, op[0])(*op[1:])
        sim.check()
    # Run what is left to completion: the scheduler must never stall.
    limit = sim.n_steps + 2000
    while sim.sched.has_unfinished():
        sim.step()
        sim.check()
        assert sim.n_steps < limit, "the scheduler stopped making progress"
    for r in sim.done:
        if r.finish_reason == "length":
            assert r.output_token_ids == expected_output(r.prompt_token_ids, r.params.max_tokens)
    sim.check_no_leak()


@SETTINGS
@given(ops=ops, block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(6, 24),
       budget=st.sampled_from([1, 3, 8, 64]), max_seqs=st.integers(1, 4),
       prefix=st.sampled_from([True, True, False]))
def test_full_attention_interleavings(ops, block_size, num_blocks, budget, max_seqs, prefix):
    run(Sim([FULL, FULL], block_size, num_blocks, budget, max_seqs, prefix), ops)


@SETTINGS
@given(ops=ops, num_blocks=st.integers(8, 24), budget=st.sampled_from([1, 3, 8, 64]), max_seqs=st.integers(1, 4))
def test_sliding_and_full_groups(ops, num_blocks, budget, max_seqs):
    """Two groups (a window and a full table), prefix caching on and off (a window table with
    dropped blocks, or a ring): every pool balances and the window is kept."""
    run(Sim([SLIDE, FULL, SLIDE], 2, num_blocks, budget, max_seqs, True), ops)
    run(Sim([SLIDE, FULL, SLIDE], 2, num_blocks, budget, max_seqs, False), ops)


def test_prefix_hit_restores_every_group():
    """Two full-attention groups (different specs): a hit must not leave group 1 unfilled."""
    sim = Sim([FULL, FullAttention(num_kv_heads=2, head_dim=4)], 2, 24, 64, 4, True)
    sim.add(STEMS[0], 3, 1, None)
    sim.add(STEMS[0] + [1], 3, 2, None)
    sim.step()
    while sim.sched.has_unfinished():
        sim.step()
        sim.check()
    sim.add(STEMS[0] + [2], 3, 1, None)
    while sim.sched.has_unfinished():
        sim.step()  # asserts every group's pages hold the tokens read
        sim.check()
    sim.check_no_leak()


def test_preempts_most_recent_and_keeps_fcfs():
    sim = Sim([FULL], 2, 8, 64, 8, False)
    for i in range(3):
        sim.add([i] * 3, 4, 1, None)
    first, second, third = sim.live
    sim.step()
    assert sim.sched.running == [first, second, third]
    while not sim.sched.num_preemptions:
        sim.step()
        sim.check()
    assert third.num_preemptions >= 1 and first.num_preemptions == 0
    assert sim.sched.waiting[0] is third or third.status == Status.RUNNING
    while sim.sched.has_unfinished():
        sim.step()
        sim.check()
    assert [r.output_token_ids for r in (first, second, third)] == [expected_output([i] * 3, 4) for i in range(3)]
    sim.check_no_leak()


def test_parallel_samples_hold_their_seats(tiny_model):
    """n > 1: the siblings of a request count against max_num_seqs from its admission on, so the
    running set never exceeds it (CUDA graphs are captured only up to that size); n larger than
    max_num_seqs is refused at once."""
    import pytest

    from qkv import LLM

    path, _ = tiny_model("llama")
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_num_seqs=5)
    eng = llm.engine
    params = SamplingParams(n=3, max_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
    heads = [eng.add_request([5 + i, 9, 13, 2 + i], params)[0] for i in range(4)]
    most = 0
    while eng.has_unfinished():
        eng.step()
        most = max(most, len(eng.scheduler.running))
    assert most == 3  # one request and its two siblings: a second one would need 6 seats
    assert all(r.finished for r in heads)
    with pytest.raises(RequestTooLarge, match="max_num_seqs is 5"):
        eng.add_request([1, 2, 3], SamplingParams(n=6, max_tokens=2))
    s = eng.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0
