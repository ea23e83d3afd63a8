"""The CPU layers' many-row paths: int4 (model/int4.py's ``unpack`` + a bf16 GEMM, from
DENSE_ROWS rows) and int8 (model/quant.py's ``int8_rows_mm``, from INT_MM_ROWS rows). The
unpacked weight is the one the int4 kernel multiplies by; each product agrees with its
kernel to the bf16 rounding of the output; an engine's greedy tokens are the same whether
prompts run together (many rows: these paths) or one at a time (few rows: the kernels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv import LLM, SamplingParams
from qkv.model import int4, int4_rows, int8_gemv, int8_onednn, quant
from qkv.model.int4 import GROUP, Int4Linear, unpack
from qkv.model.quant import Int8Linear, int8_rows_mm

pytestmark = pytest.mark.usefixtures("one_thread")


def kernel_weight(q: Int4Linear) -> torch.Tensor:
    """[K, N]: the weight the int4 kernel multiplies by, read through the kernel (identity rows)."""
    eye = torch.eye(q.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, q.weight_int4, GROUP, q.scales_zeros)


@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (960, 576)])
def test_unpack_is_the_kernels_weight(n, k):
    torch.manual_seed(n)
    q = Int4Linear(nn.Linear(k, n, bias=False))
    assert torch.equal(unpack(q.weight_int4, q.scales_zeros), kernel_weight(q))


def test_unpack_refuses_a_layout_it_does_not_read():
    q = Int4Linear(nn.Linear(64, 96, bias=False))  # 96 rows: not whole 64-row tiles
    assert unpack(q.weight_int4, q.scales_zeros) is None
    x = torch.randn(int4.DENSE_ROWS, 64)
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), q.weight_int4, GROUP, q.scales_zeros)
    assert torch.equal(q(x), ref.float())  # the kernel, as below DENSE_ROWS


@torch.no_grad()
def test_many_rows_match_the_kernel():
    """Both paths against the float32 product by the kernel's weight: each is off by its bf16
    output rounding (and the bf16 bias add), measured 0.63% of the largest output for both."""
    torch.manual_seed(0)
    q = Int4Linear(nn.Linear(576, 960, bias=True))
    x = torch.randn(int4.DENSE_ROWS + 3, 576, dtype=torch.bfloat16)
    truth = x.float() @ kernel_weight(q).float() + q.bias.float()
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.weight_int4, GROUP, q.scales_zeros) + q.bias
    y = q(x)
    assert not torch.equal(y, ref)  # the other path ran
    for out in (ref, y):
        assert ((out.float() - truth).abs().max() / truth.abs().max()).item() < 1e-2
    few = q(x[:5])
    if int4_rows._kernel() is None:
        assert torch.equal(few, ref[:5])  # few rows: ATen's kernel itself
    else:  # model/int4_rows.py's, equal to ATen's up to float32 summation order: one bf16 step
        mine = int4_rows.product(x[:5], q.weight_int4, q.scales_zeros)
        aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x[:5], q.weight_int4, GROUP, q.scales_zeros)
        assert torch.equal(few, mine + q.bias)
        assert ((mine.float() - aten.float()).abs() <= aten.float().abs() / 128 + 1e-6).all()


@torch.no_grad()
@pytest.mark.parametrize("m", [8, 33, quant.DENSE_ROWS])
def test_int8_rows_mm_matches_the_int8_kernel(m):
    """Against the float32 product by the int8 weight: the two int8 planes are off by 1.4e-4 of
    the largest output (measured), the int8 kernel's bf16 output by its rounding (2e-3); an
    outlier channel (as real hidden states have) sets each row's scale. The layer (planes from
    INT_MM_ROWS rows, the bf16 GEMM from DENSE_ROWS) agrees with the kernel to bf16 rounding."""
    torch.manual_seed(m)
    q = Int8Linear(nn.Linear(576, 1000, bias=False))
    x = (torch.randn(m, 576) * torch.rand(576) * 3).bfloat16()
    x[:, 7] = 40
    truth = x.float() @ (q.weight_int8.float() * q.scale[:, None]).t()
    assert ((int8_rows_mm(x, q.weight_int8, q.scale) - truth).abs().max() / truth.abs().max()).item() < 5e-4
    ref = torch.ops.aten._weight_int8pack_mm(x, q.weight_int8, q.scale.bfloat16())
    y = q(x)
    assert not torch.equal(y, ref)
    assert ((y.float() - truth).abs().max() / truth.abs().max()).item() < 1e-2
    assert ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < 1e-2
    few = quant.GEMV_ROWS + 1  # below INT_MM_ROWS, above the C kernel's rows: torch's int8 kernel
    assert torch.equal(q(x[:few]), ref[:few])
    if q.rowsum is not None:  # up to GEMV_ROWS: the C kernel (model/int8_gemv.py), x not rounded to bf16
        scale = q.scale_bf16 if hasattr(q, "scale_bf16") else q.scale  # a float32 model's: as the int8 kernel's
        one = int8_gemv.mm(x[:1], q.weight_int8, scale.float(), q.rowsum).bfloat16()
        assert torch.equal(q(x[:1]), one)
        assert ((one.float() - truth[:1]).abs().max() / truth[:1].abs().max()).item() < 1e-2


def test_greedy_tokens_batched_prefill_equal_one_at_a_time(tiny_model, monkeypatch):
    path, _ = tiny_model("llama")
    prompts = [torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (20, 23, 26, 29)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    def llm():  # a fresh engine each time: a prefix-cache hit would skip the prefill
        return LLM(path, device="cpu", block_size=4, num_kv_blocks=256, quantization="int4")

    monkeypatch.setattr(int8_onednn, "available", lambda: False)  # the lm_head on these paths, not oneDNN's
    monkeypatch.setattr(int4, "DENSE_ROWS", 64)  # each prompt alone stays on the kernel
    monkeypatch.setattr(quant, "INT_MM_ROWS", 2)  # and its one-row lm_head too; 4 rows do not
    monkeypatch.setattr(quant, "GEMV_ROWS", 0)  # no row through the C kernel (model/int8_gemv.py)
    rows_mm = []
    real_rows_mm = quant.int8_rows_mm
    monkeypatch.setattr(quant, "int8_rows_mm", lambda *a: rows_mm.append(1) or real_rows_mm(*a))
    calls = []
    real = int4.unpack
    monkeypatch.setattr(int4, "unpack", lambda *a: calls.append(1) or real(*a))
    alone = [llm().generate([p], params)[0].token_ids for p in prompts]
    assert not calls and not rows_mm
    together = [o.token_ids for o in llm().generate(prompts, params)]
    assert calls and rows_mm  # the batched prefill (98 rows) went through unpack, the lm_head's 4 rows int8_rows_mm
    assert together == alone
