"""model/csrc/int4_rows.c (model/int4_rows.py): a few rows times an int4 weight. Held to a
float64 product by the weight dequantized from the codes (the bf16 rounding of the exact
result, within float32 summation error), to ATen's ``_weight_int4pack_mm_for_cpu`` (one bf16
step at most), inside ``Int4Linear``, and an int4 engine's batched greedy tokens with and
without it; with ``QKV_NATIVE=0`` or no compiler the layer runs ATen's kernel."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from qkv import LLM, SamplingParams
from qkv.model import int4, int4_rows, native
from qkv.model.int4 import GROUP, Int4Linear

needs_kernel = pytest.mark.skipif(shutil.which("cc") is None or not int4_rows._has_bf16_dot(),
                                  reason="no C compiler or no AVX-512 BF16")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and no kernel loaded yet in this process."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_functions", {})
    return tmp_path


def random_layer(n: int, k: int, seed: int):
    """Random codes, scales and zeros in ATen's packing, and the weight they stand for (float64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(k // GROUP, n, generator=g) * 0.02 + 1e-3).bfloat16()
    zero = (torch.randn(k // GROUP, n, generator=g) * 0.05).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale, zero], dim=-1).contiguous()
    s, z = (t.double().t().repeat_interleave(GROUP, dim=1) for t in (scale, zero))
    return packed, sz, (q.double() - 8) * s + z


@needs_kernel
@pytest.mark.parametrize("m", [2, 5, 6, 7, 16, 33, 64, 255])
@pytest.mark.parametrize("n,k", [(64, 32), (960, 576), (576, 1536)])
def test_rows_product_is_the_exact_product_rounded(fresh, m, n, k):
    packed, sz, w = random_layer(n, k, m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
    got = int4_rows.product(x, packed, sz)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    exact = x.double() @ w.t()
    # float32 sums of 32-term groups (terms up to |x| * 143 * scale) and of the group totals
    slack = 1e-5 * (x.double().abs() @ w.abs().t() + 1)
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)  # bf16's step at the value
    assert ((got.double() - exact).abs() <= ulp / 2 * 1.0001 + slack).all()
    assert (got == exact.bfloat16()).float().mean() > 0.99  # the exact product's own rounding, nearly always
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)
    assert ((got.double() - aten.double()).abs() <= ulp + slack).all()


@needs_kernel
def test_strided_rows_and_the_layer(fresh):
    """Rows with a stride (a view of a wider tensor) and the layer's dispatch: MIN_ROWS to
    DENSE_ROWS - 1 rows take the kernel, with the bias added after, as ATen's path does."""
    torch.manual_seed(3)
    lin = Int4Linear(nn.Linear(96, 128, bias=True))
    wide = torch.randn(9, 200).bfloat16()
    x = wide[:, 10:106]
    assert x.stride(0) == 200
    got = int4_rows.product(x, lin.weight_int4, lin.scales_zeros)
    assert torch.equal(got, int4_rows.product(x.contiguous(), lin.weight_int4, lin.scales_zeros))
    assert torch.equal(lin(x), got + lin.bias)
    assert int4_rows.product(x[:1], lin.weight_int4, lin.scales_zeros) is None  # one row: ATen's
    assert int4_rows.product(x.float(), lin.weight_int4, lin.scales_zeros) is None


def test_disabled_runs_aten(fresh, monkeypatch):
    monkeypatch.setenv("QKV_NATIVE", "0")
    lin = Int4Linear(nn.Linear(64, 64, bias=False))
    x = torch.randn(4, 64).bfloat16()
    assert int4_rows.product(x, lin.weight_int4, lin.scales_zeros) is None
    assert torch.equal(lin(x), torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.weight_int4, GROUP, lin.scales_zeros))
    assert not (fresh / "native").exists()


@needs_kernel
@torch.no_grad()
def test_int4_engine_greedy_tokens_same_with_and_without(tiny_model, monkeypatch, fresh):
    """An int4 engine's batched greedy decode (2-4 rows a step: the kernel's range) gives the
    same tokens with the kernel as with ATen's (the C unpack and attention kernels on in both)."""
    path, _ = tiny_model("llama")
    prompts = [[1, 5, 9, 2], [3, 3, 7], [8, 1, 4, 4, 6, 2, 9], [2]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(native, "_functions", {} if on else {"int4_rows:qkv_int4_rows": None})
        llm = LLM(path, device="cpu", quantization="int4", aot_decode=False)
        assert any(isinstance(mod, Int4Linear) for mod in llm.engine.runner.model.modules())
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
        assert (int4_rows._kernel() is not None) == on
    assert outs[0] == outs[1]
    assert int4.DENSE_ROWS > 4


def test_no_avx512_bf16_no_build(fresh, monkeypatch):
    """A CPU without vdpbf16ps: nothing is compiled (it would fail in every process), ATen runs."""
    monkeypatch.setattr(int4_rows, "_bf16_dot", [False])
    lin = Int4Linear(nn.Linear(64, 64, bias=False))
    x = torch.randn(4, 64).bfloat16()
    assert int4_rows.product(x, lin.weight_int4, lin.scales_zeros) is None
    assert torch.equal(lin(x), torch.ops.aten._weight_int4pack_mm_for_cpu(x, lin.weight_int4, GROUP, lin.scales_zeros))
    assert not (fresh / "native").exists()


@needs_kernel
def test_the_operator_is_the_kernel_and_only_traced_inside_as_op(fresh):
    """``qkv::int4_rows`` (the compiled batched step's int4 products) gives ``product``'s
    output bit for bit; ``Int4Linear`` puts it in a traced graph only inside ``as_op()`` (the
    batched export), ATen's op otherwise (the one-sequence package, ``--compile``)."""
    packed, sz, _ = random_layer(192, 96, 3)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert torch.equal(int4_rows.op()(x, packed, sz), int4_rows.product(x, packed, sz))
    layer = Int4Linear(parts=(packed, sz))

    def ops(ctx):
        with ctx, torch.no_grad():
            gm = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=2, max=255)},),
                                     strict=False).graph_module
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    import contextlib

    assert "qkv.int4_rows.default" in ops(int4_rows.as_op())
    assert not any("qkv" in t for t in ops(contextlib.nullcontext()))
    assert not int4_rows.traced()  # the switch is off again after the export
