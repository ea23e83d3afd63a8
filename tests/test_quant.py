"""Weight-only int8 (qkv/model/quant.py): exact arithmetic of the layer, bounded rounding,
and an engine that still tracks the fp32 model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv import LLM, SamplingParams
from qkv.model.quant import Int8Linear, quantize


def test_int8_linear_is_the_dequantized_matmul():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    w = q.weight_int8.float() * q.scale.float()[:, None]
    # Rounding to the nearest of 255 levels per output channel: at most half a step off.
    assert ((w - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 64)
    # A float32 x goes through the int8 kernel in bf16 (its float32 path is ~16x slower): the
    # product of x rounded to bf16, itself rounded to bf16 (scales too: half a bf16 step each).
    ref = x.bfloat16().float() @ w.t()
    assert q.scale_bf16.dtype == torch.bfloat16
    assert ((q(x) - lin.bias - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()
    assert not torch.allclose(q(x), x @ w.t() + lin.bias, atol=1e-5)  # x really is rounded
    xb = x.bfloat16()  # bf16 x: the kernel as is, bf16 result
    assert torch.allclose(q(xb).float(), (xb.float() @ w.t() + lin.bias), rtol=2 ** -6, atol=1e-2)
    assert q(x[None]).shape == (1, 5, 48)


def test_quantized_engine_tracks_fp32(tiny_model):
    path, _ = tiny_model("llama")
    ref = LLM(path, device="cpu", block_size=4, num_kv_blocks=64)
    q8 = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, quantization="int8")
    assert not any(isinstance(m, nn.Linear) for m in q8.engine.model.modules())
    ids = torch.randint(2, 256, (32,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = ref.logits(ids), q8.logits(ids)
    assert not torch.equal(a, b)  # the weights really are rounded
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.9
    out = q8.generate([ids], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and q8.stats()["num_blocks_in_use"] == 0


def test_bad_quantization_requests():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(model, "int3", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU"):
        quantize(model, "int8", torch.device("cuda"))
