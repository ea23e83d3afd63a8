"""model/csrc/int4_unpack.c (built by model/native.py): the one-pass C unpack equals
model/int4.py's torch ops bit for bit, on packed real layers and on arbitrary bytes and
scales across bf16's range; with ``QKV_NATIVE=0`` or no compiler the torch ops run."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from qkv.model import int4, native
from qkv.model.int4 import Int4Linear, unpack, unpack_torch

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and no kernel loaded yet in this process."""
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_functions", {})
    return tmp_path


@needs_cc
@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (960, 576), (576, 1536)])
def test_native_unpack_equals_torch(fresh, n, k):
    torch.manual_seed(n + k)
    q = Int4Linear(nn.Linear(k, n, bias=False))
    got = unpack(q.weight_int4, q.scales_zeros)
    assert int4._native_unpack() is not None and list((fresh / "native").glob("int4_unpack-*.so"))
    assert got.dtype == torch.bfloat16 and got.shape == (k, n)
    assert torch.equal(got, unpack_torch(q.weight_int4, q.scales_zeros))


@needs_cc
def test_native_unpack_any_bytes_and_scales(fresh):
    """Every code in both nibbles, scales from 1e-30 to 1e30 of both signs, a NaN and an inf."""
    torch.manual_seed(0)
    n, k = 256, 128
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    sz = torch.randn(k // int4.GROUP, n, 2) * torch.logspace(-30, 30, n)[None, :, None]
    sz[0, 3, 0], sz[1, 70, 1] = float("nan"), float("inf")
    sz = sz.bfloat16()
    got, ref = unpack(packed, sz), unpack_torch(packed, sz)
    # NaN where torch has NaN (its bits differ: torch's vector rounding gives 0xffff), else equal
    assert got.isnan().any() and torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num(0.0), ref.nan_to_num(0.0))


@needs_cc
def test_native_unpack_in_the_layer(fresh):
    """From DENSE_ROWS rows the layer's product is the bf16 GEMM by the unpacked weight."""
    torch.manual_seed(1)
    q = Int4Linear(nn.Linear(96, 128, bias=True))
    x = torch.randn(int4.DENSE_ROWS, 96, dtype=torch.bfloat16)
    assert torch.equal(q(x), torch.mm(x, unpack_torch(q.weight_int4, q.scales_zeros)) + q.bias)


def test_disabled_or_no_compiler_runs_torch(fresh, monkeypatch):
    monkeypatch.setenv("QKV_NATIVE", "0")
    assert native.library("int4_unpack") is None and int4._native_unpack() is None
    monkeypatch.setattr(native, "_functions", {})
    monkeypatch.delenv("QKV_NATIVE")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("CC", "qkv-no-such-compiler")
    q = Int4Linear(nn.Linear(64, 64, bias=False))
    assert torch.equal(unpack(q.weight_int4, q.scales_zeros), unpack_torch(q.weight_int4, q.scales_zeros))
    assert int4._native_unpack() is None and not (fresh / "native").exists()
