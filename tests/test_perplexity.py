"""``qkv perplexity``: agrees with HF transformers' loss on the same windows (within 0.5%)."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from qkv.cli import main
from qkv.tools.perplexity import default_corpus, perplexity, windows


def hf_perplexity(model, ids: list[int], window: int, max_tokens: int, bos: int | None = None) -> float:
    """The reference: HF's own mean cross-entropy (``labels=ids``) per window, weighted by its
    number of predictions."""
    ids = ids[:max_tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), window):
            seq = ([bos] if bos is not None else []) + ids[i:i + window]
            x = torch.tensor([seq])
            n = len(seq) - 1
            total += model(x, labels=x).loss.item() * n
            count += n
    return math.exp(total / count)


def test_windows():
    ids = list(range(1030))
    w = windows(ids, 512, None)
    assert [len(x) for x in w] == [512, 512, 6] and sum(w, []) == ids
    assert [len(x) for x in windows(ids, 512, 1025)] == [512, 512]  # a 1-token tail scores nothing
    with pytest.raises(ValueError):
        windows(ids, 1)


@pytest.fixture(scope="module")
def hf_smollm2():
    """HF transformers' own reading of the SmolLM2 GGUF, fp32."""
    import transformers as tf

    from qkv.loading.models import smollm2

    path = smollm2()
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                   dtype=torch.float32).eval()


def test_smollm2_matches_hf(smollm2, hf_smollm2):
    """Two windows of the built-in corpus (the full 16-window run: see the next test)."""
    ids = smollm2.tokenizer.encode(default_corpus(), add_special_tokens=False)
    ours = perplexity(smollm2.logits, ids, window=512, max_tokens=1024)
    ref = hf_perplexity(hf_smollm2, ids, 512, 1024)
    assert ours.num_windows == 2 and ours.num_predictions == 2 * 511
    assert abs(ours.perplexity / ref - 1) < 0.005, (ours.perplexity, ref)


@pytest.mark.skipif(not os.environ.get("QKV_SLOW_TESTS"), reason="16 windows: set QKV_SLOW_TESTS=1")
def test_smollm2_reference_value(smollm2):
    """The issue's reference: first 8192 tokens, 16 windows of 512, HF fp32 gives 14.94."""
    ids = smollm2.tokenizer.encode(default_corpus(), add_special_tokens=False)
    ours = perplexity(smollm2.logits, ids, window=512, max_tokens=8192)
    assert ours.num_windows == 16
    assert abs(ours.perplexity / 14.94 - 1) < 0.005, ours.perplexity


@pytest.fixture
def tiny_with_tokenizer(tiny_model, smollm2):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer files: the CLI end to end."""
    from qkv.tools.convert import save_tokenizer

    path, hf = tiny_model("llama", vocab_size=smollm2.config.vocab_size)
    from pathlib import Path

    save_tokenizer(smollm2.tokenizer, Path(path), 512)
    return path, hf


@pytest.mark.parametrize("bos,decode", [(False, False), (True, False), (False, True)])
def test_cli_on_a_text_file(tiny_with_tokenizer, smollm2, tmp_path, capsys, bos, decode):
    """``--decode``: one token a step, every position after a window's first through decode steps."""
    path, hf = tiny_with_tokenizer
    text = tmp_path / "t.txt"
    text.write_text(default_corpus()[:4000], encoding="utf-8")
    argv = ["perplexity", path, "--text", str(text), "--window", "64", "--max-tokens", "200", "--quiet"]
    assert main(argv + (["--bos"] if bos else []) + (["--decode"] if decode else [])) == 0
    out = capsys.readouterr().out
    ours = float(re.search(r"perplexity ([\d.]+)", out).group(1))
    ids = smollm2.tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
    ref = hf_perplexity(hf, ids, 64, 200, bos=smollm2.tokenizer.bos_token_id if bos else None)
    assert abs(ours / ref - 1) < 1e-3, (ours, ref)
    assert f"{(200 // 64) * (64 - 1 + bos) + 8 - 1 + bos:,} predictions" in out
    assert ("one token a step" in out) == decode


def test_cli_errors(tiny_model, capsys):
    path, _ = tiny_model("llama")
    assert main(["perplexity", path, "--quiet"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
