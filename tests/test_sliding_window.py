"""Sliding-window rolling buffer and per-spec cache accounting, on tiny random models.

- A generation past several windows through a small ring (block_size 4, window 8: a ring of
  3 blocks) equals a non-rolling reference with the same mask (the same weights with the
  window applied over a full cache) and HF transformers.
- Chunked prefill longer than the window gives the same outputs at any token budget.
- Each spec's bytes_per_token and blocks_needed match what the engine actually holds after
  prefill and throughout a long decode (full, sliding, MLA).
- Prefix caching on or off gives identical outputs.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.kvcache.spec import MLA, FullAttention, SlidingWindow

W, BS = 8, 4
GREEDY = dict(temperature=0, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _no_ring_copy(path: str, tmp_path) -> str:
    """The same checkpoint with the window removed from config.json (so a full, non-rolling cache)."""
    dst = tmp_path / "no-ring"
    shutil.copytree(path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["sliding_window"] = None
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def _run_and_watch(llm: LLM, prompt: list[int], n: int) -> tuple[list[int], list[list[int]]]:
    """Greedy-generate n tokens one engine step at a time; return the tokens and, after every
    step, the block count each group holds for the request."""
    (req,) = llm.engine.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY))
    held = []
    while not req.finished:
        llm.engine.step()
        if not req.finished:
            kv = llm.engine.kv  # null entries stand for blocks dropped out of the window
            held.append([sum(b != kv.null[g] for b in t) for g, t in enumerate(kv.block_tables(req.request_id))])
    return list(req.output_token_ids), held


@pytest.mark.parametrize("caching", [False, True], ids=["ring", "window-table"])
def test_rolling_buffer_equals_non_rolling_reference(tiny_model, tmp_path, caching):
    path, hf = tiny_model("mistral", sliding_window=W)
    prompt, n = _prompt(12, 0), 40  # 52 tokens: 6.5 windows
    llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=64, enable_prefix_caching=caching)
    (spec,) = llm.engine.specs[:1]
    assert isinstance(spec, SlidingWindow) and spec.ring_blocks(BS) == math.ceil(W / BS) + 1
    ours, held = _run_and_watch(llm, prompt, n)
    assert max(h[0] for h in held) == spec.ring_blocks(BS)  # the ring fills and stops growing

    ref = LLM(_no_ring_copy(path, tmp_path), dtype="float32", device="cpu", block_size=BS, num_kv_blocks=64)
    assert ref.engine.kv.ring == [None]
    for m in ref.engine.model.attention_layers():
        m.window = W  # same mask, but every position keeps its own slot
    theirs, held_ref = _run_and_watch(ref, prompt, n)
    assert max(h[0] for h in held_ref) == math.ceil((len(prompt) + n - 1) / BS)
    assert ours == theirs
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == hf_out
    seq = prompt + ours
    assert torch.allclose(llm.logits(seq), ref.logits(seq), rtol=0, atol=1e-5)


def test_chunked_prefill_longer_than_window(tiny_model):
    path, _ = tiny_model("mistral", sliding_window=W, seed=1)
    prompt = _prompt(50, 1)
    results, logits = [], []
    for budget in (3, 11, 64):
        llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=64,
                  max_num_batched_tokens=budget)
        results.append(llm.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))[0].token_ids)
        logits.append(llm.logits(prompt))
    assert all(r == results[0] for r in results)
    for lg in logits[1:]:
        assert torch.allclose(lg, logits[0], rtol=0, atol=1e-5)


def _check_accounting(llm: LLM, prompt: list[int], n: int, expect_kinds: set[type]) -> None:
    eng = llm.engine
    bs = eng.kv.block_size
    assert {type(g.spec) for g in eng.kv.groups} == expect_kinds
    # Bytes: every layer's cache tensor is exactly blocks x block_size x the spec's bytes per token.
    for gi, g in enumerate(eng.kv.groups):  # num_pages: the pool, plus a window group's null page
        for layer in g.layers:
            t = eng.runner.kv_caches[layer]
            assert t.numel() * t.element_size() == eng.kv.num_pages(gi) * bs * g.spec.bytes_per_token
    (req,) = eng.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY))
    checked_prefill = False
    while not req.finished:
        eng.step()
        if req.finished:
            break
        held = eng.kv.block_tables(req.request_id)
        for gi, (g, table) in enumerate(zip(eng.kv.groups, held)):
            # Cached tokens plus the one token written next step; null entries are dropped blocks.
            n_held = sum(b != eng.kv.null[gi] for b in table)
            want = g.spec.blocks_needed(req.num_computed_tokens, bs)
            assert n_held == want, (g.spec, req.num_computed_tokens, n_held, want)
            assert g.pool.num_in_use == n_held
            if isinstance(g.spec, SlidingWindow):
                assert n_held <= math.ceil(g.spec.window / bs) + 1
        checked_prefill = True
    assert checked_prefill
    assert all(g.pool.num_in_use == 0 for g in eng.kv.groups)


def test_spec_accounting_full_and_sliding(tmp_path):
    from test_gemma3 import tiny_gemma3

    path, _ = tiny_gemma3(tmp_path)
    llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=64)
    specs = {type(g.spec): g.spec for g in llm.engine.kv.groups}
    full, sliding = specs[FullAttention], specs[SlidingWindow]
    # MQA, head_dim 16, fp32: K and V of one head.
    assert full.bytes_per_token == sliding.bytes_per_token == 2 * 1 * 16 * 4
    assert sliding.window == W
    _check_accounting(llm, _prompt(30, 2), 40, {FullAttention, SlidingWindow})


def test_spec_accounting_mla(tmp_path):
    from test_mla import tiny_deepseek

    path, _ = tiny_deepseek(tmp_path, "v2", q_lora_rank=None, first_k_dense_replace=2)
    llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=64)
    (g,) = llm.engine.kv.groups
    assert isinstance(g.spec, MLA) and g.spec.bytes_per_token == (24 + 8) * 4
    _check_accounting(llm, _prompt(13, 3), 30, {MLA})


@pytest.mark.parametrize("budget", [3, 64])
def test_prefix_caching_on_off_identical(tmp_path, budget):
    """Hybrid Gemma 3 (window 8, block 4): with prefix caching on, a shared 24-token prefix is
    served to later requests for the global and the window layers alike (the window group
    keeps its last ceil(8/4) = 2 prefix blocks cached), and every output equals the run
    with caching off, on a cold and a warm cache, whole prompts or chunks of 3 tokens."""
    from test_gemma3 import tiny_gemma3

    path, _ = tiny_gemma3(tmp_path, seed=5)
    shared = _prompt(24, 4)
    prompts = [shared + _prompt(5, s) for s in (5, 6, 7)]
    outs = []
    for caching in (True, False):
        llm = LLM(path, dtype="float32", device="cpu", block_size=BS, num_kv_blocks=128,
                  enable_prefix_caching=caching, max_num_batched_tokens=budget)
        first = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))
        again = llm.generate(prompts, SamplingParams(max_tokens=10, **GREEDY))
        assert [o.token_ids for o in first] == [o.token_ids for o in again]
        if caching:  # prompt 29 tokens: at most (29 - 1) // 4 = 7 blocks = 28 tokens are served
            assert all(o.num_cached_tokens == 28 for o in again)
        else:
            assert all(o.num_cached_tokens == 0 for o in first + again)
        stats = llm.stats()
        assert stats["num_blocks_in_use"] == 0
        assert stats["num_blocks_free"] + stats["num_blocks_cached"] == stats["num_blocks_total"]
        outs.append([o.token_ids for o in first])
    assert outs[0] == outs[1]
