"""Audit of ``qkv convert``: a conversion that is refused must leave DST (and SRC) as they
were, whatever ``--force`` says. Each case is a bug that was found and fixed."""

from __future__ import annotations

import pytest

from qkv.cli import main


def _keep(path):
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    return path


@pytest.mark.parametrize("extra, message", [
    (["--kv-heads", "3"], "must divide"),                       # 3 of 4 KV heads
    (["--kv-heads", "0"], "must divide"),
    (["--kv-heads", "2", "--dtype", "int8"], "int8"),          # not a dtype weights are written in
    (["--kv-heads", "2", "--report", "report.md"], "has no tokenizer"),  # --report tokenizes text
])
def test_a_refused_conversion_with_force_keeps_dst(tiny_model, tmp_path, capsys, extra, message):
    """``--force`` removed DST first and checked the request afterwards: a wrong --kv-heads or
    --dtype, or a report on a model without a tokenizer, lost the old DST and wrote nothing."""
    src, _ = tiny_model("llama", num_key_value_heads=4)
    dst = _keep(tmp_path / "dst")
    assert main(["convert", src, str(dst), *extra, "--force"]) == 2
    assert message in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "keep me"
    file = tmp_path / "dst.bin"
    file.write_text("keep me")
    assert main(["convert", src, str(file), *extra, "--force"]) == 2
    assert file.read_text() == "keep me"


def test_an_unsupported_model_with_force_keeps_dst(tmp_path, capsys):
    """An encoder-decoder (or MLA, Gemma 3 ...) model is refused by its type, and DST stays."""
    transformers = pytest.importorskip("transformers")
    whisper = tmp_path / "whisper"
    transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=12, pad_token_id=1, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)).save_pretrained(whisper)
    dst = _keep(tmp_path / "dst")
    assert main(["convert", str(whisper), str(dst), "--kv-heads", "1", "--force"]) == 2
    assert "not 'whisper'" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "keep me"


def test_dst_that_is_or_holds_src_is_refused(tiny_model, tmp_path, capsys):
    """``qkv convert M M --force`` removed the model it was about to read (and so did a DST
    that is SRC's parent directory)."""
    import json

    src, _ = tiny_model("llama", num_key_value_heads=4)
    before = sorted(p.name for p in (tmp_path / "llama-0").iterdir())
    for dst in (src, str(tmp_path), src + "/."):
        assert main(["convert", src, dst, "--kv-heads", "2", "--force"]) == 2
        assert "would remove SRC" in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / "llama-0").iterdir()) == before
    assert json.loads((tmp_path / "llama-0" / "config.json").read_text())["num_key_value_heads"] == 4
    out = tmp_path / "llama-0" / "gqa2"  # inside SRC is fine: SRC's own files are not touched
    assert main(["convert", src, str(out), "--kv-heads", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2



def test_sampling_defaults_survive_the_conversion(tiny_model, tmp_path):
    """DST's generation_config.json held only bos/eos: the source's temperature, top_p and
    max_new_tokens were dropped, so the converted model was served with other defaults."""
    import transformers as tf

    from qkv.loading.hf import generation_defaults

    src, model = tiny_model("llama", num_key_value_heads=4)
    tf.GenerationConfig(bos_token_id=0, eos_token_id=1, do_sample=True, temperature=0.6, top_p=0.9,
                        max_new_tokens=77).save_pretrained(src)
    dst = tmp_path / "gqa2"
    assert main(["convert", src, str(dst), "--kv-heads", "2"]) == 0
    assert generation_defaults(dst) == generation_defaults(src) == {"temperature": 0.6, "top_p": 0.9,
                                                                    "max_tokens": 77}
    hf = tf.GenerationConfig.from_pretrained(dst)
    assert (hf.do_sample, hf.temperature, hf.top_p, hf.eos_token_id) == (True, 0.6, 0.9, [1])
