"""The converted int4/int8 weights of a GGUF, cached (qkv/model/weight_cache.py): a later load
maps them and gets the same tensors bit for bit and the same tokens; a damaged, foreign or
stale file is refused in one line and the weights converted again; nothing is cached with
the cache off or for non-GGUF sources."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.model import materialize, weight_cache

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

V, H, F, LAYERS, HEADS, KV = 96, 64, 128, 2, 4, 2


def write_llama_gguf(path) -> str:
    """A tiny llama GGUF as llama.cpp writes SmolLM2's: Q4_1 layers, a Q8_0 tied embedding,
    float32 norms (Q and K rows left as they are: their order does not matter here)."""
    rng = np.random.default_rng(0)
    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in [("block_count", LAYERS), ("context_length", 64), ("embedding_length", H),
                   ("feed_forward_length", F), ("attention.head_count", HEADS), ("attention.head_count_kv", KV), ("vocab_size", V)]:
        w.add_uint32(f"llama.{key}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)

    def add(name, shape, qtype=None):
        x = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", (V, H), q8_0)
    add("output_norm.weight", (H,))
    hd = H // HEADS
    for i in range(LAYERS):
        for name, shape in [("attn_q", (H, H)), ("attn_k", (KV * hd, H)), ("attn_v", (KV * hd, H)),
                            ("attn_output", (H, H)), ("ffn_gate", (F, H)), ("ffn_up", (F, H)), ("ffn_down", (H, F))]:
            add(f"blk.{i}.{name}.weight", shape, q4_1)
        add(f"blk.{i}.attn_norm.weight", (H,))
        add(f"blk.{i}.ffn_norm.weight", (H,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QKV_WEIGHT_CACHE", raising=False)
    return write_llama_gguf(tmp_path / "tiny.gguf")


def cached_files(tmp_path) -> list:
    return sorted((tmp_path / "cache" / "weights").glob("*.safetensors"))


def engine(path, quantization="int4") -> LLM:
    return LLM(path, device="cpu", quantization=quantization, block_size=4, num_kv_blocks=32, aot_decode=False,
               log_stats=False)


def greedy(llm) -> list[int]:
    out = llm.generate([[3, 17, 40, 5, 9]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    return out[0].token_ids


def assert_same_weights(a: LLM, b: LLM) -> None:
    ta, tb = weight_cache.tensors_of(a.engine.model), weight_cache.tensors_of(b.engine.model)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert [type(m) for m in a.engine.model.modules()] == [type(m) for m in b.engine.model.modules()]
    sa, sb = a.engine.model.state_dict(), b.engine.model.state_dict()  # buffers (RoPE tables) too
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def no_conversion(monkeypatch):
    """Make converting from the GGUF fail: a load that passes read the cache."""

    def refuse(*a, **k):
        raise AssertionError("converted from the GGUF instead of reading the cache")

    monkeypatch.setattr(materialize, "materialize", refuse)


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_second_load_maps_the_same_weights(model_file, tmp_path, monkeypatch, quantization):
    first = engine(model_file, quantization)
    (f,) = cached_files(tmp_path)
    with monkeypatch.context() as m:
        no_conversion(m)
        second = engine(model_file, quantization)
    assert_same_weights(first, second)
    # The file is ordinary safetensors, every tensor 64-byte aligned. Checked before running the
    # model: a first call packs the int8 lm_head for oneDNN and leaves its plain weight on meta.
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as st:
        names = [n for n in st.keys() if not n.startswith("__pad__.")]
        ours = weight_cache.tensors_of(second.engine.model)
        assert sorted(names) == sorted(ours)
        for n in names:
            assert torch.equal(st.get_tensor(n), ours[n]), n
    assert all(t.data_ptr() % weight_cache.ALIGN == 0 for t in ours.values())
    assert greedy(first) == greedy(second)


def damage_truncate(f):
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)


def damage_header(f):
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"{garbage")


def damage_key(f):
    data = bytearray(f.read_bytes())
    i = data.index(b'"qkv_key":"') + len(b'"qkv_key":"')
    data[i] = ord("0") if data[i] != ord("0") else ord("1")
    f.write_bytes(bytes(data))


def damage_dtype(f):
    """A well-formed file whose tensor has another dtype (what other settings would hold)."""
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = data[8 : 8 + n].replace(b'"model.norm.weight":{"dtype":"BF16"', b'"model.norm.weight":{"dtype":"F16"')
    assert len(head) == n - 1
    f.write_bytes(data[:8] + head + b" " + data[8 + n :])  # the same length: a space more


@pytest.mark.parametrize("damage,why", [(damage_truncate, "truncated"), (damage_header, "header is not JSON"),
                                        (damage_key, "another key"), (damage_dtype, "'model.norm.weight' is torch.float16")])
def test_a_damaged_file_is_refused_and_rebuilt(model_file, tmp_path, capfd, damage, why):
    first = engine(model_file)
    (f,) = cached_files(tmp_path)
    good = f.read_bytes()
    damage(f)
    capfd.readouterr()
    second = engine(model_file)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"weight cache {f} not used" in err[0] and why in err[0], err
    assert_same_weights(first, second)
    assert greedy(first) == greedy(second)
    assert f.read_bytes() == good  # converted again and rewritten whole


def test_a_touched_model_file_gets_another_key_and_the_old_file_goes(model_file, tmp_path):
    engine(model_file)
    (old,) = cached_files(tmp_path)
    st = os.stat(model_file)
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    engine(model_file)
    (new,) = cached_files(tmp_path)
    assert new != old
    engine(model_file, "int8")  # other settings: a file of their own, beside it
    assert len(cached_files(tmp_path)) == 2


def test_off_and_unwritable(model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_WEIGHT_CACHE", "0")
    engine(model_file)
    assert cached_files(tmp_path) == []
    monkeypatch.delenv("QKV_WEIGHT_CACHE")
    (tmp_path / "cache").write_text("a file where the directory would go")
    first = engine(model_file)  # the cache cannot be written: loads all the same
    assert greedy(first)
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache2"))
    engine(model_file, quantization="none")  # float weights: not cached
    assert not (tmp_path / "cache2" / "weights").exists()
