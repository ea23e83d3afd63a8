"""Whisper and BART on CUDA: the Triton cross attention over the paged cross pages, the encoder
on the card (a batch of requests at once), and decode steps replayed in CUDA graphs, against
HF transformers' full recompute in fp32 on the CPU (the same oracle as test_whisper_model.py)
and against qkv's own CPU engine on the real Whisper base. Needs a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_bart_model import DECODER_PROMPT, bart_dir  # noqa: E402,F401 (a fixture)
from test_bart_model import hf_greedy as bart_greedy  # noqa: E402
from test_whisper_model import PROMPT, hf_greedy, leak_free, mel, qkv_logits, whisper_dir  # noqa: E402,F401

from qkv import LLM  # noqa: E402
from qkv.engine.request import SamplingParams  # noqa: E402

# Engine variants on the card: the reference backend (the oracle's code on CUDA), Triton eager,
# and Triton with decode steps in CUDA graphs and async scheduling (the default on CUDA).
VARIANTS = {"reference": dict(attention_backend="reference", enforce_eager=True),
            "triton-eager": dict(enforce_eager=True),
            "triton-graphs": dict()}


def test_prompt_logits_on_cuda_match_hf(whisper_dir):
    """Prefill through the Triton prefill kernel (self) and per-token decode rows (cross)."""
    path, hf = whisper_dir
    llm = LLM(path, device="cuda", num_kv_blocks=32, enforce_eager=True)
    f = mel(1)
    ours = qkv_logits(llm, f, PROMPT).cpu()
    with torch.no_grad():
        ref = hf(input_features=f[None], decoder_input_ids=torch.tensor([PROMPT])).logits[0]
    # tf32 dots in the Triton kernels and cuDNN's convolutions: 5e-3, not the CPU's 1e-4
    assert torch.allclose(ours, ref, rtol=5e-3, atol=5e-3 * ref.abs().max().item()), (ours - ref).abs().max()
    leak_free(llm)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_greedy_tokens_on_cuda_match_hf(whisper_dir, variant):
    """Four requests with different audio and lengths, batched continuously (they finish at
    different steps, so graph batch sizes change): each one gets HF's recomputed tokens, the
    encoder runs for several requests at once, and no block leaks."""
    path, hf = whisper_dir
    llm = LLM(path, device="cuda", num_kv_blocks=64, max_num_seqs=8, **VARIANTS[variant])
    if variant == "triton-graphs":
        assert llm.engine.runner.graphs is not None and llm.engine.async_scheduling
    steps = [10, 4, 7, 12]
    feats = [mel(20 + i) for i in range(len(steps))]  # seed 21 and 23 start apart from 20 and 22
    want = [hf_greedy(hf, f, PROMPT, n)[0] for f, n in zip(feats, steps)]
    assert len({tuple(w[:4]) for w in want}) > 1  # the audio matters
    outs = llm.generate([{"encoder_features": f, "prompt_token_ids": PROMPT} for f in feats],
                        [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in steps])
    assert [o.token_ids for o in outs] == want
    assert llm.engine.runner.encoder.num_encoded == len(feats)
    leak_free(llm)


def test_preemption_on_cuda_re_encodes_and_keeps_tokens(whisper_dir):
    """A pool too small for all requests at once (as test_whisper_model's CPU case): requests
    join as others finish, some are preempted and re-encoded on readmission, graphs replay the
    decode steps; tokens stay HF's and nothing leaks."""
    path, hf = whisper_dir
    llm = LLM(path, device="cuda", block_size=4, num_kv_blocks=[5, 12], max_num_seqs=4)
    feats = [mel(10 + i) for i in range(4)]
    want = [hf_greedy(hf, f, PROMPT, steps=12)[0] for f in feats]
    outs = llm.generate([{"encoder_features": f, "prompt_token_ids": PROMPT} for f in feats],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert llm.stats()["num_preemptions"] > 0
    assert llm.engine.runner.encoder.num_encoded == 4 + llm.stats()["num_preemptions"]
    leak_free(llm)


def test_bart_on_cuda_matches_hf(bart_dir):
    """BART's encoders of different lengths (17 and 7 positions) through the same GPU path."""
    path, hf = bart_dir
    enc = [list(range(5, 22)), [7, 9, 11, 30, 31, 40, 2]]
    want = [bart_greedy(hf, e, steps=8) for e in enc]
    for kw in VARIANTS.values():
        llm = LLM(path, device="cuda", num_kv_blocks=64, block_size=4, **kw)
        outs = llm.generate([{"encoder_features": torch.tensor(e), "prompt_token_ids": DECODER_PROMPT} for e in enc],
                            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert [o.token_ids for o in outs] == want, kw
        leak_free(llm)


@pytest.mark.slow
def test_whisper_base_on_cuda_gives_the_cpu_tokens(tmp_path):
    """The real Whisper base (when its packages are installed) on espeak-ng speech: the CUDA
    engine (fp32, Triton, graphs) gives the CPU engine's token ids."""
    import shutil
    import subprocess

    from qkv.loading import LoadError
    from qkv.loading.models import whisper_base

    try:
        whisper_base()
    except LoadError as e:
        pytest.skip(str(e))
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = tmp_path / "door.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "please open the door and turn on the light"], check=True)
    tokens = {}
    for device in ("cpu", "cuda"):
        out = LLM("whisper-base", device=device).transcribe(str(wav), language="en", response_format="verbose_json")
        tokens[device] = [s["tokens"] for s in out["segments"]]
    assert tokens["cuda"] == tokens["cpu"]
    assert "door" in out["text"].lower()
