"""The int8 lm_head through oneDNN's int8 GEMM (qkv/model/int8_onednn.py): against the float32
product by the same int8 weight, for one row (a decode step), a batched decode step's rows and a
prefill's, with an outlier channel (as real hidden states have) setting each row's scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.model import int8_onednn, native
from qkv.model.quant import Int8Linear

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_onednn.available(), reason="this torch has no oneDNN int8 linear")]


@pytest.fixture(autouse=True)
def no_c_kernel(monkeypatch):
    """oneDNN alone: the lm_head's few-row C kernel (model/int8_gemv.py) off."""
    monkeypatch.setenv("QKV_NATIVE", "0")
    monkeypatch.setattr(native, "_functions", {})


@pytest.mark.parametrize("m", [1, 16, 300])
def test_onednn_lm_head_matches_the_int8_weights_product(m):
    torch.manual_seed(m)
    q = Int8Linear(nn.Linear(576, 1000, bias=False), onednn=True)
    w = q.weight_int8.float() * q.scale.float()[:, None]
    x = (torch.randn(m, 576) * torch.rand(576) * 3).bfloat16()
    x[:, 7] = 40
    truth = x.float() @ w.t()
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (m, 1000)
    # Two int8 planes carry ~15 bits of each row (the bf16 kernel's output rounds to 8).
    assert ((y - truth).abs().max() / truth.abs().max()).item() < 5e-4
    assert q.weight_int8.is_meta  # packed for oneDNN: the plain copy is gone
    assert torch.equal(q(x), y)  # the packed weight is reused
