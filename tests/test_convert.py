"""``qkv convert``: pooled K/V heads are the group means, and the result loads in qkv and in
HF transformers with equal logits."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.cli import main

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 64, 128, 31, 2]


def hf_logits(path: str, ids: list[int]) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_logits_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-4 of the logits' scale (the project's parity criterion)."""
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, f"logits relative error {err:.2e}"


def group_means(w: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """The reference pooling, written out head by head."""
    per = w.shape[0] // heads
    rows = [w[h * per:(h + 1) * per] for h in range(heads)]
    size = heads // groups
    return torch.cat([sum(rows[g * size:(g + 1) * size]) / size for g in range(groups)])


def read(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("family,kw,src_heads,dst_heads", [
    ("llama", dict(num_key_value_heads=4, attention_bias=True), 4, 2),  # MHA -> GQA-2, with biases
    ("llama", dict(num_key_value_heads=4), 4, 1),                       # MHA -> MQA
    ("qwen2", dict(num_key_value_heads=2), 2, 1),                       # GQA -> MQA, q/k/v biases
])
def test_pooled_weights_and_logits(tiny_model, tmp_path, family, kw, src_heads, dst_heads):
    from qkv import LLM

    src, hf = tiny_model(family, **kw)
    dst = tmp_path / "out"
    assert main(["convert", src, str(dst), "--kv-heads", str(dst_heads)]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_key_value_heads"] == dst_heads and cfg["model_type"] == family

    before, after = hf.state_dict(), read(dst)
    pooled = 0
    for name, w in before.items():
        if ".k_proj." in name or ".v_proj." in name:
            torch.testing.assert_close(after[name], group_means(w, src_heads, dst_heads), rtol=0, atol=1e-7)
            pooled += 1
        elif name in after:
            assert torch.equal(after[name], w), name  # everything else untouched
    assert pooled == 2 * 2 * (1 + bool(kw.get("attention_bias") or family == "qwen2"))

    ours = LLM(str(dst), device="cpu").logits(PROMPT)
    theirs = hf_logits(str(dst), PROMPT)
    assert_logits_close(ours, theirs)


def test_bad_requests_are_clear_errors(tiny_model, tmp_path, capsys):
    src, _ = tiny_model("llama", num_key_value_heads=4)
    assert main(["convert", src, str(tmp_path / "a"), "--kv-heads", "3"]) == 2
    assert "must divide" in capsys.readouterr().err
    gpt2, _ = tiny_model("gpt2")
    assert main(["convert", gpt2, str(tmp_path / "b"), "--kv-heads", "1"]) == 2
    assert "gpt2" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    assert main(["convert", src, str(tmp_path / "c"), "--kv-heads", "2"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "c" / "x").exists()


def test_smollm2_to_mqa_keeps_tokenizer_and_matches_hf(smollm2, tmp_path):
    """The real model from its GGUF: tokenizer and chat template survive; qkv and HF agree."""
    from qkv import LLM
    from qkv.loading import load
    from qkv.tools.convert import pool_kv_heads, save_hf

    src = load("smollm2")
    cfg, weights = pool_kv_heads(src.config, src.weights, 1)
    k = "model.layers.7.self_attn.k_proj.weight"
    torch.testing.assert_close(weights[k], group_means(src.weights[k], 3, 1), rtol=0, atol=1e-7)
    dst = save_hf(tmp_path / "smollm2-mqa", cfg, weights, src.tokenizer, dtype="bfloat16")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in dst.iterdir()}

    mqa = LLM(str(dst), device="cpu", dtype="float32")  # compared with HF in fp32
    assert mqa.config.num_kv_heads == 1
    text = "The KV cache of a 7B model at 16K tokens takes 8 GiB."
    assert mqa.encode(text) == smollm2.encode(text)
    chat = [{"role": "user", "content": "What is GQA?"}]
    assert mqa.chat_prompt(chat) == smollm2.chat_prompt(chat)

    import transformers as tf

    assert tf.AutoTokenizer.from_pretrained(str(dst))(text).input_ids == smollm2.encode(text)
    ids = smollm2.encode(text)
    assert_logits_close(mqa.logits(ids), hf_logits(str(dst), ids))
