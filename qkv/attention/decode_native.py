"""Batched CPU decode attention read in place from bf16 pages (model/csrc/decode_attn.c).

``reference.decode_pages`` gathers every key and value a step's sequences see into a new
tensor, widens it to float32 in a transposing copy, and multiplies with ``bmm``: at 16
sequences of ~250 keys those copies were most of the attention, and the attention half of a
SmolLM2 16-row decode step on 2 cores (docs/benchmarks.md, issue 19). The C kernel reads each
key and value row where its page holds it, once, and keeps scores, softmax and the weighted
sum in float32 for one (sequence, KV head) at a time; the output is rounded to bf16 as the
torch path's. It agrees with ``decode_pages`` to float32 summation order, not bit for bit
(tests/test_decode_native.py). Only bf16 pages and a bf16 query; anything else, no compiler,
``QKV_NATIVE=0`` or a traced step: ``attend`` returns None and the torch path runs.
"""

from __future__ import annotations

import ctypes

import torch

from qkv.kvcache.kv_quant import to_cache

MAX_HEAD_DIM = 512  # the kernel keeps one row of a head in a stack array (decode_attn.c)

ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
             ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int])


def _kernel():
    from qkv.model import native

    return native.function("decode_attn", "qkv_decode_attn", ARGTYPES)


def usable(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    H, D = q.shape[1], q.shape[2]
    kvh = kv_cache.shape[-2]
    return (q.dtype == torch.bfloat16 and kv_cache.dtype == torch.bfloat16 and not q.is_cuda
            and q.stride(2) == 1 and kv_cache.is_contiguous() and kv_cache.shape[-1] == D
            and D <= MAX_HEAD_DIM and H % kvh == 0
            and not torch.compiler.is_compiling() and _kernel() is not None)


def attend(q, k, v, kv_cache, slots: torch.Tensor, from_pages: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """``reference.decode_pages`` (write k/v [T, KVH, D] at ``slots``, then attend over the keys
    at ``from_pages`` [B, L], ``mask`` None or bool [B, 1, 1, L]) for ``usable`` inputs."""
    write(k, v, kv_cache, slots)
    B, L = from_pages.shape
    keep = None if mask is None else mask.reshape(B, L).to(torch.bool).contiguous()  # one byte, 0 or 1: as the C reads
    return _attend(q, kv_cache, from_pages, keep, scale)


def write(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """This step's k/v [T, KVH, D] into the pages at ``slots`` (traced too: an in-place store)."""
    planes = kv_cache.view(2, -1, k.shape[1], k.shape[2])
    planes[:, slots] = to_cache(torch.stack((k, v)), kv_cache.dtype)


def _attend(q, kv_cache, from_pages, keep, scale: float) -> torch.Tensor:
    """The kernel over the keys at ``from_pages`` [B, L] (int64), ``keep`` None or bool [B, L]."""
    T, H, D = q.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    kvh = kv_cache.shape[-2]
    planes = kv_cache.view(2, -1, kvh, D)
    B, L = from_pages.shape
    pages = from_pages.contiguous()
    out = torch.empty(T, H, D, dtype=torch.bfloat16)
    threads = max(1, min(torch.get_num_threads(), B))
    scratch = torch.empty(threads, H * (L + 2 * D))  # a thread's scores [H, L], scaled q and sums [H, D]
    index = torch.empty(threads, L, dtype=torch.int32)
    _kernel()(q.data_ptr(), q.stride(0), q.stride(1), planes[0].data_ptr(), planes[1].data_ptr(),
              pages.data_ptr(), 0 if keep is None else keep.data_ptr(), B, L, H, kvh, D, scale,
              out.data_ptr(), scratch.data_ptr(), index.data_ptr(), threads)
    return out


def op():
    """``_attend`` as the torch operator ``qkv::decode_attn`` (q bf16 [B, H, D], the bf16 pages,
    from_pages int64 [B, L], keep bool [B, L], scale) -> bf16 [B, H, D], reading the pages only
    (the step writes them before, in the graph): what the compiled batched decode step calls
    (engine/cpu_aoti.py). None where the kernel is not there."""
    from qkv.model import native

    return native.operator(
        "decode_attn(Tensor q, Tensor kv_cache, Tensor from_pages, Tensor keep, float scale) -> Tensor",
        lambda q, kv_cache, from_pages, keep, scale: _attend(q, kv_cache, from_pages, keep.contiguous(), scale),
        lambda q, kv_cache, from_pages, keep, scale: q.new_empty(q.shape, dtype=torch.bfloat16),
        lambda: _kernel() is not None)
