"""The compiled CPU decode step (qkv/engine/cpu_compile.py) against the eager model, its
oracle: the same greedy tokens and log-probabilities, for one sequence (no mask) and for a
batch of sequences of different lengths (masked, the batch size symbolic); and a model it
does not cover is refused by name."""

from __future__ import annotations

import pytest

from qkv import LLM, SamplingParams

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.compiles]


def _run(llm, prompts, max_tokens=10):
    """Greedy token ids and their log-probabilities of each prompt (also tests/test_cpu_aoti.py's)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs], [
        [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]


@pytest.mark.parametrize("family", ["qwen2"])  # Llama wiring, with the QKV bias
def test_compiled_decode_matches_the_eager_model(tiny_model, family):
    path, _ = tiny_model(family)
    prompts = [[5, 9, 33, 2, 71], [8, 1, 4], [100, 3, 7, 7, 9, 12, 50, 6, 11]]
    eager = LLM(path, device="cpu")
    compiled = LLM(path, device="cpu", compile_decode=True)
    for batch in (prompts[:1], prompts):  # batch 1 (no mask), then 3 sequences at once
        (tok_e, lp_e), (tok_c, lp_c) = _run(eager, batch), _run(compiled, batch)
        assert tok_c == tok_e
        for a, b in zip(lp_c, lp_e):
            assert a == pytest.approx(b, abs=1e-4)
    assert compiled.engine.runner.compiled is not None


def test_compile_decode_refuses_what_it_does_not_cover(tiny_model):
    path, _ = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="compile_decode does not cover length-dependent RoPE scaling"):
        LLM(path, device="cpu", compile_decode=True)
