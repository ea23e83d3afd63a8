"""Bad input gets a clear error naming the file or field, never a raw TypeError/IndexError:
malformed GGUF tokenizer metadata, unknown pre-tokenizers, corrupt headers (fuzzed)."""

from __future__ import annotations

import numpy as np
import re

import pytest

from qkv.loading import LoadError, load

gguf = pytest.importorskip("gguf")

TOKENS = ["<s>", "</s>", "a", "b", "ab", "zq\u00e9"]


def write_gguf(path, *, tokens=TOKENS, merges=("a b",), pre="gpt-2", model="gpt2", extra=None):
    """A one-layer llama GGUF with a tiny byte-level BPE vocabulary; ``extra`` overrides
    metadata: {key: (kind, value)} with kind one of GGUFWriter's ``add_*`` suffixes."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, v in [("block_count", 1), ("context_length", 32), ("embedding_length", 8),
                   ("feed_forward_length", 16), ("attention.head_count", 2)]:
        w.add_uint32(f"llama.{key}", v)
    meta = {"tokenizer.ggml.model": ("string", model), "tokenizer.ggml.tokens": ("array", list(tokens)),
            "tokenizer.ggml.merges": ("array", list(merges)), "tokenizer.ggml.bos_token_id": ("uint32", 0),
            "tokenizer.ggml.eos_token_id": ("uint32", 1)}
    if pre is not None:
        meta["tokenizer.ggml.pre"] = ("string", pre)
    meta.update(extra or {})
    for key, (kind, v) in meta.items():
        if v is not None:
            getattr(w, f"add_{kind}")(key, v)
    w.add_tensor("token_embd.weight", np.zeros((len(TOKENS), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_gguf_loads(tmp_path):
    m = load(write_gguf(tmp_path / "ok.gguf"))
    assert m.tokenizer.encode("ab", add_special_tokens=False) == [4]


@pytest.mark.parametrize("extra,match", [
    ({"tokenizer.ggml.tokens": ("array", [1, 2, 3])}, "tokenizer.ggml.tokens must hold strings"),
    ({"tokenizer.ggml.merges": ("array", ["ab"])}, "tokenizer.ggml.merges holds 'ab'"),
    ({"tokenizer.ggml.merges": ("array", [1, 2])}, "tokenizer.ggml.merges must be an array of strings"),
    ({"tokenizer.ggml.merges": ("array", ["a c"])}, "malformed GGUF tokenizer metadata"),  # c: no such token
    ({"tokenizer.ggml.token_type": ("array", [1, 1])}, "token_type must be an array of 6"),
    ({"tokenizer.ggml.eos_token_id": ("uint32", 99)}, "eos_token_id is 99"),
    ({"tokenizer.ggml.model": ("string", "wordpiece")}, "unsupported GGUF tokenizer model 'wordpiece'"),
])
def test_malformed_tokenizer_metadata_is_a_load_error(tmp_path, extra, match):
    f = write_gguf(tmp_path / "bad.gguf", extra=extra)
    with pytest.raises(LoadError, match=f"bad.gguf: .*{match}"):
        load(f)


def test_empty_vocabulary():
    from qkv.loading.gguf import gguf_tokenizer

    with pytest.raises(LoadError, match="x.gguf: .*tokenizer.ggml.tokens must be a non-empty array"):
        gguf_tokenizer({"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": []},
                       "x.gguf")


@pytest.mark.parametrize("old,new,match", [
    (b"zq\xc3\xa9", b"zq\xc3\x28", "not valid UTF-8"),  # a flipped byte breaks the UTF-8
    (b"\x02\x00\x00\x00\x00\x00\x00\x00ab", b"\x02\x00\x00\x00\x00\x00\x00\x00ac", "malformed GGUF tokenizer"),
])
def test_flipped_byte_in_a_token(tmp_path, old, new, match):
    f = write_gguf(tmp_path / "flip.gguf")
    data = f.read_bytes()
    assert data.count(old) == 1
    f.write_bytes(data.replace(old, new))
    with pytest.raises(LoadError, match=f"flip.gguf: .*{match}"):
        load(f)


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(LoadError, match="tokenizer.ggml.pre='tekken'.*supported: default, gpt-2.*llama3"):
        load(write_gguf(tmp_path / "tekken.gguf", pre="tekken"))
    assert load(write_gguf(tmp_path / "none.gguf", pre=None)).tokenizer is not None  # no value: GPT-2's split
    assert load(write_gguf(tmp_path / "l3.gguf", pre="llama-bpe")).tokenizer is not None


@pytest.mark.parametrize("key,kind,value,match", [
    ("llama.block_count", "string", "2", "llama.block_count must be a positive integer, got '2'"),
    ("llama.attention.head_count", "uint32", 0, "head_count must be a positive integer, got 0"),
    ("llama.attention.head_count", "array", [2, 2], "head_count must be a positive integer"),
    ("llama.attention.head_count", "uint32", 3, "embedding_length 8 is not a multiple of"),
    ("llama.rope.freq_base", "string", "x", "llama.rope.freq_base must be a positive number"),
    ("llama.rope.scaling.type", "uint32", 1, "llama.rope.scaling.type must be a string"),
    ("general.alignment", "uint32", 0, "general.alignment must be a positive integer"),
])
def test_model_metadata_of_the_wrong_type_is_a_load_error(tmp_path, key, kind, value, match):
    f = write_gguf(tmp_path / "meta.gguf", extra={key: (kind, value)})
    with pytest.raises(LoadError, match=f"meta.gguf: .*{match}"):
        load(f)


# ------------------------------------------------------------------ corrupt headers (fuzzed)
def _mutate(data: bytes, limit: int, seed: int) -> bytes:
    """One to three random byte changes (a new value or a flipped bit) in ``data[:limit]``."""
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(0, limit)
        b[i] = rng.integers(0, 256) if rng.random() < 0.7 else b[i] ^ (1 << rng.integers(0, 8))
    return bytes(b)


SEEDS = [*range(40), 238, 262]  # 238, 262: a 0-dim tensor and an absurd dimension, found by this fuzz


def test_fuzzed_gguf_header_is_loaded_or_a_load_error(tmp_path):
    data = write_gguf(tmp_path / "base.gguf").read_bytes()
    header = len(data) - len(TOKENS) * 8 * 4  # all but the one F32 tensor's data
    for seed in SEEDS:
        f = tmp_path / f"fuzz{seed}.gguf"
        f.write_bytes(_mutate(data, header, seed))
        try:
            load(f)
        except LoadError as e:
            assert f"fuzz{seed}.gguf" in str(e)


def test_fuzzed_safetensors_header_is_read_or_a_load_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    from qkv.loading.hf import read_safetensors

    f = tmp_path / "base.safetensors"
    save_file({"a": torch.randn(4, 3), "b": torch.ones(5)}, str(f))
    data = f.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cases = [_mutate(data, header, seed) for seed in SEEDS]
    cases.append((1 << 60).to_bytes(8, "little") + data[8:])  # a header claiming an exabyte
    cases.append(data.replace(b'"data_offsets":[0,48]', b'"data_offsets":[0,9999999999999]'))
    assert cases[-1] != data
    for i, case in enumerate(cases):
        g = tmp_path / f"fuzz{i}.safetensors"
        g.write_bytes(case)
        try:
            read_safetensors(g)
        except LoadError as e:
            assert f"fuzz{i}.safetensors" in str(e)


@pytest.mark.parametrize("text", ["{", "[]", '{"model": {"type": "BPE", "vocab": 5}}', '{"version": "1.0"}'])
def test_malformed_tokenizer_json_is_a_load_error(tmp_path, text):
    from qkv.loading.hf import hf_tokenizer

    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(LoadError, match="tokenizer.json: unreadable tokenizer"):
        hf_tokenizer(tmp_path, [])


@pytest.mark.parametrize("field,value,words", [
    ("num_hidden_layers", "2", "num_layers must be an integer, got '2'"),
    ("num_attention_heads", 0, "num_attention_heads=0 is out of range"),
    ("rope_theta", "x", "rope_theta must be a number, got 'x'"),
    ("rope_scaling", "x", "rope_scaling must be an object, got 'x'")])
def test_hf_config_field_of_the_wrong_type_is_a_load_error(tmp_path, field, value, words):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 8, field: value}))
    with pytest.raises(LoadError, match=re.escape(f"config.json: {words}")):
        load(tmp_path)
