"""``dtype="auto"`` (the default everywhere): the checkpoint's dtype on CUDA, float32 on the CPU;
one rule (qkv/engine/dtype.py), printed at start-up."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.cli import main
from qkv.config import ModelConfig
from qkv.engine.dtype import resolve_dtype

CUDA = torch.device("cuda")  # a device name needs no GPU: the rule is tested on any machine


def config(declared: str | None) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, checkpoint_dtype=declared)


@pytest.mark.parametrize("declared, want", [
    ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
    (None, torch.bfloat16),  # a random-weight shape declares nothing
    ("float8_e4m3fn", torch.bfloat16),  # not a compute dtype
])
def test_auto_on_cuda_is_the_checkpoints_dtype(declared, want):
    got, why = resolve_dtype("auto", config(declared), CUDA)
    assert got == want and why.startswith("auto: ")


@pytest.mark.parametrize("declared", ["bfloat16", "float16", None])
def test_auto_on_the_cpu_is_float32_unless_quantized(declared):
    assert resolve_dtype("auto", config(declared), "cpu")[0] == torch.float32
    assert resolve_dtype(None, config(declared), "cpu")[0] == torch.float32
    # int8 weights: bf16 activations, the CPU fast decode path (README, model/quant.py)
    assert resolve_dtype("auto", config(declared), "cpu", "int8")[0] == torch.bfloat16
    # Gemma 3 with int8 weights: float32 activations (its outliers; engine/dtype.py)
    gemma = ModelConfig(model_type="gemma3_text", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=128, checkpoint_dtype=declared)
    assert resolve_dtype("auto", gemma, "cpu", "int8")[0] == torch.float32
    assert resolve_dtype("auto", gemma, "cpu", "int4")[0] == torch.bfloat16


def test_a_named_dtype_wins_and_a_bad_one_is_refused_by_name():
    assert resolve_dtype("float16", config("bfloat16"), "cpu") == (torch.float16, "as given")
    assert resolve_dtype(torch.bfloat16, config(None), CUDA)[0] == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype 'float8'.*auto"):
        resolve_dtype("float8", config(None), CUDA)


def test_hf_config_declares_its_dtype():
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128)
    assert ModelConfig.from_hf({**base, "torch_dtype": "bfloat16"}).checkpoint_dtype == "bfloat16"  # transformers 4
    assert ModelConfig.from_hf({**base, "dtype": "float16", "torch_dtype": "float32"}).checkpoint_dtype == "float16"
    assert ModelConfig.from_hf(base).checkpoint_dtype is None
    assert ModelConfig.from_hf({**base, "torch_dtype": None}).checkpoint_dtype is None
    # Gemma 3 (multimodal): the dtype sits beside text_config, not in it.
    gemma = {"model_type": "gemma3", "torch_dtype": "bfloat16",
             "text_config": {**base, "model_type": "gemma3_text", "head_dim": 16, "num_key_value_heads": 1,
                             "sliding_window": 32, "query_pre_attn_scalar": 16}}
    assert ModelConfig.from_hf(gemma).checkpoint_dtype == "bfloat16"


def test_gguf_declares_bfloat16(tmp_path):
    gguf = pytest.importorskip("gguf")
    from qkv.loading.gguf import gguf_config

    del gguf
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.attention.head_count": 4, "llama.feed_forward_length": 128, "llama.context_length": 256,
            "llama.vocab_size": 256}
    assert gguf_config(meta, set(), "m.gguf").checkpoint_dtype == "bfloat16"


def test_cli_default_is_auto_and_startup_says_what_it_picked(capsys, tiny_model, smollm2):
    from pathlib import Path

    from qkv.tools.convert import save_tokenizer

    path, _ = tiny_model("llama", vocab_size=smollm2.config.vocab_size)
    save_tokenizer(smollm2.tokenizer, Path(path), 512)
    cfg = Path(path) / "config.json"  # a bf16 checkpoint (as SmolLM2's): bf16 weights on the CPU
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "dtype": "bfloat16"}))
    argv = ["generate", "hi", "--raw", "--model", path, "--device", "cpu", "--max-tokens", "2", "--verbose"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert "[qkv] dtype bfloat16 (auto: bfloat16 weights on the CPU, the file's precision)" in err
    # The other start-up lines of issue 20: how long start-up took, and the first request.
    assert any(line.startswith("[qkv] engine ready in ") for line in err)
    assert any(line.startswith("[qkv] first request: first token ") and "(2 tokens)" in line for line in err)
    assert main(argv + ["--quantization", "none"]) == 0  # float weights: the CPU's float32
    assert "[qkv] dtype float32 (auto: float32 on the CPU)" in capsys.readouterr().err.splitlines()
    assert main(argv + ["--dtype", "bf16"]) == 0
    assert "[qkv] dtype bfloat16 (as given)" in capsys.readouterr().err.splitlines()


def test_cli_refuses_a_bad_dtype_by_flag(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--model", str(tmp_path / "m.gguf"), "--dtype", "float8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--dtype" in err and "unsupported dtype 'float8'" in err
