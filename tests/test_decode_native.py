"""attention/decode_native.py (model/csrc/decode_attn.c): batched decode attention read in
place from bf16 pages agrees with reference.decode_pages (gather, float32 bmm) to the bf16
rounding of the output, masked and padded keys included, and writes the step's K/V as it does;
an engine's greedy tokens are the same with the kernel and with the torch path."""

from __future__ import annotations

import shutil

import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.attention import decode_native, reference
from qkv.model import native

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_functions", {})


@pytest.mark.parametrize("B,H,kvh,D,masked", [(16, 9, 3, 64, True), (1, 9, 3, 64, False), (5, 4, 1, 256, True),
                                              (3, 8, 8, 32, True)])
def test_matches_decode_pages(fresh, B, H, kvh, D, masked):
    torch.manual_seed(B * H + D)
    blocks, bs, L = 64, 16, 70
    cache = torch.randn(2, blocks, bs, kvh, D).bfloat16()
    qkv = torch.randn(B, H + 2 * kvh, D).bfloat16()  # q a strided view, as the engine's
    q, k, v = qkv[:, :H], qkv[:, H:H + kvh], qkv[:, H + kvh:]
    slots = torch.randperm(blocks * bs)[:B]
    pages = torch.randint(0, blocks * bs, (B, L))
    pages[:, -1] = slots  # each sequence sees its own new key
    mask = None
    if masked:
        n = torch.randint(1, L, (B,))
        mask = (torch.arange(L)[None] >= L - 1 - n[:, None])[:, None, None]  # a window's / padding's gaps
        mask[0, ..., :3] = False
        pages = torch.where(mask[:, 0, 0], pages, 0)
    assert decode_native.usable(q, cache)
    c1, c2 = cache.clone(), cache.clone()
    got = decode_native.attend(q, k, v, c1, slots, pages, mask, 0.125)
    bias = None if mask is None else torch.zeros(B, 1, 1, L).masked_fill_(~mask, float("-inf")).expand(
        B, kvh, H // kvh, L).reshape(B * kvh, H // kvh, L)
    ref = reference.decode_pages(q, k, v, c2, slots, pages, bias, 0.125)
    assert torch.equal(c1, c2)  # the same K/V written
    # float64 truth from the written cache
    kp, vp = c2[0].view(-1, kvh, D).double(), c2[1].view(-1, kvh, D).double()
    s = torch.einsum("bhgd,blhd->bhgl", q.double().view(B, kvh, H // kvh, D), kp[pages]) * 0.125
    if mask is not None:
        s = s.masked_fill(~mask.view(B, 1, 1, L), float("-inf"))
    truth = torch.einsum("bhgl,blhd->bhgd", s.softmax(-1), vp[pages]).reshape(B, H, D)
    tol = truth.abs().amax() / 256  # one bf16 rounding of the output's largest
    assert (ref.double() - truth).abs().max() <= tol
    assert (got.double() - truth).abs().max() <= tol
    assert (got.double() - ref.double()).abs().max() <= tol


def test_not_usable_for_float32_or_when_disabled(fresh, monkeypatch):
    cache = torch.zeros(2, 4, 16, 3, 64, dtype=torch.bfloat16)
    assert not decode_native.usable(torch.zeros(2, 9, 64), cache)
    assert not decode_native.usable(torch.zeros(2, 9, 64, dtype=torch.bfloat16), cache.float())
    monkeypatch.setenv("QKV_NATIVE", "0")
    assert not decode_native.usable(torch.zeros(2, 9, 64, dtype=torch.bfloat16), cache)


@torch.no_grad()
def test_engine_greedy_tokens_same_with_and_without(tiny_model, monkeypatch, tmp_path):
    """A bf16 engine's batched greedy decode (several sequences: decode_attention's batched
    path) gives the same tokens with the kernel as with QKV_NATIVE=0."""
    path, _ = tiny_model("llama")
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    prompts = [[1, 5, 9, 2], [3, 3, 7], [8, 1, 4, 4, 6, 2, 9], [2]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("QKV_NATIVE", flag)
        monkeypatch.setattr(native, "_loaded", {})
        monkeypatch.setattr(native, "_functions", {})
        llm = LLM(path, device="cpu", dtype="bfloat16", aot_decode=False)
        outs.append([o.token_ids for o in llm.generate(prompts, params)])
        assert (decode_native._kernel() is not None) == (flag == "1")
    assert outs[0] == outs[1]


def test_loading_the_kernels_keeps_subnormals(tmp_path):
    """A library built with -ffast-math on its link line turns on flush-to-zero for the whole
    process when it loads (crtfastmath.o): every float op after it, torch's too, would lose
    subnormals. native.py links without it; a fresh process checks."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from qkv.model import native\n"
            "assert all(native.library(n) is not None for n in ('decode_attn', 'int4_unpack'))\n"
            "print((torch.tensor([1e-40]) * 1.0).item() > 0, sys.float_info.min / 2 > 0)\n")
    env = dict(os.environ, QKV_CACHE_DIR=str(tmp_path), QKV_NATIVE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"], r.stdout


def test_the_operator_is_the_kernel(fresh):
    """``qkv::decode_attn`` (what the compiled batched step calls, after writing the pages
    itself) gives ``attend``'s output bit for bit, from a strided q as the graph passes it."""
    torch.manual_seed(1)
    B, H, kvh, D, L = 6, 9, 3, 64, 40
    cache = torch.randn(2, 16, 16, kvh, D).bfloat16()
    qkv = torch.randn(B, H + 2 * kvh, D).bfloat16()
    q, k, v = qkv[:, :H], qkv[:, H:H + kvh], qkv[:, H + kvh:]
    slots = torch.randperm(256)[:B]
    pages = torch.randint(0, 256, (B, L))
    pages[:, -1] = slots
    keep = torch.rand(B, L) > 0.3
    keep[:, -1] = True
    c1, c2 = cache.clone(), cache.clone()
    want = decode_native.attend(q, k, v, c1, slots, pages, keep[:, None, None], 0.125)
    decode_native.write(k, v, c2, slots)
    assert torch.equal(c1, c2)
    got = decode_native.op()(q, c2, pages, keep, 0.125)
    assert torch.equal(got, want)
