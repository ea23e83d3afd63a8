"""``qkv convert --uptrain``: distillation after pooling wins back what pooling lost, on text
held out from training; the result loads in qkv and in HF with the same greedy tokens; the
report has its rows; bad arguments are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer with 256 ids (no merges), saved beside a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture
def teacher(tiny_model):
    """A tiny MHA Llama (4 heads, 4 KV heads) with a byte tokenizer. Initialised 10x wider
    than HF's default so that its heads differ and its next-token distributions are peaked:
    then pooling costs something and uptraining has something to win back."""
    path, hf = tiny_model("llama", num_key_value_heads=4, initializer_range=0.2, seed=3)
    byte_tokenizer(Path(path))
    return path, hf


def heldout_kl(student, teacher, ids: list[int], window: int = 64) -> float:
    """Mean KL(teacher || student) over windows of held-out ids."""
    from qkv.tools.uptrain import distill_kl

    with torch.no_grad():
        x = torch.tensor(ids[: len(ids) // window * window]).view(-1, window)
        return distill_kl(student(x).logits, teacher(x).logits).item()


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_uptraining_beats_pooling_on_heldout_text(teacher, kv_heads):
    from qkv.loading import load
    from qkv.tools import uptrain as up
    from qkv.tools.convert import pool_kv_heads
    from qkv.tools.perplexity import default_corpus

    path, _ = teacher
    src = load(path)
    cfg, pooled = pool_kv_heads(src.config, src.weights, kv_heads)
    corpus = default_corpus()
    heldout = src.tokenizer.encode(corpus[:2048], add_special_tokens=False)
    encode = lambda texts: [src.tokenizer.encode(s, add_special_tokens=False) for s in texts]  # noqa: E731
    train = up.training_ids(encode, 20_000, up.training_texts(up.heldout_lines(corpus)))
    assert len(train) >= 20_000
    held = " ".join(corpus[:2048].split()[:50])
    assert held not in src.tokenizer.decode(train)  # the evaluation text is not trained on

    t_model = up.hf_model(src.config, src.weights).eval()
    before = heldout_kl(up.hf_model(cfg, pooled).eval(), t_model, heldout)
    run = up.UptrainConfig(tokens=30 * 8 * 32, batch=8, seq_len=32, lr=1e-2, checkpoints=3, device="cpu")
    result = up.uptrain(src.config, src.weights, cfg, pooled, train, run)
    after = heldout_kl(up.hf_model(cfg, result.weights).eval(), t_model, heldout)
    assert before > 0.05, before  # pooling really lost something
    assert after < 0.6 * before, (before, after)
    # the caller's weights are untouched, and only the pooled shapes come back
    k = "model.layers.0.self_attn.k_proj.weight"
    assert result.weights[k].shape == pooled[k].shape == (kv_heads * 16, 64)
    assert [c.tokens for c in result.curve] == [0, 10 * 256, 20 * 256, 30 * 256]


def test_cli_output_loads_in_qkv_and_hf_with_same_greedy_tokens_and_report(teacher, tmp_path):
    import transformers as tf

    from qkv import LLM, SamplingParams

    path, _ = teacher
    dst, report = tmp_path / "mqa", tmp_path / "r.md"
    argv = ["convert", path, str(dst), "--kv-heads", "1", "--uptrain", "--uptrain-tokens", "1k",
            "--uptrain-batch", "4", "--uptrain-seq-len", "64", "--checkpoints", "2", "--device", "cpu",
            "--uptrain-lr", "1e-2", "--report", str(report), "--ppl-window", "64", "--ppl-max-tokens", "256"]
    assert main(argv) == 0
    text = report.read_text()
    for row in ("| before conversion | 4 | 512 | 2,097,152 |", "| after pooling | 1 | 128 | 8,388,608 |",
                "| after uptraining | 1 | 128 | 8,388,608 |", "| 0 | 0 | - |", "| 512 | 2 |", "| 1,024 | 4 |"):
        assert row in text, (row, text)
    assert (tmp_path / "r.png").stat().st_size > 1000

    prompt = [5, 17, 42, 99, 3, 250, 7, 8]
    ours = LLM(str(dst), device="cpu").generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                                         ignore_eos=True))[0]
    hf = tf.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert ours.outputs[0].token_ids == ref
    # and uptraining changed the pooled weights it started from
    from safetensors.torch import load_file

    from qkv.loading import load
    from qkv.tools.convert import pool_kv_heads

    _, pooled = pool_kv_heads(load(path).config, load(path).weights, 1)
    k = "model.layers.1.self_attn.k_proj.weight"
    assert not torch.allclose(load_file(str(dst / "model.safetensors"))[k], pooled[k])


@pytest.mark.parametrize("extra,message", [
    (["--kv-heads", "3", "--report", "r.md"], "must divide"),
    (["--kv-heads", "1", "--uptrain"], "--uptrain needs --uptrain-tokens"),
    (["--kv-heads", "1", "--uptrain-tokens", "1k"], "--uptrain-tokens only apply with --uptrain"),
    (["--kv-heads", "1", "--uptrain", "--uptrain-tokens", "10", "--uptrain-batch", "4"], "less than one step"),
    (["--kv-heads", "1", "--uptrain", "--uptrain-tokens", "1k", "--checkpoints", "0"], "--checkpoints must be at least 1"),
    (["--kv-heads", "1", "--report", "r.txt"], "give a .md path"),
    (["--kv-heads", "1", "--uptrain", "--uptrain-tokens", "1k", "--uptrain-text", "nope.txt"], "nope.txt"),
    (["--kv-heads", "1", "--device", "cpu"], "--device only apply with --uptrain or --report"),
    (["--kv-heads", "1", "--uptrain-lr", "1e-3", "--seed", "2"], "--uptrain-lr, --seed only apply with --uptrain"),
])
def test_bad_arguments_are_clear_errors(teacher, tmp_path, capsys, extra, message):
    path, _ = teacher
    assert main(["convert", path, str(tmp_path / "out")] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_token_count(teacher, tmp_path, capsys):
    path, _ = teacher
    with pytest.raises(SystemExit):
        main(["convert", path, str(tmp_path / "o"), "--kv-heads", "1", "--uptrain", "--uptrain-tokens", "lots"])
    assert "not a token count: 'lots'" in capsys.readouterr().err


def test_no_tokenizer_is_refused(tiny_model, tmp_path, capsys):
    path, _ = tiny_model("llama", num_key_value_heads=4)
    argv = ["convert", path, str(tmp_path / "o"), "--kv-heads", "1", "--report", str(tmp_path / "r.md")]
    assert main(argv) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_schedule_warms_up_then_decays():
    from qkv.tools.uptrain import UptrainConfig, lr_factor

    for schedule in ("cosine", "linear"):
        cfg = UptrainConfig(tokens=100 * 64, batch=1, seq_len=64, schedule=schedule, warmup=0.1)
        f = [lr_factor(s, cfg.steps, cfg) for s in range(cfg.steps)]
        assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
        assert all(a >= b for a, b in zip(f[9:], f[10:])) and f[-1] == pytest.approx(0.1, abs=0.02)


def test_attention_only_uptraining_moves_only_the_attention_projections(teacher):
    from qkv.loading import load
    from qkv.tools import uptrain as up
    from qkv.tools.convert import pool_kv_heads

    path, _ = teacher
    src = load(path)
    cfg, pooled = pool_kv_heads(src.config, src.weights, 1)
    train = list(range(256)) * 8
    run = up.UptrainConfig(tokens=4 * 4 * 32, batch=4, seq_len=32, lr=1e-2, checkpoints=1, device="cpu",
                           params="attention")
    result = up.uptrain(src.config, src.weights, cfg, pooled, train, run)
    moved = {k for k in pooled if not torch.equal(pooled[k], result.weights[k])}
    attention = {k for k in pooled if k.rsplit(".", 2)[-2] in up.ATTENTION_PARAMS}
    assert attention and moved == attention, sorted(moved ^ attention)[:4]


def test_training_files_are_the_stdlib_then_packages_without_the_heldout_package():
    from qkv.tools import uptrain as up

    std = up.stdlib_files()
    files = list(up.python_files())
    assert files[: len(std)] == std and len(files) > len(std)  # this venv has packages installed
    assert not any("pydoc_data" in f.parts for f in files)
    assert all(f.stat().st_size <= 1 << 20 for f in files[len(std):])
    assert len({f.resolve() for f in files[len(std):]}) == len(files) - len(std)


def test_unknown_trainable_set_is_refused_by_name():
    from qkv.tools.uptrain import UptrainConfig

    with pytest.raises(ValueError, match="--uptrain-params"):
        UptrainConfig(tokens=64, batch=1, seq_len=64, params="mlp")
