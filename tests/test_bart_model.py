"""BART (a text encoder-decoder) through the same cross-attention cache as Whisper, against HF
transformers in fp32: a tiny random ``BartForConditionalGeneration`` from ``BartConfig``."""

from __future__ import annotations

import pytest
import torch

from qkv import LLM
from qkv.engine.request import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

DECODER_PROMPT = [2, 0]  # decoder_start_token_id, then bos, as HF's BART generation starts


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    import transformers as tf

    cfg = tf.BartConfig(vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, scale_embedding=True)
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # widen HF's init so greedy tokens are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
        model.final_logits_bias.normal_()  # a non-zero bias must be loaded, not assumed zero
    path = tmp_path_factory.mktemp("bart") / "tiny"
    model.save_pretrained(path)
    return str(path), model


def hf_greedy(model, enc_ids: list[int], steps: int) -> list[int]:
    ids = list(DECODER_PROMPT)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([enc_ids]), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(DECODER_PROMPT):]


def test_bart_logits_and_batched_greedy_match_hf(bart_dir):
    path, hf = bart_dir
    llm = LLM(path, device="cpu", num_kv_blocks=64, block_size=4)
    eng = llm.engine
    enc = [list(range(5, 22)), [7, 9, 11, 30, 31, 40, 2]]  # different lengths: 17 and 7 positions
    (req,) = eng.add_request(DECODER_PROMPT + [50, 51], SamplingParams(max_tokens=1), encoder_features=enc[0])
    sched = eng.scheduler.schedule()
    ours = eng.runner.execute(sched, all_logits=True)
    eng.abort(req.request_id)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([enc[0]]), decoder_input_ids=torch.tensor([DECODER_PROMPT + [50, 51]])).logits[0]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    want = [hf_greedy(hf, e, steps=8) for e in enc]
    assert want[0] != want[1]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([{"encoder_features": torch.tensor(e), "prompt_token_ids": DECODER_PROMPT} for e in enc],
                        params)
    assert [o.token_ids for o in outs] == want
    s = llm.stats()
    assert s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate({"encoder_features": [5, 500], "prompt_token_ids": DECODER_PROMPT})
    with pytest.raises(ValueError, match="1 to 64 encoder token ids"):
        llm.generate({"encoder_features": list(range(65)), "prompt_token_ids": DECODER_PROMPT})
    # Refused by name: score()'s message told a caller who had passed encoder_features to pass them.
    with pytest.raises(ValueError, match=r"prompt_logprobs is not supported for bart \(encoder-decoder\)"):
        llm.generate({"encoder_features": enc[0], "prompt_token_ids": DECODER_PROMPT},
                     SamplingParams(max_tokens=1, prompt_logprobs=1))
    s = llm.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]


def test_a_cross_pool_smaller_than_the_longest_input_runs_the_inputs_it_holds(bart_dir):
    """Cross blocks are taken for the request's own encoder length: a pool of 8 blocks of 4
    holds a 17-token input (5 blocks) but not the longest, 64 (16 blocks). That request was
    refused as too large ("needs [.., 16]"); it now runs, one at a time beside a second, as HF."""
    path, hf = bart_dir
    llm = LLM(path, device="cpu", num_kv_blocks=[64, 8], block_size=4)
    enc = [list(range(5, 22)), list(range(30, 47))]
    want = [hf_greedy(hf, e, steps=6) for e in enc]
    outs = llm.generate([{"encoder_features": torch.tensor(e), "prompt_token_ids": DECODER_PROMPT} for e in enc],
                        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    s = llm.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
    with pytest.raises(ValueError, match=r"over 33 encoder positions needs \[1, 9\] KV blocks"):
        llm.generate({"encoder_features": list(range(5, 38)), "prompt_token_ids": DECODER_PROMPT},
                     SamplingParams(max_tokens=2))


def test_untied_embeddings_match_hf(tmp_path):
    """tie_word_embeddings=False: HF's encoder and decoder each read their own token embedding
    (and the lm_head its own), not model.shared; qkv read model.shared for both (logits off by
    75% of their range)."""
    import transformers as tf

    cfg = tf.BartConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = tf.BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.mul_(4)
    assert hf.model.encoder.embed_tokens.weight is not hf.model.shared.weight
    hf.save_pretrained(tmp_path / "untied")
    llm = LLM(str(tmp_path / "untied"), device="cpu", num_kv_blocks=32, block_size=4)
    enc, dec = list(range(5, 25)), DECODER_PROMPT + [40, 41]
    eng = llm.engine
    (req,) = eng.add_request(dec, SamplingParams(max_tokens=1), encoder_features=enc)
    ours = eng.runner.execute(eng.scheduler.schedule(), all_logits=True)
    eng.abort(req.request_id)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    out = llm.generate({"encoder_features": torch.tensor(enc), "prompt_token_ids": DECODER_PROMPT},
                       SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, enc, steps=6)
