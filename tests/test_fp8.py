"""quantization="fp8" (qkv/model/fp8.py) on the CPU: the rounding against an independent
nearest-value search over the 256 e4m3 codes, the emulated product, the one-kernel row
rounding (Triton interpreter) against the torch ops, the swap of the layers, and refusals."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from qkv.model import fp8


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value, float64, sorted (NaN codes dropped)."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return v[~v.isnan()].unique()


def nearest(v: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The grid value nearest each element of v (float64), by brute force."""
    d = (v.double().reshape(-1, 1) - grid.reshape(1, -1)).abs()
    return grid[d.argmin(1)].reshape(v.shape)


def test_round_rows_is_nearest_e4m3_of_scaled_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * torch.tensor([1e-3, 0.1, 1, 10, 300, 1e4])[:, None]
    x[2, 5] = 0.0
    q, s = fp8.round_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1) and s.dtype == torch.float32
    amax = x.abs().amax(1, keepdim=True)
    assert torch.allclose(s, amax / 448, rtol=1e-7)
    # the largest magnitude of each row lands on +-448 exactly
    assert torch.equal(q.float().abs().amax(1), torch.full((6,), 448.0))
    want = nearest(x.double() / s.double(), e4m3_grid())
    assert torch.equal(q.double(), want)
    # a zero row stays zero (its scale is tiny, not 0: no division by zero)
    q0, s0 = fp8.round_rows(torch.zeros(2, 16))
    assert torch.equal(q0.float(), torch.zeros(2, 16)) and (s0 > 0).all()


def test_rounding_error_is_half_an_e4m3_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g, dtype=torch.float64).float()
    q, s = fp8.quantize_weight(w)
    deq = fp8.dequantize(q, s)
    scaled = (w / s[:, None]).abs()
    # 3 mantissa bits: half a step is at most 1/16 of a normal value; subnormals (< 2^-6) step 2^-9
    bound = torch.maximum(scaled / 16, torch.full_like(scaled, 2.0 ** -10)) * s[:, None]
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()
    assert not torch.equal(deq, w)


def test_weight_rounded_in_blocks_equals_whole(monkeypatch):
    w = torch.randn(37, 48, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    whole_q, whole_s = fp8.round_rows(w)
    monkeypatch.setattr(fp8, "ROW_BLOCK", 8)
    q, s = fp8.quantize_weight(w)
    assert torch.equal(q.view(torch.uint8), whole_q.view(torch.uint8)) and torch.equal(s, whole_s[:, 0])


def test_emulated_mm_is_the_product_of_rounded_operands():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 64, generator=g), torch.randn(48, 64, generator=g)
    q, s = fp8.quantize_weight(w)
    xq, xs = fp8.round_rows(x)
    want = (xq.double() * xs.double()) @ (q.double() * s.double()[:, None]).t()
    got = fp8.emulated_mm(x, q, s)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    exact = x.double() @ w.double().t()
    err = ((got.double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < err < 0.06  # rounded (not the float product), by about e4m3's precision


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_fp8_linear_swaps_every_linear_but_lm_head(tiny_model, family):
    from qkv import LLM

    path, _ = tiny_model(family)
    ref = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, dtype="bfloat16", quantization="none")
    q = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, quantization="fp8")
    names = {n for n, m in q.engine.model.named_modules() if isinstance(m, fp8.Fp8Linear)}
    linears = {n for n, m in q.engine.model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {"lm_head"} and len(names) == 2 * 4  # qkv, o, gate_up (c_fc), down (c_proj) per layer
    ids = torch.randint(2, 256, (32,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = ref.logits(ids), q.logits(ids)
    assert not torch.equal(a, b)
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.1
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8


def test_fp8_refused_for_mla_moe_and_encoder_decoder():
    from qkv.engine.engine import LLMEngine
    from qkv.tools.shapes import shape_config

    cfg = shape_config("deepseek-v2-lite")
    with pytest.raises(ValueError, match="does not support deepseek_v2.*MLA"):
        LLMEngine(cfg, None, None, device="cpu", quantization="fp8")


def test_cpu_quantizations_still_refused_on_a_gpu():
    with pytest.raises(ValueError, match="CPU decode path"):
        from qkv.model.quant import check

        check("int8", torch.device("cuda"))
    check("fp8", torch.device("cuda"))  # fp8 is the GPU's


# Other test modules set TRITON_INTERPRET=1 on a CPU machine at import, so the variable alone
# does not say the kernels can run: Triton itself may be absent (CI installs no Triton).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                                 reason="the kernel under TRITON_INTERPRET=1, with Triton installed")

# The interpreter's float -> e4m3 cast does not round as the hardware's cvt.rn.satfinite does
# (124.0 -> 64.0: the mantissa's carry is lost), so here each row is e4m3 values times a power of
# two with 448 in it: the scale and the division are exact, and the cast has nothing to round.
# The rounding itself is checked on the GPU (tests/test_fp8_cuda.py: the kernel's codes equal
# torch's for random rows).
@interpreted
@pytest.mark.parametrize("shape", [(3, 64), (5, 2048 + 96), (1, 4096), (2, 8192 + 64)])
def test_row_kernel_equals_torch_ops(shape):
    from qkv.attention.triton.fp8_rows import quantize_rows

    g = torch.Generator().manual_seed(4)
    grid = e4m3_grid().float()
    codes = grid[torch.randint(0, len(grid), shape, generator=g)]
    codes[:, 0] = 448.0
    x = (codes * 2.0 ** torch.randint(-8, 8, (shape[0], 1), generator=g).float()).to(torch.bfloat16)
    x[0, 1] = 0.0
    q, s = quantize_rows(x)
    wq, ws = fp8.round_rows(x)
    assert torch.equal(s, ws)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8))


@interpreted
@pytest.mark.parametrize("k,silu", [(64, False), (96, True), (1024 + 64, False)])
def test_fp8_gemv_is_the_row_times_the_dequantized_weight(k, silu):
    from qkv.attention.triton.fp8_gemv import fp8_gemv

    g = torch.Generator().manual_seed(6)
    q, s = fp8.quantize_weight(torch.randn(72, k, generator=g))
    x = torch.randn(1, 2 * k if silu else k, generator=g).to(torch.bfloat16)
    y = fp8_gemv(x, q, s.reshape(1, -1), silu=silu)
    row = fp8.silu_mul(x) if silu else x  # batch 1: the row is not rounded to e4m3
    want = row.double() @ fp8.dequantize(q, s).double().t()
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@interpreted
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_rows_is_the_norm_then_the_row_rounding(with_residual):
    """The fused norm + rounding equals the fused norm kernel followed by the rounding kernel
    (both through the interpreter's cast: see above), and its residual the norm kernel's."""
    from qkv.attention.triton import fused
    from qkv.attention.triton.fp8_rows import norm_rows, quantize_rows

    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    r = torch.randn(5, 96, generator=g).to(torch.bfloat16) if with_residual else None
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(torch.bfloat16)
    q, s, ro = norm_rows(x, r, w, 1e-5)
    h, want_ro = fused.add_rms_norm(x, r, w, 1e-5) if with_residual else (fused.rms_norm(x, w, 1e-5), x)
    wq, ws = quantize_rows(h)
    assert torch.equal(ro, want_ro) and torch.equal(s, ws)
    assert torch.equal(q.view(torch.uint8), wq.view(torch.uint8))


def test_bench_random_weights_take_the_quantization(monkeypatch):
    """``qkv bench ... --random-weights SHAPE --quantization fp8`` builds the shape with fp8 weights."""
    import argparse

    from qkv.tools import bench, bench_gpu, shapes

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    seen = {}
    monkeypatch.setattr(shapes, "random_llm", lambda name, **kw: seen.update(kw, name=name))
    for flag, want in (("fp8", "fp8"), ("auto", None), ("none", None)):
        args = p.parse_args(["throughput", "--random-weights", "llama3-8b", "--quantization", flag])
        bench_gpu.random_llm(args)
        assert seen["name"] == "llama3-8b" and seen["quantization"] == want
