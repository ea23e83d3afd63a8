"""Batch-1 gate/up projection with SiLU-and-mul in its epilogue: a program owns rows n of the
gate half and the same rows of the up half, so it stores ``silu(g) * u`` for its rows and the
down projection reads one I-wide row instead of computing SiLU over [g | u] in every one of
its programs (``gemv.silu_mul_linear``: each of 1,024 programs at Llama-8B's shape evaluates
14,336 sigmoids and reads 57 KB of activations). Rounded where torch rounds: g and u as the
projection's bf16 outputs, silu's output, the product.

Switch: ``QKV_GATE_UP_SILU`` = ``1`` (default) / ``0``; it applies only where the tail norms
(tail_norm.py) run the layer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkv.attention.triton import gemv, pdl
from qkv.attention.triton.gemv import _v_chunk, _w_chunk

ON = os.environ.get("QKV_GATE_UP_SILU", "1") != "0"


@triton.jit
def _gate_up_silu_kernel(X, W, Y, I, stride_w, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr = False):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    wg = _w_chunk(W, n, 0, k, stride_w, I, K, EVEN, EVICT)
    wu = _w_chunk(W + I * stride_w, n, 0, k, stride_w, I, K, EVEN, EVICT)
    pdl.sync(PDL)
    x = _v_chunk(X, 0, k, K, EVEN).to(tl.float32)[None, :]
    ag = wg.to(tl.float32) * x
    au = wu.to(tl.float32) * x
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x = _v_chunk(X, k0, k, K, EVEN).to(tl.float32)[None, :]
        ag += _w_chunk(W, n, k0, k, stride_w, I, K, EVEN, EVICT).to(tl.float32) * x
        au += _w_chunk(W + I * stride_w, n, k0, k, stride_w, I, K, EVEN, EVICT).to(tl.float32) * x
    dt = Y.dtype.element_ty
    g = tl.sum(ag, 1).to(dt).to(tl.float32)
    u = tl.sum(au, 1).to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
    tl.store(Y + n, (a * u).to(dt), mask=n < I)


def applies(x: torch.Tensor, layer: torch.nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (ON and isinstance(layer, torch.nn.Linear) and layer.bias is None and x.dim() == 2 and x.shape[0] == 1
            and x.is_contiguous() and w.stride(1) == 1 and w.dtype == x.dtype and w.shape[0] % 2 == 0
            and gemv.enabled(*w.shape))


def gate_up_silu(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``silu(g) * u`` [1, I] with ``[g | u] = layer(x)`` for one row x, one launch. Each program
    takes half the rows ``gemv.tile`` gives the [2I, K] weight (the same bytes a chunk)."""
    w = layer.weight
    N, K = w.shape
    I = N // 2  # noqa: E741
    mode, kw = pdl.launch(x.device)
    bn, bk, nw = gemv.tile(N, K, mode)
    bn = max(1, bn // 2)
    y = torch.empty((1, I), dtype=x.dtype, device=x.device)
    _gate_up_silu_kernel[(triton.cdiv(I, bn),)](x, w, y, I, w.stride(0), K=K, BLOCK_N=bn, BLOCK_K=bk,
                                                EVEN=I % bn == 0 and K % bk == 0, PDL=mode,
                                                EVICT=gemv.EVICT_FIRST, num_warps=nw, num_stages=3, **kw)
    return y
