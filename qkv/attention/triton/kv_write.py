"""Fused KV write: store this step's K and V rows at their cache slots in one launch.

Slot ``s`` is flat over ``[num_blocks * block_size]``; ``-1`` means "do not store" (a token a
later token of the same ring chunk overwrites, or a padding row of a CUDA graph). No host
synchronization: the -1 rows are skipped inside the kernel, not filtered on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kvcache.kv_quant import FP8_MAX, is_fp8


@triton.jit
def _store_row(X, C, W: tl.constexpr, W_PAD: tl.constexpr, FP8_MAX: tl.constexpr):
    """Copy one row of ``W`` elements from ``X`` to ``C`` in the cache's dtype; an fp8 cache
    (``FP8_MAX > 0``) saturates, as kv_quant.to_cache does: out of range must not become NaN."""
    offs = tl.arange(0, W_PAD)
    mask = offs < W
    x = tl.load(X + offs, mask=mask)
    if FP8_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
    tl.store(C + offs, x.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _kv_write_kernel(K, V, KC, VC, SLOT, stride_kt, stride_vt, stride_cs, W: tl.constexpr, W_PAD: tl.constexpr,
                     FP8_MAX: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        _store_row(K + t * stride_kt, KC + slot * stride_cs, W, W_PAD, FP8_MAX)
        _store_row(V + t * stride_vt, VC + slot * stride_cs, W, W_PAD, FP8_MAX)


def _fp8_max(cache: torch.Tensor) -> float:
    return FP8_MAX if is_fp8(cache.dtype) else 0.0


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k/v [T, KVH, D] (each token's heads contiguous) -> ``kv_cache`` [2, blocks, bs, KVH, D]."""
    T = k.shape[0]
    if T == 0:
        return
    W = k.shape[1] * k.shape[2]
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(2) == 1 and v.stride(1) == v.shape[2]
    kc, vc = kv_cache[0], kv_cache[1]
    _kv_write_kernel[(T,)](k, v, kc, vc, slot_mapping, k.stride(0), v.stride(0), kc.stride(1),
                           W=W, W_PAD=triton.next_power_of_2(W), FP8_MAX=_fp8_max(kc), num_warps=4)


@triton.jit
def _row_write_kernel(X, C, SLOT, stride_xt, stride_cs, W: tl.constexpr, W_PAD: tl.constexpr, FP8_MAX: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t)
    if slot >= 0:
        _store_row(X + t * stride_xt, C + slot * stride_cs, W, W_PAD, FP8_MAX)


def write_rows(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """rows [T, W] -> ``cache`` viewed as [slots, W] (an MLA latent cache); slot -1 rows are
    skipped in the kernel, as in ``write_kv``."""
    T, W = rows.shape
    if T == 0:
        return
    flat = cache.view(-1, W)
    assert rows.stride(1) == 1
    _row_write_kernel[(T,)](rows, flat, slot_mapping, rows.stride(0), flat.stride(0), W=W,
                            W_PAD=triton.next_power_of_2(W), FP8_MAX=_fp8_max(flat), num_warps=4)
