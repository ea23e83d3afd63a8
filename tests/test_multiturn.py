"""A real multi-turn chat with SmolLM2: turn 2 reuses turn 1's blocks, prompt and answer.

The engine keys the full blocks of generated tokens too (KVCacheManager.cache_blocks), so
when turn 2's prompt starts with turn 1's prompt and answer, every whole block of them is a
prefix hit. That needs the chat template to re-tokenize the previous answer exactly as it
was generated; SmolLM2's does (the answer ends with <|im_end|>, which the template writes
back verbatim), and the test checks that first so that a failure says which half broke.
"""

from __future__ import annotations

import pytest
import torch

from qkv import SamplingParams


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_turn_two_reuses_turn_one(smollm2):
    llm, bs = smollm2, smollm2.engine.kv.block_size
    greedy = SamplingParams(max_tokens=24, temperature=0)
    turn1 = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt1 = llm.chat_prompt(turn1)
    out1 = llm.chat(turn1, greedy)
    assert out1.finish_reason in ("stop", "length") and out1.token_ids

    turn2 = turn1 + [{"role": "assistant", "content": out1.text}, {"role": "user", "content": "And of Italy?"}]
    prompt2 = llm.chat_prompt(turn2)
    history = prompt1 + out1.token_ids
    # The template must give back turn 1 token for token (measured: all of it, <|im_end|> included).
    assert common_prefix(history, prompt2) >= len(history) - (out1.finish_reason == "length")

    out2 = llm.chat(turn2, SamplingParams(max_tokens=8, temperature=0))
    # Turn 1's last sampled token was never fed back, so its K/V does not exist: when the
    # history is an exact multiple of the block size its last block is one token short.
    assert out2.num_cached_tokens >= (len(history) - 1) // bs * bs
    if len(history) % bs:
        assert out2.num_cached_tokens >= len(history) // bs * bs
    assert out2.num_cached_tokens < len(prompt2)
    s = llm.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]

    # The reused blocks give the same answer as computing turn 2 from scratch.
    llm.engine.kv.enable_prefix_caching = False
    try:
        cold = llm.chat(turn2, SamplingParams(max_tokens=8, temperature=0))
    finally:
        llm.engine.kv.enable_prefix_caching = True
    assert cold.num_cached_tokens == 0 and cold.token_ids == out2.token_ids
