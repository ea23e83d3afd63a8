"""SmolLM2-135M-Instruct real weights: qkv against HF transformers loading the same GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qkv import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2.source)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model


def test_greedy_chat_64_tokens_identical(smollm2, hf_smollm2):
    ids = smollm2.chat_prompt([{"role": "user", "content": "What is a KV cache?"}])
    out = smollm2.generate([ids], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    hf_smollm2.generation_config.eos_token_id = None
    # An explicit mask: HF would otherwise infer one from pad_token_id (2, which is also the
    # prompt's <|im_end|>) and hide those prompt tokens.
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_smollm2.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False)
    ref = ref[0, len(ids):]
    assert out.token_ids == ref.tolist()
    assert len(out.token_ids) == 64
    assert "cache" in out.text.lower()


def test_logits_match_hf(smollm2, hf_smollm2):
    ids = smollm2.tokenizer.encode("The key-value cache stores the keys and values of past tokens")
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0]
    got = smollm2.logits(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
