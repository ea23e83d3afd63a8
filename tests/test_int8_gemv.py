"""The int8 few-row C kernel (qkv/model/csrc/int8_gemv.c, model/int8_gemv.py): against torch's
product of the same int8 weight (float64), and closer to it than quant.py's ``int8_rows_mm``
(two int8 planes through ``torch._int_mm``; the kernel takes three), for widths that are and are not multiples of
its 64-byte loads, one to four rows, one and two threads; and ``Int8Linear``'s lm_head taking
it for few rows and oneDNN for more."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from qkv.model import int8_gemv, int8_onednn, native
from qkv.model.quant import GEMV_ROWS, Int8Linear, int8_rows_mm

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and no kernel loaded yet in this process."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_functions", {})
    return tmp_path


def _weights(n, k, seed):
    torch.manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.02 + 1e-3
    x = torch.randn(4, k) * torch.rand(k) * 3
    x[:, k // 3] = 40  # an outlier channel sets each row's plane scale, as in real hidden states
    return q, scale, x


@pytest.mark.parametrize("n,k", [(1000, 576), (256, 640), (64, 100), (8, 37)])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_gemv_matches_the_int8_product(fresh, n, k, m):
    q, scale, x = _weights(n, k, n + k + m)
    x = x[:m]
    y = int8_gemv.mm(x, q, scale, int8_gemv.rowsum(q))
    assert list((fresh / "native").glob("int8_gemv-*.so"))
    assert y.dtype == torch.float32 and y.shape == (m, n)
    truth = x.double() @ (q.double() * scale.double()[:, None]).t()
    err = ((y.double() - truth).abs().max() / truth.abs().max()).item()
    # Three int8 planes carry ~22 bits of each row's range: within float32 summation of the
    # exact product, ~1e-7 here; quant.py's two planes (int8_rows_mm) are off by ~1e-4.
    assert err < 2e-6
    two = int8_rows_mm(x, q, scale).double()
    assert err < ((two - truth).abs().max() / truth.abs().max()).item() / 10


def test_gemv_does_not_depend_on_the_thread_count(fresh):
    q, scale, x = _weights(4096, 640, 1)
    sums, fn = int8_gemv.rowsum(q), int8_gemv.function()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_gemv.mm(x[:1], q, scale, sums, fn)
        torch.set_num_threads(2)
        two = int8_gemv.mm(x[:1], q, scale, sums, fn)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_gemv_refuses_what_it_does_not_take(fresh):
    q, scale, x = _weights(64, 64, 2)
    with pytest.raises(ValueError):
        int8_gemv.mm(torch.randn(int8_gemv.MAX_ROWS + 1, 64), q, scale, int8_gemv.rowsum(q))
    with pytest.raises(ValueError):
        int8_gemv.mm(x[:1, :32], q, scale, int8_gemv.rowsum(q))
    assert not int8_gemv.supports(q[:62]) and not int8_gemv.supports(q.t())


@pytest.mark.skipif(not int8_onednn.available(), reason="this torch has no oneDNN int8 linear")
def test_lm_head_takes_the_kernel_for_few_rows_and_onednn_for_more(fresh):
    torch.manual_seed(3)
    lm = Int8Linear(nn.Linear(576, 1000, bias=False), onednn=True)
    w = lm.weight_int8.float() * lm.scale.float()[:, None]
    for m in (1, GEMV_ROWS, 16, 1):
        x = (torch.randn(m, 576) * 2).bfloat16()
        y = lm(x)
        truth = x.float() @ w.t()
        assert y.dtype == torch.float32 and y.shape == (m, 1000)
        assert ((y - truth).abs().max() / truth.abs().max()).item() < 5e-4
        assert lm.rowsum is not None and not lm.weight_int8.is_meta  # the C kernel keeps reading the plain copy
    assert lm._packed is not None  # 16 rows went through oneDNN


def test_without_the_kernel_the_lm_head_is_onednn_alone(fresh, monkeypatch):
    monkeypatch.setenv("QKV_NATIVE", "0")
    lm = Int8Linear(nn.Linear(64, 128, bias=False), onednn=True)
    lm(torch.randn(1, 64))
    assert lm.rowsum is None
    assert lm.weight_int8.is_meta == int8_onednn.available()
