"""Sliding-window pools: an admitted request never fails for lack of blocks, and the budget
split gives the global layers what the sliding layers cannot use (issue 12, items 3 and 4).

- Regression: with prefix caching a window table holds a whole prefill chunk plus the window
  before it, so a chunk could outgrow a sliding pool sized for ``max_num_seqs`` rings and
  ``generate`` raised "does not fit in an empty KV pool" for a request it had admitted.
- Property (hypothesis, tiny random Gemma 3): over windows, block sizes, token budgets, seats,
  pool sizes of each group, caching on/off and prompt lengths, every request the engine
  admits completes with the tokens of an unchunked, caching-off run, and every pool ends
  with free + cached == total; every request it refuses could never fit.
- The split: Gemma 3 270M's default pools (fp32, 1 GiB, 64 seqs) and the context they buy,
  from its configuration only; the start-up line and ``qkv memory`` report the capacity
  admission actually enforces.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv import LLM, SamplingParams
from qkv.engine.scheduler import RequestTooLarge
from qkv.kvcache.spec import FullAttention, SlidingWindow
from test_gemma3 import tiny_gemma3

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0, ignore_eos=True)
BASE = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(12)).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny Gemma 3 checkpoints by window, built once; and their reference outputs by prompt."""
    paths, refs = {}, {}

    def path(window: int) -> str:
        if window not in paths:
            paths[window] = tiny_gemma3(tmp_path_factory.mktemp(f"w{window}"), seed=window,
                                        sliding_window=window)[0]
        return paths[window]

    def reference(window: int, prompt: list[int], n: int) -> list[int]:
        """Greedy tokens of one unchunked run, caching off, pools far larger than needed."""
        key = (window, tuple(prompt))
        if key not in refs:
            llm = LLM(path(window), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256,
                      enable_prefix_caching=False, max_num_batched_tokens=512)
            refs[key] = llm.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))[0].token_ids
        return refs[key][:n]

    return path, reference


def test_gemma3_chunk_longer_than_the_sliding_pool(models):
    """The issue's trigger in small: one seat, prefix caching on, a 40-token prompt in one
    chunk (window 8, blocks of 4: a ring of 3 blocks, the chunk needs 10). Before the fix the
    sliding pool held 3 blocks and generate() raised RequestTooLarge."""
    path, reference = models
    prompt = BASE[:40]
    llm = LLM(path(8), dtype="float32", device="cpu", block_size=4, max_num_seqs=1, kv_cache_memory=1 << 20,
              max_num_batched_tokens=64)
    out = llm.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))[0]
    assert out.token_ids == reference(8, prompt, 6)
    # The same with the sliding pool at the least admission accepts (ring + 1 = 4 blocks):
    # the scheduler shrinks the chunk instead of failing.
    llm = LLM(path(8), dtype="float32", device="cpu", block_size=4, max_num_seqs=1, num_kv_blocks=[4, 64],
              max_num_batched_tokens=64)
    assert llm.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))[0].token_ids == reference(8, prompt, 6)
    with pytest.raises(RequestTooLarge, match=r"needs \[4, 12\] KV blocks, but the pool has only \[3, 64\]"):
        LLM(path(8), dtype="float32", device="cpu", block_size=4, num_kv_blocks=[3, 64]).engine.add_request(
            prompt, SamplingParams(max_tokens=8))


def test_num_kv_blocks_list_is_checked(models):
    path, _ = models
    with pytest.raises(ValueError, match=r"num_kv_blocks \[4\] must give one positive count per layer group "
                                         r"\(2: sliding, full\)"):
        LLM(path(8), dtype="float32", device="cpu", block_size=4, num_kv_blocks=[4])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window=st.sampled_from([3, 5, 8]), block_size=st.sampled_from([2, 4, 8]),
       budget=st.integers(1, 48), seats=st.integers(1, 3), sliding=st.integers(-2, 6),
       full=st.integers(2, 40), caching=st.booleans(),
       lens=st.lists(st.integers(1, 40), min_size=1, max_size=3), max_tokens=st.integers(1, 6))
def test_admitted_requests_always_complete(models, window, block_size, budget, seats, sliding, full, caching,
                                           lens, max_tokens):
    path, reference = models
    # Sliding pools near a window table's least (ring + 1 blocks) are where chunks outgrow them.
    sliding = max(1, -(-window // block_size) + 2 + sliding)
    llm = LLM(path(window), dtype="float32", device="cpu", block_size=block_size, max_num_seqs=seats,
              num_kv_blocks=[sliding, full], enable_prefix_caching=caching, max_num_batched_tokens=budget)
    eng = llm.engine
    admitted = []
    for n in lens:  # prompts share prefixes: BASE[:n]
        prompt = BASE[:n]
        try:
            (req,) = eng.add_request(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
        except RequestTooLarge:
            assert not eng.kv.can_ever_fit(n + max_tokens)
            assert eng.kv.max_tokens() is not None and eng.kv.max_tokens() < n + max_tokens
            continue
        assert eng.kv.max_tokens() is None or n + max_tokens <= eng.kv.max_tokens()
        admitted.append((req, prompt))
    while eng.has_unfinished():
        eng.step()
    for req, prompt in admitted:
        assert req.finish_reason == "length"
        assert req.output_token_ids == reference(window, prompt, max_tokens)
    for g in eng.kv.groups:
        assert g.pool.num_in_use == 0 and g.pool.num_free + g.pool.num_cached == g.pool.num_blocks


def test_gemma3_270m_default_split():
    """Gemma 3 270M, fp32, the CPU default budget of 1 GiB and 64 seats: both groups get 1,820
    blocks of 16 (96 KiB global + 480 KiB sliding = 576 KiB a block pair), 29,120 tokens of
    global context, where 64 full rings used to leave 362 global blocks = 5,792 tokens. With
    blocks of 32 a 760-token prompt, refused before (21 global blocks), now fits."""
    from qkv.kvcache.manager import KVCacheManager
    from qkv.kvcache.plan import context_capacity, plan_num_blocks
    from qkv.kvcache.spec import layer_specs
    from qkv.tools.memory import engine_pools, read_config

    cfg = read_config("gemma3-270m")
    specs = layer_specs(cfg, 4)
    n = plan_num_blocks(specs, 16, 64, 1 << 30)
    kv = KVCacheManager(specs, 16, n)
    assert [type(g.spec) for g in kv.groups] == [SlidingWindow, FullAttention] and n == [1820, 1820]
    assert sum(b * 16 * g.spec.bytes_per_token * len(g.layers) for b, g in zip(n, kv.groups)) <= 1 << 30
    assert context_capacity(kv, 32768) == (29120, 29120)
    pools = engine_pools(cfg, 32, 32)
    assert pools["blocks"] == {"sliding": 910, "full": 910}
    assert pools["context_per_sequence"] == pools["global_context_all_sequences"] == 29120
    kv32 = KVCacheManager(specs, 32, plan_num_blocks(specs, 32, 64, 1 << 30))
    assert kv32.can_ever_fit(760 + 16)
    # A budget larger than 64 sequences can use in sliding blocks: the rings are capped and
    # the rest goes to the global layers (caching off: 64 rings of 33 blocks).
    big = plan_num_blocks(specs, 16, 64, 8 << 30, prefix_caching=False)
    assert big[0] == 64 * 33 and big[1] == ((8 << 30) - 64 * 33 * 16 * 15 * 2048) // (16 * 3 * 2048)


def test_reported_capacity_is_what_admission_enforces(models, capsys):
    """The start-up line's "one sequence up to N tokens" is the longest request add() accepts."""
    path, _ = models
    llm = LLM(path(8), dtype="float32", device="cpu", block_size=4, num_kv_blocks=[4, 10])
    line = capsys.readouterr().err
    assert "(sliding 4, full 10) = 40 tokens of global context for all sequences together; " \
           "one sequence up to 40 tokens" in line
    llm.engine.add_request(BASE[:30], SamplingParams(max_tokens=10))
    with pytest.raises(RequestTooLarge):
        llm.engine.add_request(BASE[:30], SamplingParams(max_tokens=11))
    # A sliding pool below ring + 1 blocks (a window table's need) caps one sequence too.
    llm = LLM(path(8), dtype="float32", device="cpu", block_size=4, num_kv_blocks=[3, 10])
    assert "one sequence up to 12 tokens" in capsys.readouterr().err
    llm.engine.add_request(BASE[:6], SamplingParams(max_tokens=6))
    with pytest.raises(RequestTooLarge):
        llm.engine.add_request(BASE[:6], SamplingParams(max_tokens=7))


def test_logits_of_a_long_input_fit_a_small_sliding_pool(models):
    """``llm.logits`` chunks by the token budget; with the sliding pool at ring + 1 blocks a
    64-token chunk's window table does not fit, so scoring must shrink its chunks as the
    scheduler does (it raised "do not fit in the free KV blocks")."""
    path, _ = models
    prompt = BASE[:40]
    small = LLM(path(8), dtype="float32", device="cpu", block_size=4, num_kv_blocks=[4, 64],
                max_num_batched_tokens=64)
    roomy = LLM(path(8), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256,
                enable_prefix_caching=False, max_num_batched_tokens=64)
    torch.testing.assert_close(small.logits(prompt), roomy.logits(prompt), rtol=1e-5, atol=1e-5)
    u = small.stats()
    assert u["num_blocks_free"] + u["num_blocks_cached"] == u["num_blocks_total"]
