"""The fused MoE kernel (qkv/attention/triton/moe.py) against the torch expert loop
(``MoE.reference``), the oracle; end-to-end DeepSeek tests are in test_triton.py.

On a CUDA machine the kernels run on the GPU; without one, a small case runs under Triton's
interpreter (TRITON_INTERPRET=1) when triton is installed; otherwise the module skips.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported: set it before
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("triton is not installed", allow_module_level=True)

from qkv.attention.triton import moe  # noqa: E402
from qkv.config import ModelConfig  # noqa: E402
from qkv.model.moe import MoE  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make_moe(hidden, inter, experts, top_k, dtype, seed, method="greedy", v3=False):
    """A MoE layer (one shared expert) with random weights (std 1/sqrt(fan-in)) and router."""
    extra = dict(n_routed_experts=experts, moe_intermediate_size=inter, num_experts_per_tok=top_k,
                 n_shared_experts=1, topk_method=method, n_group=4 if method != "greedy" else 1, topk_group=2,
                 routed_scaling_factor=1.5, norm_topk_prob=True)
    cfg = ModelConfig(model_type="deepseek_v3" if v3 else "deepseek_v2", vocab_size=16, hidden_size=hidden,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, intermediate_size=inter, extra=extra)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape) / fan_in ** 0.5)
    return layer.to(device=DEV, dtype=dtype)


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(T, hidden, inter, experts, top_k, dtype, tol, seed=0, **kw):
    layer = make_moe(hidden, inter, experts, top_k, dtype, seed, **kw)
    x = torch.randn(T, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(DEV, dtype)
    w, idx = layer.gate(x)
    shared = layer.shared_experts(x)
    want = layer.reference(x, w, idx) + shared
    w13, w2 = layer.stacked_weights()
    got = moe.fused_moe(x, w13, w2, w, idx, shared)
    assert got.dtype == x.dtype and got.shape == x.shape
    err = rel_err(got, want)
    assert err < tol, err
    # the stacked weights are the experts' parameters, not a copy
    assert layer.experts[1].down_proj.weight.data_ptr() == w2[1].data_ptr()
    return err


def test_align_kernel_matches_torch_sort():
    """The one-program sort equals the stable torch sort exactly: ids grouped by expert,
    each expert's run padded to BLOCK_M with the sentinel T*k, the expert of every block."""
    gen = torch.Generator().manual_seed(3)
    for T, k, E in ((1, 6, 64), (5, 2, 8), (100, 6, 64), (33, 8, 256)):
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(DEV)
        got = moe.align(idx, E, 16)
        want = moe.align_torch(idx, E, 16)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w.cpu())
        sorted_ids, block_expert, num_padded = (t.cpu() for t in got)
        n = int(num_padded)
        real = sorted_ids[:n][sorted_ids[:n] < T * k]
        assert sorted(real.tolist()) == list(range(T * k))
        flat = idx.reshape(-1).cpu()
        assert torch.equal(flat[real.long()], block_expert.repeat_interleave(16)[:n][sorted_ids[:n] < T * k])


def test_fused_moe_small_fp32():
    """A small layer (8 experts, top-2, K and N below the tile sizes): kernel == loop in fp32.
    Runs under the interpreter on the CPU."""
    check(T=5, hidden=64, inter=32, experts=8, top_k=2, dtype=torch.float32, tol=1e-5)


@gpu
@pytest.mark.parametrize("T", [1, 3, 64, 200, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_moe_matches_loop_gpu(T, dtype):
    """DeepSeek-V2-Lite-like widths (64 experts, top 6; each tile regime: BLOCK_M 16, 32 at 200
    tokens, 128 with the torch sort at 700): fp32 within 1e-5 (IEEE dots), bf16 within 1e-2, of the expert loop."""
    check(T, hidden=512, inter=352, experts=64, top_k=6, dtype=dtype,
          tol=1e-5 if dtype == torch.float32 else 1e-2, seed=T)


@gpu
@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
def test_fused_moe_routing_methods_gpu(method):
    """Group-limited and V3 (sigmoid, bias, 256-wide sort) routing feed the same kernel."""
    check(16, hidden=256, inter=128, experts=32 if method != "noaux_tc" else 256, top_k=8, dtype=torch.float32,
          tol=1e-5, method=method, v3=method == "noaux_tc")


@gpu
def test_fused_moe_in_cuda_graph():
    """Captured once, replayed on new inputs (new routes): the result equals the loop's."""
    layer = make_moe(256, 128, 64, 6, torch.bfloat16, 5)
    x = torch.randn(4, 256, device=DEV, dtype=torch.bfloat16)
    w13, w2 = layer.stacked_weights()
    w, idx = layer.gate(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe.fused_moe(x, w13, w2, w, idx)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe.fused_moe(x, w13, w2, w, idx)  # no shared experts here: the sum kernel alone
    for seed in range(3):
        x.copy_(torch.randn(4, 256, generator=torch.Generator().manual_seed(seed)).to(DEV, torch.bfloat16))
        w.copy_(torch.rand(4, 6, device=DEV))
        idx.copy_(torch.stack([torch.randperm(64)[:6] for _ in range(4)]).to(DEV))
        out.fill_(float("nan"))
        g.replay()
        assert rel_err(out, layer.reference(x, w, idx)) < 1e-2
