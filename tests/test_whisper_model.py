"""Whisper (encoder-decoder, cross-attention cache) against HF transformers in fp32.

A tiny random ``WhisperForConditionalGeneration`` is saved with ``save_pretrained`` and loaded by
qkv from the directory. The reference is HF's own forward without a cache, recomputed over the
whole decoder sequence at every step, so qkv's paged self- and cross-attention caches are
checked against a full recompute.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv import LLM
from qkv.engine.request import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

MELS, ENC = 16, 24  # mel bins; encoder positions (the input has 2 * ENC frames)
PROMPT = [1, 5, 6, 7]  # decoder start, then "language/task" ids of the tiny vocabulary


def tiny_whisper(seed: int = 0, **overrides):
    import transformers as tf

    kw = dict(vocab_size=128, num_mel_bins=MELS, encoder_layers=2, encoder_attention_heads=4, decoder_layers=2,
              decoder_attention_heads=4, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128,
              max_source_positions=ENC, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              decoder_start_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**kw)).eval()
    with torch.no_grad():  # HF's init (std 0.02) gives near-uniform logits: widen them so tokens differ
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    model = tiny_whisper()
    path = tmp_path_factory.mktemp("whisper") / "tiny"
    model.save_pretrained(path)
    return str(path), model


def mel(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(MELS, 2 * ENC, generator=g)


def hf_greedy(model, features: torch.Tensor, prompt: list[int], steps: int):
    """HF greedy decoding without a cache: every step recomputes the whole decoder sequence.
    Returns (tokens, logits of every step's last position)."""
    ids, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_features=features[None], decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            rows.append(out)
            ids.append(int(out.argmax()))
    return ids[len(prompt):], torch.stack(rows)


def qkv_logits(llm: LLM, features: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    """Every prompt position's logits through the engine's paged path (encoder, cross pages)."""
    eng = llm.engine
    (req,) = eng.add_request(prompt, SamplingParams(max_tokens=1), encoder_features=features)
    try:
        sched = eng.scheduler.schedule()
        assert sched.requests == [req]
        return eng.runner.execute(sched, all_logits=True)
    finally:
        eng.abort(req.request_id)


def leak_free(llm: LLM) -> None:
    s = llm.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"], s


def test_prompt_logits_match_hf(whisper_dir):
    path, hf = whisper_dir
    llm = LLM(path, device="cpu", num_kv_blocks=32)
    f = mel(1)
    ours = qkv_logits(llm, f, PROMPT)
    with torch.no_grad():
        ref = hf(input_features=f[None], decoder_input_ids=torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    leak_free(llm)


def test_scale_embedding_is_not_applied_as_in_hf(tmp_path):
    """HF's Whisper derives embed_scale from scale_embedding but never multiplies by it."""
    hf = tiny_whisper(seed=1, scale_embedding=True)
    hf.save_pretrained(tmp_path / "scaled")
    llm = LLM(str(tmp_path / "scaled"), device="cpu", num_kv_blocks=16)
    ours = qkv_logits(llm, mel(6), PROMPT)
    with torch.no_grad():
        ref = hf(input_features=mel(6)[None], decoder_input_ids=torch.tensor([PROMPT])).logits[0]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("prefix_caching,budget,async_scheduling", [(True, 2048, False), (False, 3, False),
                                                                   (True, 2048, True)])
def test_greedy_tokens_and_cached_logits_match_hf_recompute(whisper_dir, prefix_caching, budget, async_scheduling):
    """Cached decode (qkv) equals a full recompute (HF) token for token; with a budget of 3 the
    encoder (24 positions) overdraws the step's budget and the prompt is prefilled in chunks."""
    path, hf = whisper_dir
    llm = LLM(path, device="cpu", num_kv_blocks=32, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=budget, async_scheduling=async_scheduling)
    f = mel(2)
    want, ref_rows = hf_greedy(hf, f, PROMPT, steps=10)
    out = llm.generate({"encoder_features": f, "prompt_token_ids": PROMPT},
                       SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0))[0]
    assert out.token_ids == want
    # The sampled token's log-probability equals HF's, at every cached decode step.
    ref_lp = ref_rows.log_softmax(-1).gather(1, torch.tensor(want)[:, None]).squeeze(1)
    ours_lp = torch.tensor([next(iter(d.values())).logprob for d in out.logprobs])
    assert torch.allclose(ours_lp, ref_lp, atol=1e-4)
    leak_free(llm)


def test_different_audio_batched_get_their_own_tokens(whisper_dir):
    """Four requests, two audios, the same decoder prompt, one batch: each gets the tokens HF
    gives its own audio alone. The prefix cache must not hand audio B the decoder blocks of
    audio A (same prompt ids, blocks of 4 tokens so the prompt fills one)."""
    path, hf = whisper_dir
    llm = LLM(path, device="cpu", num_kv_blocks=64, block_size=4)
    feats = [mel(3), mel(4), mel(3), mel(4)]
    want = [hf_greedy(hf, f, PROMPT + [8], steps=6)[0] for f in feats[:2]]
    assert want[0] != want[1]  # otherwise the test could not tell the audios apart
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate([{"encoder_features": f, "prompt_token_ids": PROMPT + [8]} for f in feats], params)
    assert [o.token_ids for o in outs] == [want[0], want[1], want[0], want[1]]
    # A later request for audio A reuses A's cached prompt block; one for new audio reuses nothing.
    again = llm.generate([{"encoder_features": feats[0], "prompt_token_ids": PROMPT + [8, 9]}], params)[0]
    assert again.num_cached_tokens == 4
    fresh = llm.generate([{"encoder_features": mel(5), "prompt_token_ids": PROMPT + [8, 9]}], params)[0]
    assert fresh.num_cached_tokens == 0
    assert fresh.token_ids == hf_greedy(hf, mel(5), PROMPT + [8, 9], steps=6)[0]
    leak_free(llm)


def test_continuous_batching_with_preemption_keeps_tokens(whisper_dir):
    """A pool too small for all requests at once: requests join as others finish, some are
    preempted (their encoder runs again on readmission); tokens stay HF's."""
    path, hf = whisper_dir
    # cross: 24 positions = 6 blocks of 4 per request; 12 cross blocks = two requests at a time.
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=[5, 12], max_num_seqs=4)
    feats = [mel(10 + i) for i in range(4)]
    want = [hf_greedy(hf, f, PROMPT, steps=12)[0] for f in feats]
    outs = llm.generate([{"encoder_features": f, "prompt_token_ids": PROMPT} for f in feats],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert llm.stats()["num_preemptions"] > 0
    assert llm.engine.runner.encoder.num_encoded == 4 + llm.stats()["num_preemptions"]
    leak_free(llm)


def test_int8_weights_run_the_encoder_and_decoder(whisper_dir):
    """quantization="int8" swaps every nn.Linear (the tied output projection too): the encoder
    still runs and the logits stay near HF's fp32 ones."""
    path, hf = whisper_dir
    llm = LLM(path, device="cpu", num_kv_blocks=16, quantization="int8")
    f = mel(1)
    ours = qkv_logits(llm, f, PROMPT)
    with torch.no_grad():
        ref = hf(input_features=f[None], decoder_input_ids=torch.tensor([PROMPT])).logits[0]
    err = ((ours - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.05, err
    leak_free(llm)


def test_bad_encoder_input_is_refused_by_name(whisper_dir):
    path, _ = whisper_dir
    llm = LLM(path, device="cpu", num_kv_blocks=16)
    with pytest.raises(ValueError, match="needs encoder_features"):
        llm.generate([PROMPT], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"shape \[16, 48\]"):
        llm.generate({"encoder_features": torch.zeros(MELS, 10), "prompt_token_ids": PROMPT})
    for bad in (float("nan"), float("inf"), -float("inf")):
        one = mel(0)
        one[3, 7] = bad  # one element: the check must not rest on a sum that nan or inf dominates
        with pytest.raises(ValueError, match="nan or inf"):
            llm.generate({"encoder_features": one, "prompt_token_ids": PROMPT})
    # Finite but huge values overflow the sum to inf: still accepted (the check falls back to a mask).
    huge = torch.full((MELS, 2 * ENC), 3e38)
    llm.generate({"encoder_features": huge, "prompt_token_ids": PROMPT}, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="not supported"):
        llm.logits(PROMPT)
    leak_free(llm)
    assert not llm.engine.has_unfinished()


_HF_TOKENS: dict = {}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_schedule_gives_each_request_hf_tokens(whisper_dir, data):
    """Random pools (self and cross sized by hand, often forcing preemption), block sizes, token
    budgets (below and above the encoder's 24 positions), prefix caching and async scheduling,
    and requests mixing three audios and four prompts: every request gets the tokens HF gives it
    alone, and every block is free or cached afterwards."""
    path, hf = whisper_dir
    bs = data.draw(st.sampled_from([2, 4, 8]), "block_size")
    enc_blocks = -(-ENC // bs)
    n = data.draw(st.integers(2, 5), "requests")
    reqs = [(data.draw(st.integers(0, 2)), data.draw(st.integers(0, 3)), data.draw(st.integers(1, 6)))
            for _ in range(n)]
    longest = max(len(PROMPT) + p + t for _, p, t in reqs)
    self_blocks = data.draw(st.integers(-(-longest // bs), 3 * -(-longest // bs)), "self blocks")
    cross_blocks = enc_blocks * data.draw(st.integers(1, 3), "cross seats")
    llm = LLM(path, device="cpu", block_size=bs, num_kv_blocks=[self_blocks, cross_blocks],
              max_num_batched_tokens=data.draw(st.sampled_from([5, 30, 200]), "budget"),
              enable_prefix_caching=data.draw(st.booleans(), "prefix caching"),
              async_scheduling=data.draw(st.booleans(), "async"))
    prompts, want = [], []
    for audio, extra, steps in reqs:
        ids = PROMPT + list(range(20, 20 + extra))
        key = (audio, extra, steps)
        if key not in _HF_TOKENS:
            _HF_TOKENS[key] = hf_greedy(hf, mel(100 + audio), ids, steps)[0]
        prompts.append({"encoder_features": mel(100 + audio), "prompt_token_ids": ids})
        want.append(_HF_TOKENS[key])
    params = [SamplingParams(max_tokens=t, temperature=0, ignore_eos=True) for _, _, t in reqs]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == want
    leak_free(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_graph_staging_emulated(whisper_dir, monkeypatch, async_scheduling):
    """DecodeGraphs.run (the CUDA decode path) on the CPU, emulated as in
    test_async_scheduling.py: the cross tables and encoder lengths it stages (padding rows: one
    key) must give HF's tokens for requests with different audio that finish at different steps."""
    from qkv.engine import cuda_graph

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    class Replay:
        def __init__(self, graphs, size):
            self.graphs, self.size = graphs, size

        def replay(self):
            with torch.inference_mode():
                self.graphs.logits[self.size].copy_(self.graphs._forward(self.size))

    zeros = torch.zeros
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: zeros(*a, **k))
    path, hf = whisper_dir
    llm = LLM(path, device="cpu", num_kv_blocks=64, block_size=4, max_num_seqs=8, async_scheduling=async_scheduling)
    runner = llm.engine.runner
    graphs = cuda_graph.DecodeGraphs(runner, 8, llm.engine.max_model_len)
    assert graphs.encoder_lens is not None and graphs.max_blocks[1] == ENC // 4  # the cross group's width
    for size in graphs.sizes:
        graphs.logits[size] = torch.zeros(size, 128)
        graphs.graphs[size] = Replay(graphs, size)
    runner.graphs = graphs
    replays = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda sched, prev=None: replays.append(len(sched.requests)) or run(sched, prev))
    steps = [9, 3, 6]
    feats = [mel(30 + i) for i in range(3)]
    want = [hf_greedy(hf, f, PROMPT, n)[0] for f, n in zip(feats, steps)]
    outs = llm.generate([{"encoder_features": f, "prompt_token_ids": PROMPT} for f in feats],
                        [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in steps])
    assert [o.token_ids for o in outs] == want
    assert 3 in replays and 1 in replays  # padded graph sizes: 3 rows in the 4-row graph, then 1
    leak_free(llm)
