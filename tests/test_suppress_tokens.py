"""Whisper's decoding rules as logits processors: ``suppress_token_ids`` never sampled,
``begin_suppress_token_ids`` not as the first output token. Checked against HF transformers'
greedy decoding with the same masks (fp32), batched beside a request without them."""

from __future__ import annotations

import pytest
import torch

from qkv import LLM
from qkv.engine.request import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [5, 17, 42, 9]


def hf_masked_greedy(model, prompt: list[int], steps: int, suppress=(), begin=()) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for step in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            logits[list(suppress)] = -float("inf")
            if step == 0:
                logits[list(begin)] = -float("inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_suppress_and_begin_suppress_equal_hf_masked_greedy(tiny_model):
    path, model = tiny_model("llama")
    llm = LLM(path, device="cpu", num_kv_blocks=16)
    plain = hf_masked_greedy(model, PROMPT, 6)
    # Ban the tokens plain greedy picks, so the masks change the output.
    begin, suppress = [plain[0]], [t for t in plain[1:3] if t != plain[0]]
    expected = hf_masked_greedy(model, PROMPT, 6, suppress, begin)
    assert expected != plain and expected[0] != plain[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, suppress_token_ids=suppress,
                            begin_suppress_token_ids=begin)
    outs = llm.generate([PROMPT, PROMPT], [params, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])
    assert outs[0].token_ids == expected
    assert not set(outs[0].token_ids) & set(suppress)
    assert outs[1].token_ids == plain  # the row without masks is untouched
    s = llm.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]


def test_suppress_fields_are_checked():
    with pytest.raises(ValueError, match="suppress_token_ids must be a list"):
        SamplingParams(suppress_token_ids=5)
    with pytest.raises(ValueError, match="begin_suppress_token_ids must be at least 0"):
        SamplingParams(begin_suppress_token_ids=[-1])
    assert SamplingParams(suppress_token_ids=[3]).processes_logits
    assert not SamplingParams(suppress_token_ids=[]).processes_logits
