"""Llama's batch-1 qkv projection with the norm before it and RoPE + the KV write after it, in
one launch (the stream kernels' normed GEMV, stream.py, with a different epilogue).

A program owns row pairs (j, j + D/2) of one head of the projection's output, so the neox
rotation of those rows needs nothing from another program: it rounds each output as the
projection stores it, rotates q and k rows by the step's position and stores q into the
query buffer, k and v rows into the cache at the step's slot (none for slot -1). The separate
RoPE + KV write launch (``fused.qk_norm_rope`` without norms) and its serial latency are gone;
the results are bit for bit that launch's given the same projection outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.attention.triton import gemv, pdl
from qkv.attention.triton.gemv import _prefetch_start, _v_chunk, _w_chunk
from qkv.attention.triton.stream import Stream


@triton.jit
def _h_chunk(S, NW, k0, k, rstd, K: tl.constexpr, EVEN: tl.constexpr, dt: tl.constexpr):
    nw = _v_chunk(NW, k0, k, K, EVEN).to(tl.float32)
    return ((_v_chunk(S, k0, k, K, EVEN).to(tl.float32) * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)


@triton.jit
def _qkv_rope_kernel(S, P, NW, W, QO, KC, VC, COS, SIN, POS, SLOT, stride_w, stride_c, stride_cs, stride_ch, eps,
                     K: tl.constexpr, NP: tl.constexpr, NP_PAD: tl.constexpr, H: tl.constexpr, KVH: tl.constexpr,
                     HALF: tl.constexpr, BP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                     PDL: tl.constexpr, PRE: tl.constexpr, PREFETCH: tl.constexpr = 0, EVICT: tl.constexpr = False):
    pid = tl.program_id(0)
    PER_HEAD: tl.constexpr = HALF // BP
    head = pid // PER_HEAD
    j = (pid % PER_HEAD) * BP + tl.arange(0, BP)  # this program's rows j and j + HALF of ``head``
    n1 = head * 2 * HALF + j
    n2 = n1 + HALF
    N: tl.constexpr = (H + 2 * KVH) * 2 * HALF
    k = tl.arange(0, BLOCK_K)
    if PREFETCH > 0:
        _prefetch_start(W, n1, stride_w, N, K, BLOCK_K, PREFETCH)
        _prefetch_start(W, n2, stride_w, N, K, BLOCK_K, PREFETCH)
    w1 = _w_chunk(W, n1, 0, k, stride_w, N, K, EVEN, EVICT)
    w2 = _w_chunk(W, n2, 0, k, stride_w, N, K, EVEN, EVICT)
    if PRE:  # a CUDA graph's static inputs (positions, slots, fixed tables): before the wait
        pos = tl.load(POS)
        slot = tl.load(SLOT)
        cos1 = tl.load(COS + pos * stride_c + j).to(tl.float32)
        cos2 = tl.load(COS + pos * stride_c + HALF + j).to(tl.float32)
        sin1 = tl.load(SIN + pos * stride_c + j).to(tl.float32)
        sin2 = tl.load(SIN + pos * stride_c + HALF + j).to(tl.float32)
    pdl.sync(PDL)
    if not PRE:
        pos = tl.load(POS)
        slot = tl.load(SLOT)
        cos1 = tl.load(COS + pos * stride_c + j).to(tl.float32)
        cos2 = tl.load(COS + pos * stride_c + HALF + j).to(tl.float32)
        sin1 = tl.load(SIN + pos * stride_c + j).to(tl.float32)
        sin2 = tl.load(SIN + pos * stride_c + HALF + j).to(tl.float32)
    i = tl.arange(0, NP_PAD)
    rstd = tl.rsqrt(tl.sum(tl.load(P + i, mask=i < NP, other=0.0), 0) / K + eps)
    dt = QO.dtype.element_ty
    h = _h_chunk(S, NW, 0, k, rstd, K, EVEN, dt)
    acc1 = w1.to(tl.float32) * h[None, :]
    acc2 = w2.to(tl.float32) * h[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        h = _h_chunk(S, NW, k0, k, rstd, K, EVEN, dt)
        acc1 += _w_chunk(W, n1, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * h[None, :]
        acc2 += _w_chunk(W, n2, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * h[None, :]
    x1 = tl.sum(acc1, 1).to(dt).to(tl.float32)  # the projection's outputs, rounded as it stores them
    x2 = tl.sum(acc2, 1).to(dt).to(tl.float32)
    if head < H + KVH:  # q or k: neox rotation (fused._rope_rows's math)
        y1 = (x1 * cos1 - x2 * sin1).to(dt)
        y2 = (x2 * cos2 + x1 * sin2).to(dt)
    else:
        y1 = x1.to(dt)
        y2 = x2.to(dt)
    if head < H:
        tl.store(QO + head * 2 * HALF + j, y1)
        tl.store(QO + head * 2 * HALF + HALF + j, y2)
    elif slot >= 0:
        if head < H + KVH:
            c = KC + slot.to(tl.int64) * stride_cs + (head - H) * stride_ch
        else:
            c = VC + slot.to(tl.int64) * stride_cs + (head - H - KVH) * stride_ch
        tl.store(c + j, y1.to(c.dtype.element_ty))
        tl.store(c + HALF + j, y2.to(c.dtype.element_ty))


def fits(layer: torch.nn.Linear, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this projection: [q | k | v] rows of an even head size whose
    half a row pair of programs divides."""
    N, K = layer.weight.shape
    return (layer.bias is None and N == (heads + 2 * kv_heads) * head_dim and head_dim % 4 == 0
            and layer.weight.stride(1) == 1)


def qkv_rope(stream: Stream, norm_weight: torch.Tensor, eps: float, layer: torch.nn.Linear, heads: int,
             kv_heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             kv_cache: torch.Tensor, slot_mapping: torch.Tensor, static: bool = False) -> torch.Tensor:
    """q [1, heads, head_dim] of ``rope(layer(rms_norm(stream.s)))``; k and v of the same
    projection rotated (k) and stored at ``slot_mapping[0]`` of ``kv_cache`` [2, blocks, bs, KVH, D]
    (a float cache of the model's dtype). ``static``: positions, slots and tables are inputs no
    kernel of the step writes (CUDA graph with fixed tables): read before the PDL wait."""
    w = layer.weight
    N, K = w.shape
    s, p = stream
    half = head_dim // 2
    mode, kw = pdl.launch(s.device)
    bn, bk, nw = gemv.tile(N, K, mode)
    bp = max(1, min(bn // 2, half))
    while half % bp:
        bp //= 2
    kc, vc = kv_cache[0], kv_cache[1]
    assert kc.dtype == s.dtype and kc.stride(3) == 1 and kc.stride(2) == head_dim
    q = torch.empty((1, heads, head_dim), dtype=s.dtype, device=s.device)
    np_ = p.shape[0]
    _qkv_rope_kernel[(N // (2 * bp),)](s, p, norm_weight, w, q, kc, vc, cos, sin, positions, slot_mapping, w.stride(0),
                                       cos.stride(0), kc.stride(1), kc.stride(2), eps, K=K, NP=np_,
                                       NP_PAD=triton.next_power_of_2(np_), H=heads, KVH=kv_heads, HALF=half, BP=bp,
                                       BLOCK_K=bk, EVEN=K % bk == 0, PDL=mode, PRE=static,
                                       PREFETCH=gemv.prefetch(N, K, bk), EVICT=gemv.EVICT_FIRST, num_warps=nw,
                                       num_stages=3, **kw)
    return q
