"""Shared fixtures: tiny random-weight HF models saved with ``save_pretrained``, and the real
SmolLM2 loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512)


def tiny_config(family: str, **overrides):
    """A transformers config of ``family`` small enough to run in milliseconds."""
    import transformers as tf

    if family == "gpt2":
        kw = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=1)
        kw.update(overrides)
        return tf.GPT2Config(**kw), tf.GPT2LMHeadModel
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_key_value_heads=2)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=None)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_key_value_heads=1)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=32)),
    }
    cfg_cls, model_cls, extra = classes[family]
    kw = {**TINY, "bos_token_id": 0, "eos_token_id": 1, **extra, **overrides}
    return cfg_cls(**kw), model_cls


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds spin-wait, and on a shared, loaded
    machine it makes each step ~10x slower. Use with ``pytestmark = pytest.mark.usefixtures``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: ``tiny_model("llama", num_key_value_heads=1) -> (dir, hf_model)``."""

    def make(family: str, seed: int = 0, **overrides):
        cfg, cls = tiny_config(family, **overrides)
        torch.manual_seed(seed)
        model = cls(cfg).eval()
        path = tmp_path / f"{family}-{seed}"
        model.save_pretrained(path)
        return str(path), model

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct engine (fp32, CPU: the oracle, so not the int4 default), shared
    by the whole session."""
    from qkv import LLM

    return LLM("smollm2", device="cpu", quantization="none")
