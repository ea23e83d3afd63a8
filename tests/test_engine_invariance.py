"""The engine's scheduling never changes an output token (CPU, fp32).

The reference for every run is the same requests generated one at a time with prefix
caching off: nothing shared, nothing chunked beyond the default budget, nothing preempted.
Every other configuration (prefix caching on, token budgets {1, 3, 16, 64}, a pool so small
that preemption is forced, 16 mixed-length requests at once, n=4 parallel sampling) must
produce exactly the same tokens. After every run no block may be leaked.
"""

from __future__ import annotations

import random

import pytest

from qkv import LLM, SamplingParams

BS = 4  # tiny models use 4-token blocks so that prompts span many blocks


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_no_leak(llm_or_engine) -> dict:
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    s = engine.stats()
    assert s["num_blocks_in_use"] == 0, s
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"], s
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    for g in engine.kv.groups:
        assert all(c == 0 for c in g.pool.ref_count)
    assert not engine.kv._seqs
    return s


def drive(engine, work: list[tuple[list[int], SamplingParams]], salt: str | None = None) -> list[list[list[int]]]:
    """Submit every (prompt, params) at once and step until done; returns, per prompt,
    the token ids of each of its n samples."""
    heads = [engine.add_request(ids, p, cache_salt=salt) for ids, p in work]
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
    return [[got[r.request_id] for r in reqs] for reqs in heads]


def one_by_one(engine, work) -> list[list[list[int]]]:
    return [drive(engine, [w])[0] for w in work]


def mixed_work(seed: int, vocab: int, count: int = 16, max_prompt: int = 40, max_out: int = 12):
    """Mixed-length prompts, some greedy, some seeded sampling, varied output lengths."""
    rng = random.Random(seed)
    work = []
    for i in range(count):
        ids = [rng.randrange(2, vocab) for _ in range(rng.randint(1, max_prompt))]
        if i % 2:
            p = SamplingParams(max_tokens=rng.randint(1, max_out), temperature=0, ignore_eos=True)
        else:
            p = SamplingParams(max_tokens=rng.randint(1, max_out), temperature=0.8, seed=rng.randrange(10**6),
                               ignore_eos=True)
        work.append((ids, p))
    # Requests sharing a prefix (with each other and with earlier prompts) exercise prefix hits.
    base = work[3][0]
    for j in range(3):
        ids = base + [rng.randrange(2, vocab) for _ in range(j * 5 + 1)]
        work.append((ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    return work


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import torch
    import transformers as tf

    from conftest import tiny_config

    cfg, cls = tiny_config("llama")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    cls(cfg).eval().save_pretrained(path)
    return str(path)


def make(path, **kw) -> LLM:
    kw.setdefault("block_size", BS)
    kw.setdefault("num_kv_blocks", 256)
    return LLM(path, dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = make(tiny_llama, enable_prefix_caching=False)
    work = mixed_work(0, llm.config.vocab_size)
    ref = one_by_one(llm.engine, work)
    assert_no_leak(llm)
    return work, ref


CONFIGS = {
    "cache-on": dict(),
    "cache-off": dict(enable_prefix_caching=False),
    "budget-1": dict(max_num_batched_tokens=1),
    "budget-3": dict(max_num_batched_tokens=3),
    "budget-16": dict(max_num_batched_tokens=16),
    "budget-64": dict(max_num_batched_tokens=64),
    "budget-3-cache-off": dict(max_num_batched_tokens=3, enable_prefix_caching=False),
    "max-seqs-2": dict(max_num_seqs=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_batched_equals_alone(tiny_llama, reference, name):
    work, ref = reference
    llm = make(tiny_llama, **CONFIGS[name])
    assert drive(llm.engine, work) == ref
    assert_no_leak(llm)
    # A second pass over a warm prefix cache changes nothing either.
    assert drive(llm.engine, work) == ref
    s = assert_no_leak(llm)
    if CONFIGS[name].get("enable_prefix_caching", True):
        assert s["prefix_cache_hit_rate"] > 0


@pytest.mark.parametrize("budget", [None, 3])
def test_tiny_forced_preemption(tiny_llama, reference, budget):
    work, ref = reference
    longest = max(len(ids) + p.max_tokens for ids, p in work)
    kw = {} if budget is None else dict(max_num_batched_tokens=budget)
    llm = make(tiny_llama, num_kv_blocks=-(-longest // BS) + 1, **kw)
    assert drive(llm.engine, work) == ref
    s = assert_no_leak(llm)
    assert s["num_preemptions"] > 0


def test_tiny_parallel_sampling_equals_single_seeds(tiny_llama):
    rng = random.Random(5)
    llm = make(tiny_llama, max_num_batched_tokens=7)
    for plen in (6, 8, 13):  # partial last block (copy-on-write) and an exact multiple of the block size
        prompt = [rng.randrange(2, 256) for _ in range(plen)]
        s = rng.randrange(1000)
        p = SamplingParams(n=4, seed=s, temperature=0.8, max_tokens=10, ignore_eos=True)
        (samples,) = drive(llm.engine, [(prompt, p)])
        assert_no_leak(llm)
        singles = [drive(llm.engine, [(prompt, SamplingParams(seed=s + i, temperature=0.8, max_tokens=10,
                                                               ignore_eos=True))])[0][0] for i in range(4)]
        assert samples == singles
        assert len(set(map(tuple, samples))) > 1  # the samples really differ
        assert_no_leak(llm)
    # Through the LLM API, mixed with other work and a tight pool that forces preemption.
    work = mixed_work(3, 256, count=6, max_prompt=20)
    work.append(([7, 8, 9, 10, 11], SamplingParams(n=4, seed=11, temperature=0.8, max_tokens=12, ignore_eos=True)))
    ref = one_by_one(make(tiny_llama, enable_prefix_caching=False).engine, work)
    assert ref[-1] == [drive(llm.engine, [(work[-1][0], SamplingParams(seed=11 + i, temperature=0.8, max_tokens=12,
                                                                           ignore_eos=True))])[0][0] for i in range(4)]
    small = make(tiny_llama, num_kv_blocks=10, max_num_batched_tokens=5)
    assert drive(small.engine, work) == ref
    assert assert_no_leak(small)["num_preemptions"] > 0


def test_tiny_llm_generate_api(tiny_llama, reference):
    """LLM.generate with one SamplingParams for a batch equals the same prompts alone."""
    work, _ = reference
    prompts = [ids for ids, _ in work]
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm = make(tiny_llama, max_num_batched_tokens=16)
    alone = [llm.generate([ids], p, use_tqdm=False)[0].token_ids for ids in prompts]
    together = [o.token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    assert together == alone
    assert_no_leak(llm)


# ------------------------------------------------------------------------ prefix caching

def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("plen", [16, 17, 3, 4])
def test_prefix_hit_never_covers_whole_prompt(tiny_llama, plen):
    prompt = random.Random(plen).sample(range(2, 256), plen)
    ref = drive(make(tiny_llama, enable_prefix_caching=False).engine, [(prompt, greedy(5))])
    llm = make(tiny_llama)
    first = llm.generate(prompt, greedy(5), use_tqdm=False)[0]
    second = llm.generate(prompt, greedy(5), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    # At least the last prompt token is computed, so an exact multiple of the block size
    # hits one block less than it holds.
    assert second.num_cached_tokens == (plen - 1) // BS * BS
    assert [first.token_ids] == [second.token_ids] == ref[0]
    assert_no_leak(llm)


def test_cache_salt_separates(tiny_llama):
    prompt = list(range(2, 30))
    llm = make(tiny_llama)
    ref = llm.generate(prompt, greedy(4), use_tqdm=False, cache_salt="a")[0]
    for salt, hit in [("b", 0), (None, 0), ("a", 24), ("b", 24), (None, 24)]:
        out = llm.generate(prompt, greedy(4), use_tqdm=False, cache_salt=salt)[0]
        assert (out.num_cached_tokens, out.token_ids) == (hit, ref.token_ids), salt
    assert_no_leak(llm)


def test_lru_eviction_under_pressure(tiny_llama):
    """Three 20-token prompts through a 12-block pool: the oldest prefix is evicted, the most
    recent stays, and the outputs never change."""
    rng = random.Random(9)
    prompts = [[rng.randrange(2, 256) for _ in range(20)] for _ in range(3)]
    ref = one_by_one(make(tiny_llama, enable_prefix_caching=False).engine, [(p, greedy(4)) for p in prompts])
    llm = make(tiny_llama, num_kv_blocks=12)
    outs = [llm.generate(p, greedy(4), use_tqdm=False)[0] for p in prompts]
    assert [[o.token_ids] for o in outs] == ref
    assert_no_leak(llm)
    again_last = llm.generate(prompts[2], greedy(4), use_tqdm=False)[0]
    assert again_last.num_cached_tokens == 16 and [again_last.token_ids] == ref[2]
    again_first = llm.generate(prompts[0], greedy(4), use_tqdm=False)[0]
    assert again_first.num_cached_tokens < 16 and [again_first.token_ids] == ref[0]
    # Many requests sharing a prefix, all at once, through the same small pool.
    shared = [prompts[1][:12] + [rng.randrange(2, 256) for _ in range(rng.randint(1, 8))] for _ in range(8)]
    ref = one_by_one(make(tiny_llama, enable_prefix_caching=False).engine, [(p, greedy(3)) for p in shared])
    assert drive(llm.engine, [(p, greedy(3)) for p in shared]) == ref
    assert assert_no_leak(llm)["num_blocks_cached"] > 0


# ------------------------------------------------------------------------ abort and admission

def test_abort_anywhere_frees_everything(tiny_llama):
    rng = random.Random(4)
    long = [rng.randrange(2, 256) for _ in range(30)]
    keep = [rng.randrange(2, 256) for _ in range(9)]
    (ref,) = drive(make(tiny_llama).engine, [(keep, greedy(10))])
    llm = make(tiny_llama, max_num_batched_tokens=3)
    eng = llm.engine

    got = {}

    def steps(k=1):
        for _ in range(k):
            for out in eng.step():
                if out.finished:
                    got[out.request_id] = out

    (survivor,) = eng.add_request(keep, greedy(10))
    # waiting
    (w,) = eng.add_request(long, greedy(5))
    eng.abort(w.request_id)
    # mid-prefill (the budget of 3 splits the 30-token prompt over many steps)
    (pf,) = eng.add_request(long, greedy(5))
    while pf.num_computed_tokens == 0:
        steps()
    steps(2)
    assert 0 < pf.num_computed_tokens < len(long) and eng.kv.has(pf.request_id)
    eng.abort(pf.request_id)
    # mid-decode, with n=4 samples sharing blocks
    par = eng.add_request(long[:10], SamplingParams(n=4, seed=1, temperature=1.0, max_tokens=20, ignore_eos=True))
    while par[0].num_output_tokens < 2:
        steps()
    eng.abort(par[0].request_id)
    assert all(r.finished and not eng.kv.has(r.request_id) for r in par)
    # a sample aborted on its own before its head forked it never runs
    par = eng.add_request(long, SamplingParams(n=3, seed=2, temperature=1.0, max_tokens=20, ignore_eos=True))
    eng.abort(par[2].request_id)
    while par[0].num_output_tokens < 2:
        steps()
    assert par[2].finish_reason == "abort" and par[2].num_output_tokens == 0
    assert par[1].num_output_tokens == 2
    eng.abort(par[0].request_id)
    eng.abort("no-such-request")  # unknown ids are ignored
    while eng.has_unfinished():
        steps()
    assert [got[survivor.request_id].token_ids] == ref
    assert set(got) == {survivor.request_id}
    assert_no_leak(llm)


def test_request_that_never_fits_is_rejected_at_once(tiny_llama):
    llm = make(tiny_llama, num_kv_blocks=8)  # 32 token slots
    with pytest.raises(ValueError, match="KV blocks"):
        llm.engine.add_request(list(range(2, 30)), greedy(8))
    with pytest.raises(ValueError):
        llm.generate(list(range(2, 30)), SamplingParams(n=2, max_tokens=8), use_tqdm=False)
    with pytest.raises(ValueError, match="context length"):
        llm.engine.add_request(list(range(2, 30)), greedy(1000))
    assert not llm.engine.has_unfinished()
    assert_no_leak(llm)
    # The engine still serves what fits, even when each request needs the whole pool.
    outs = llm.generate([list(range(2, 26))] * 3, greedy(8), use_tqdm=False)
    assert all(len(o.token_ids) == 8 for o in outs)
    assert_no_leak(llm)


@pytest.mark.parametrize("kw", [dict(max_num_batched_tokens=0), dict(max_num_seqs=0)])
def test_knobs_that_would_hang_are_rejected(tiny_llama, kw):
    with pytest.raises(ValueError):
        make(tiny_llama, **kw)


# ------------------------------------------------------------------------ SmolLM2
# Short runs (SmolLM2 steps cost ~100x a tiny model's): three prompts, 6-8 new tokens.

SMOL_PROMPTS = ["The capital of France is", "def add(a, b):", "1, 2, 3,"]


@pytest.fixture(scope="module")
def smol_small():
    """SmolLM2 with 4-token blocks and a pool that holds the longest request but not all three
    at once: every run on it must preempt. A small pool also keeps each step cheap."""
    return LLM("smollm2", dtype="float32", device="cpu", block_size=4, num_kv_blocks=7)


@pytest.fixture(scope="module")
def smol_work(smol_small):
    work = [(smol_small.encode(t), SamplingParams(max_tokens=6 + i, temperature=0.8 if i == 1 else 0, seed=i))
            for i, t in enumerate(SMOL_PROMPTS)]
    assert max(len(ids) + p.max_tokens for ids, p in work) <= 7 * 4 - 4  # each alone fits
    eng = smol_small.engine
    eng.kv.enable_prefix_caching = False
    try:
        ref = one_by_one(eng, work)
    finally:
        eng.kv.enable_prefix_caching = True
    assert assert_no_leak(eng)["num_preemptions"] == 0
    return work, ref


@pytest.mark.parametrize("budget", [1, 3, 16, 64, None])
def test_smollm2_budgets_cache_preemption(smol_small, smol_work, budget):
    """All prompts together, prefix cache on, each token budget; the pool forces preemption."""
    work, ref = smol_work
    eng = smol_small.engine
    old, before = eng.scheduler.max_num_batched_tokens, eng.scheduler.num_preemptions
    if budget is not None:
        eng.scheduler.max_num_batched_tokens = budget
    try:
        assert drive(eng, work) == ref
    finally:
        eng.scheduler.max_num_batched_tokens = old
    preempted = assert_no_leak(eng)["num_preemptions"] > before
    # A budget of 1 runs one request at a time (the running one takes the whole budget).
    assert preempted or budget == 1


def test_smollm2_session_engine(smollm2, smol_work):
    """The shared default engine (16-token blocks, large pool): batched, then on a warm cache
    with prefix caching; n=4 equals four requests with seeds s..s+3."""
    work, ref = smol_work
    assert drive(smollm2.engine, work) == ref
    assert drive(smollm2.engine, work) == ref
    assert_no_leak(smollm2)
    prompt = smollm2.encode("My favourite colour is")
    out = smollm2.generate(prompt, SamplingParams(n=4, seed=7, temperature=0.8, max_tokens=6), use_tqdm=False)[0]
    singles = drive(smollm2.engine, [(prompt, SamplingParams(seed=7 + i, temperature=0.8, max_tokens=6))
                                     for i in range(4)])
    assert [s.token_ids for s in out.samples] == [s[0] for s in singles]
    assert_no_leak(smollm2)


# ---------------------------------------------------------------- caches that round K/V
@pytest.fixture(scope="module")
def tiny_windowed(tmp_path_factory):
    """A tiny Mistral with a 48-token sliding window, saved for qkv (float32)."""
    import torch

    from tests.conftest import tiny_config

    cfg, cls = tiny_config("mistral", sliding_window=48)
    torch.manual_seed(3)
    d = tmp_path_factory.mktemp("tiny-windowed")
    cls(cfg).eval().save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("kv", ["int8", "int4", "fp8", "int4,int8"])
def test_rounding_caches_give_the_same_bits_however_a_prompt_is_chunked_or_cached(tiny_windowed, kv):
    # A cache that rounds K/V turns a 1e-7 difference in a token's attention (from where its
    # chunk began, or how much of its prompt was cached) into a flipped rounding, and the
    # flips grow layer by layer: on Gemma 3 270M with int8 the first token's logprob moved by
    # 0.05 between a cold and a prefix-cached run. Prompt steps over such caches read keys in
    # whole blocks (attention/reference.py KEY_BLOCK): the same bits every way. (Chunks of
    # 12 tokens or more: torch's float32 matmuls of 1-11 rows, but 4 and 8, take other code.)
    import random

    import torch

    rng = random.Random(0)
    prompt = [rng.randrange(2, 256) for _ in range(320)]
    logits = {}
    for budget in (512, 97, 40, 100):
        llm = LLM(tiny_windowed, dtype="float32", device="cpu", kv_dtype=kv, block_size=16,
                  max_num_batched_tokens=budget, num_kv_blocks=64)
        logits[budget] = llm.logits(prompt)
    for budget, got in logits.items():
        assert torch.equal(got, logits[512]), (kv, budget, (got - logits[512]).abs().max().item())
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    llm = LLM(tiny_windowed, dtype="float32", device="cpu", kv_dtype=kv, block_size=16, num_kv_blocks=64)
    cold, warm = (llm.generate([{"prompt_token_ids": prompt}], sampling_params=sp)[0] for _ in range(2))
    assert warm.num_cached_tokens == 304
    assert warm.token_ids == cold.token_ids
    assert [e[t].logprob for t, e in zip(warm.token_ids, warm.outputs[0].logprobs)] == \
        [e[t].logprob for t, e in zip(cold.token_ids, cold.outputs[0].logprobs)]
    assert_no_leak(llm)
