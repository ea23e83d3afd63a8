"""Sampling options (vLLM's names and semantics), logprobs, the vLLM-shaped Python API and the
model's generation_config.json defaults.

References we did not write: transformers' logits processors (repetition penalty, min_p,
bad words) on the same logits, HF's own forward pass for logprobs (fp32, within 1e-4), and
OpenAI's published formula for presence/frequency penalties.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.engine import processors
from qkv.engine.request import Request

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64


def _req(prompt, output, **kw) -> Request:
    r = Request(prompt, SamplingParams(max_tokens=50, **kw))
    r.all_token_ids += output
    return r


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, HF model): a tiny random Llama with eos id 1."""
    from tests.conftest import tiny_config

    cfg, cls = tiny_config("llama")
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-sampling")
    hf.save_pretrained(d)
    return str(d), hf


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny[0], device="cpu", num_kv_blocks=64)


def test_no_options_cost_nothing():
    logits = torch.randn(3, V)
    reqs = [_req([1, 2], [3]), _req([4], []), _req([5], [6, 7], temperature=0.5, top_k=3, seed=1)]
    assert processors.apply(logits, reqs) is logits  # not even a copy


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, V) * 3
    rows = [([3, 4, 5], [6, 3, 9], 1.7), ([10, 11], [], 0.6), ([12], [13, 13, 14], 1.0)]
    reqs = [_req(p, o, repetition_penalty=rp) for p, o, rp in rows]
    got = processors.apply(logits, reqs)
    for i, (p, o, rp) in enumerate(rows):
        want = RepetitionPenaltyLogitsProcessor(rp)(torch.tensor([p + o]), logits[i:i + 1].clone())
        torch.testing.assert_close(got[i:i + 1], want)


def test_presence_and_frequency_penalties_follow_openai():
    """OpenAI: mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty, c over
    the output only (the prompt's tokens are not penalized)."""
    torch.manual_seed(1)
    logits = torch.randn(2, V)
    reqs = [_req([5, 6, 7], [6, 8, 8, 8], presence_penalty=0.5, frequency_penalty=0.25),
            _req([9], [9, 10], presence_penalty=-1.0)]
    got = processors.apply(logits, reqs)
    want = logits.clone()
    for i, r in enumerate(reqs):
        counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=V).float()
        want[i] -= counts * r.params.frequency_penalty + (counts > 0).float() * r.params.presence_penalty
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("min_p,temperature", [(0.1, 1.0), (0.3, 0.5), (0.05, 2.0)])
def test_min_p_matches_hf(min_p, temperature):
    from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper

    torch.manual_seed(2)
    logits = torch.randn(2, V) * 2
    got = processors.apply(logits, [_req([1], [], min_p=min_p, temperature=temperature)] * 2)
    scaled = TemperatureLogitsWarper(temperature)(None, logits.clone())
    want = MinPLogitsWarper(min_p)(None, scaled)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert 1 <= torch.isfinite(got[0]).sum() < V  # the case is not trivial


def test_bad_words_match_hf():
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    torch.manual_seed(3)
    logits = torch.randn(3, V)
    words = [[7], [20, 21], [30, 31, 32]]
    outs = [[2, 2, 20], [2, 30, 31], [2, 20, 3]]  # row 0: 21 banned; row 1: 32 banned; row 2: only 7
    reqs = []
    for o in outs:
        r = _req([40], o, bad_words=["x"])
        r.bad_words_ids = words
        reqs.append(r)
    got = processors.apply(logits, reqs)
    want = NoBadWordsLogitsProcessor(words)(torch.tensor([[40] + o for o in outs]), logits.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.isinf(got).sum() == 5


def test_logit_bias_forces_a_token(llm):
    for params in (dict(temperature=0), dict(temperature=1.0, seed=4)):
        out = llm.generate([5, 6, 7], SamplingParams(max_tokens=6, logit_bias={9: 100}, ignore_eos=True, **params))[0]
        assert out.token_ids == [9] * 6


def test_min_tokens_suppresses_eos(llm):
    eos = 1
    force_eos = dict(temperature=0, max_tokens=20, logit_bias={eos: 100})
    assert llm.generate([5, 6, 7], SamplingParams(**force_eos))[0].token_ids == [eos]
    out = llm.generate([5, 6, 7], SamplingParams(min_tokens=5, **force_eos))[0]
    assert out.token_ids[:5] != [eos] * 5 and eos not in out.token_ids[:5]
    assert out.token_ids[5:] == [eos] and out.finish_reason == "stop"
    out = llm.generate([5, 6, 7], SamplingParams(min_tokens=3, stop_token_ids=[9], temperature=0, max_tokens=20,
                                                 logit_bias={9: 100}))[0]
    assert out.token_ids[3:] == [9] and 9 not in out.token_ids[:3]


def test_allowed_token_ids(llm):
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True,
                                                 allowed_token_ids=[20, 30, 40]))[0]
    assert set(out.token_ids) <= {20, 30, 40} and len(set(out.token_ids)) > 1


def test_include_stop_str_in_output_and_bad_words(tmp_path):
    from tests.test_server import make_model_dir

    llm = LLM(make_model_dir(tmp_path / "m"), device="cpu", num_kv_blocks=32)
    base = dict(temperature=0, max_tokens=16, ignore_eos=True)
    text = llm.generate("the quick brown", SamplingParams(**base))[0].text
    stop = text[3:5]
    cut = llm.generate("the quick brown", SamplingParams(stop=[stop], **base))[0]
    kept = llm.generate("the quick brown", SamplingParams(stop=[stop], include_stop_str_in_output=True, **base))[0]
    assert cut.text == text[:text.index(stop)] and cut.prompt == "the quick brown"
    assert kept.text == text[:text.index(stop) + len(stop)]
    # bad_words: the word's token, alone or after a space, never comes out
    word = next(w for w in (llm.tokenizer.decode([t]) for t in llm.generate("the quick brown", SamplingParams(**base))[0].token_ids)
                if len(w.strip()) > 1 and len(llm.tokenizer.encode(w.strip(), add_special_tokens=False)) == 1)
    banned = {llm.tokenizer.encode(word.strip(), add_special_tokens=False)[0]}
    assert banned & set(llm.generate("the quick brown", SamplingParams(**base))[0].token_ids)
    clean = llm.generate("the quick brown", SamplingParams(bad_words=[word], **base))[0]
    assert not banned & set(clean.token_ids) and word not in clean.text
    # stop strings count only from min_tokens on (vLLM)
    late = llm.generate("the quick brown", SamplingParams(stop=[stop], min_tokens=12, **base))[0]
    assert len(late.token_ids) >= 12


def _mixed_batch():
    return [
        ([5, 6, 7], SamplingParams(max_tokens=10, temperature=0.9, seed=11, repetition_penalty=1.5, min_p=0.02,
                                   presence_penalty=0.5, frequency_penalty=0.3, logprobs=2, ignore_eos=True)),
        ([8, 9], SamplingParams(max_tokens=7, temperature=1.0, seed=5, ignore_eos=True)),
        ([10, 11, 12, 13], SamplingParams(max_tokens=9, temperature=0.7, seed=2, logit_bias={3: 5.0},
                                          allowed_token_ids=list(range(0, 40)), ignore_eos=True)),
        ([14], SamplingParams(max_tokens=8, temperature=0, bad_words=None, min_tokens=4)),
    ]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_seeded_results_do_not_depend_on_the_batch(tiny, async_scheduling):
    llm = LLM(tiny[0], device="cpu", num_kv_blocks=64, async_scheduling=async_scheduling)
    work = _mixed_batch()
    together = llm.generate([p for p, _ in work], [sp for _, sp in work])
    for (prompt, sp), out in zip(work, together):
        alone = llm.generate(prompt, sp)[0]
        assert alone.token_ids == out.token_ids
        assert (alone.cumulative_logprob is None) == (out.cumulative_logprob is None)
        if alone.cumulative_logprob is not None:
            assert alone.cumulative_logprob == pytest.approx(out.cumulative_logprob, abs=1e-5)


def test_logprobs_match_hf(llm, tiny):
    hf = tiny[1]
    prompt = [5, 6, 7, 8, 9]
    out = llm.generate({"prompt_token_ids": prompt},
                       sampling_params=SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=3,
                                                      prompt_logprobs=2, repetition_penalty=1.3, ignore_eos=True))[0]
    full = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), dim=-1)
    # the model's own distribution: before penalties and temperature (vLLM's default)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert list(entry)[0] == tok
        assert abs(entry[tok].logprob - row[tok].item()) < 1e-4
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        top = row.topk(3)
        tops = sorted((lp for lp in entry.values() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.logprob for lp in tops] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(ref[len(prompt) - 1 + i, t].item()
                                                       for i, t in enumerate(out.token_ids)), abs=1e-3)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[t][prompt[t]].logprob - ref[t - 1, prompt[t]].item()) < 1e-4
        assert len(out.prompt_logprobs[t]) >= 2


def test_prompt_logprobs_count_only_what_was_cached_before(tiny):
    # Scoring the prompt for prompt_logprobs computes and caches its blocks, so admission then
    # found the whole prompt cached: a fresh prompt reported num_cached_tokens > 0 (the usage's
    # cached_tokens) and the hit rate counted the request's own work as hits.
    llm = LLM(tiny[0], device="cpu", num_kv_blocks=64, block_size=4)
    prompt = list(range(5, 23))  # 4 full blocks before the last token
    sp = SamplingParams(max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompt}, sampling_params=sp)[0]
    assert first.num_cached_tokens == 0
    assert llm.stats()["prefix_cache_hit_rate"] == 0
    again = llm.generate({"prompt_token_ids": prompt}, sampling_params=sp)[0]
    assert again.num_cached_tokens == 16  # this time the blocks were there before it came
    longer = llm.generate({"prompt_token_ids": prompt + [30, 31, 32, 33]}, sampling_params=sp)[0]
    assert longer.num_cached_tokens == 16  # its own fifth block was not
    plain = llm.generate({"prompt_token_ids": prompt + [30, 31, 32, 33]},
                         sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert plain.num_cached_tokens == 20
    assert llm.stats()["num_blocks_in_use"] == 0


def test_vllm_python_api_shapes(llm):
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    by_ids = llm.generate([{"prompt_token_ids": [5, 6, 7]}], sampling_params=p)
    assert by_ids[0].outputs[0].token_ids == llm.generate([5, 6, 7], p)[0].token_ids
    o = by_ids[0].outputs[0]
    assert (o.index, o.finish_reason, o.logprobs, o.cumulative_logprob) == (0, "length", None, None)
    assert isinstance(o.text, str) and by_ids[0].prompt is None
    with pytest.raises(ValueError, match="no tokenizer"):  # this tiny model has none
        llm.generate([{"prompt": "ab"}], p)
    many = llm.generate([[5, 6], {"prompt_token_ids": [7, 8]}], [p, SamplingParams(n=2, max_tokens=3, seed=1)])
    assert len(many[0].outputs) == 1 and len(many[1].outputs) == 2
    assert [c.index for c in many[1].outputs] == [0, 1]
    with pytest.raises(TypeError, match="prompt_token_ids"):
        llm.generate([{"prompt_ids": [1, 2]}], p)
    with pytest.raises(TypeError, match="a prompt must be"):
        llm.generate([3.5], p)
    with pytest.raises(TypeError, match="sampling_params must be"):
        llm.generate([5, 6], sampling_params={"temperature": 0})
    with pytest.raises(TypeError, match="not both"):
        llm.generate([5, 6], p, sampling_params=p)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([[5], [6]], [p, p, p])
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([5], SamplingParams(logit_bias={10**6: 1.0}))
    assert llm.stats()["num_blocks_in_use"] == 0


def test_bad_sampling_params_name_the_field():
    for kw, field in [(dict(repetition_penalty=0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                      (dict(presence_penalty=3), "presence_penalty"), (dict(min_tokens=20, max_tokens=5), "min_tokens"),
                      (dict(logit_bias=[1]), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
                      (dict(bad_words=[""]), "bad_words"), (dict(logprobs=-1), "logprobs")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)


def test_generation_config_sets_defaults(tiny, tmp_path, capsys):
    """generation_config.json's sampling fields are the defaults of LLM, the server and the
    CLI when nothing else sets them (vLLM's rule); top_k=1 makes the default greedy."""
    import argparse

    from qkv.cli import add_sampling_arguments, sampling_params
    from tests.test_server import make_model_dir

    d = tmp_path / "m"
    make_model_dir(d)
    cfg_file = d / "generation_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    cfg.update(temperature=0.9, top_k=1, repetition_penalty=1.0, max_new_tokens=5)
    cfg_file.write_text(json.dumps(cfg))
    llm = LLM(str(d), device="cpu", num_kv_blocks=32)
    assert llm.generation_defaults == dict(temperature=0.9, top_k=1, repetition_penalty=1.0, max_tokens=5)
    prompt = llm.encode("the quick brown")
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert llm.generate(prompt)[0].token_ids == greedy.token_ids
    sampled = llm.generate(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=5, ignore_eos=True))[0]
    assert sampled.token_ids != greedy.token_ids
    # the CLI: flags win, then generation_config (printed), then its own defaults
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    add_sampling_arguments(p)
    sp = sampling_params(p.parse_args(["--model", str(d), "--temperature", "0.5"]))
    assert (sp.temperature, sp.top_k, sp.max_tokens) == (0.5, 1, 5)
    assert "defaults from generation_config.json: max_tokens=5, top_k=1" in capsys.readouterr().err
    sp = sampling_params(p.parse_args(["--model", str(tiny[0])]))
    assert (sp.temperature, sp.top_k, sp.max_tokens) == (0.0, 0, 256)
    # the server: a request without temperature/top_k gets them from generation_config
    httpx = pytest.importorskip("httpx")
    from qkv.server import create_app
    from tests.test_server import Server

    s = Server(create_app(llm, "tiny"))
    assert "request defaults from generation_config.json: temperature=0.9, top_k=1" in capsys.readouterr().err
    try:
        body = {"prompt": prompt, "max_tokens": 5, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["text"] == greedy.text
        r = httpx.post(s.url + "/v1/completions", json={**body, "top_k": 0, "temperature": 1.0, "seed": 0},
                       timeout=60).json()
        assert r["choices"][0]["text"] == sampled.text
    finally:
        s.stop()


def test_generation_config_bad_value_is_a_load_error(tiny, tmp_path):
    import shutil

    from qkv.loading import LoadError

    d = tmp_path / "m"
    shutil.copytree(tiny[0], d)
    (d / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(LoadError, match="generation_config.json: temperature"):
        LLM(str(d), device="cpu", num_kv_blocks=8)


def test_min_p_is_exact_at_the_threshold():
    """min_p keeps p_i >= min_p * p_max after temperature, computed on the logits."""
    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.49), -10.0] + [-30.0] * (V - 4)])
    got = processors.apply(logits, [_req([1], [], min_p=0.5, temperature=1.0)])
    assert torch.isfinite(got[0]).tolist()[:4] == [True, True, False, False]
