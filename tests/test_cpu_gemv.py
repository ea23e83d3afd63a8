"""model/cpu_gemv.py: one-row float32 products through numpy's BLAS give torch's results (to
float32 rounding), on the same storage, and anything else stays with torch."""

import numpy as np
import pytest
import torch
from torch import nn

from qkv.model import cpu_gemv
from qkv.model.cpu_layout import column_major_fp32


@pytest.fixture
def blas():
    before = cpu_gemv._threads[0]
    if not cpu_gemv.blas_threads(2):
        pytest.skip("numpy's BLAS is not an OpenBLAS that threadpoolctl can set")
    yield
    cpu_gemv._threads[0] = before


def test_one_row_products_match_torch(blas, monkeypatch):
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(a=nn.Linear(64, 96), b=nn.Linear(96, 64, bias=False), bf=nn.Linear(8, 8).bfloat16()))
    model.b.keep_row_major = True  # both layouts go through the BLAS path
    column_major_fp32(model)
    x, rows = torch.randn(1, 64), torch.randn(5, 64)
    refs = (model.a(x), model.b(model.a(x)), model.a(rows))
    assert cpu_gemv.use_blas_gemv(model) == 2 and type(model.bf) is nn.Linear
    calls = []
    matmul = np.matmul
    monkeypatch.setattr(cpu_gemv.np, "matmul", lambda *a, **k: calls.append(1) or matmul(*a, **k))
    with torch.inference_mode():
        torch.testing.assert_close(model.a(x), refs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.b(model.a(x)), refs[1], rtol=1e-5, atol=1e-5)
        assert len(calls) == 3
        torch.testing.assert_close(model.a(rows), refs[2], rtol=1e-5, atol=1e-5)  # several rows: torch
        assert len(calls) == 3
    wt = torch.randn(64, 32)
    bias = torch.randn(32)
    torch.testing.assert_close(cpu_gemv.addmm(bias, x, wt), torch.addmm(bias, x, wt), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_gemv.addmm(None, x, wt), x @ wt, rtol=1e-5, atol=1e-5)
    assert len(calls) == 5


def test_off_without_threads(monkeypatch):
    """With the path off (no thread count given to numpy's BLAS) every product is torch's."""
    monkeypatch.setattr(cpu_gemv, "_threads", [0])
    monkeypatch.setattr(cpu_gemv.np, "matmul", None)  # would fail if called
    lin = nn.Linear(16, 8)
    cpu_gemv.use_blas_gemv(lin)
    x = torch.randn(1, 16)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)


def test_whisper_engine_uses_blas_and_head_major_cross_pages(tmp_path):
    """A CPU Whisper engine: its linears are BlasLinear, numpy's BLAS has the engine's threads,
    and each cross layer's pages are head-major (each head's keys contiguous over a run)."""
    from test_whisper_model import tiny_whisper

    from qkv import LLM

    before = torch.get_num_threads()
    tiny_whisper().save_pretrained(tmp_path)
    try:
        llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=64, threads=2)
    finally:
        torch.set_num_threads(before)
    eng = llm.engine
    if not cpu_gemv.enabled():
        pytest.skip("numpy's BLAS is not an OpenBLAS that threadpoolctl can set")
    assert type(eng.model.lm_head) is cpu_gemv.BlasLinear
    cross = [eng.runner.kv_caches[layer] for g, group in enumerate(eng.kv.groups) if eng.kv.cross[g]
             for layer in group.layers]
    assert cross
    for c in cross:
        two, n, bs, kvh, d = c.shape
        assert c.stride() == (kvh * n * bs * d, bs * d, d, n * bs * d, 1)
