"""Cross (encoder-decoder) attention over the paged cross cache: the reference implementation.

Every query of sequence ``b`` sees all ``batch.encoder_lens[b]`` encoder positions, read from
the pages of its cross table (``batch.block_tables[group]``, position ``p`` at
``table[p // block_size] * block_size + p % block_size``): no causal mask, no write (the
encoder wrote them once, engine/encoder.py). Plain torch, textbook softmax(QK^T * scale)V per
sequence: the CPU path and the oracle for any kernel; the tests compare it with HF transformers.

Cache layout per layer: ``[2, num_blocks, block_size, kv_heads, head_dim]``, as full attention.
``attend`` is what the model calls: this reference on the CPU (and with the reference backend),
the paged Triton decode kernel (attention/triton/cross.py) on CUDA with the Triton backend.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

from qkv.attention.batch import AttentionBatch
from qkv.kvcache.kv_quant import to_cache
from qkv.model import cpu_gemv


def _plan(batch: AttentionBatch, group: int) -> list[tuple[int, int, int, int | list[int]]]:
    """Per sequence: (first query row, query count, encoder length, pages), where pages is the
    first block of a run of consecutive blocks (read as a view, no copy) or the list of blocks
    to gather. Read on the host once per step and shared by every cross layer."""
    key = ("cross", group)
    if key not in batch.scratch:
        bs = batch.block_size
        qsl, lens = batch.query_start_loc.tolist(), batch.encoder_lens.tolist()
        plan = []
        for b, table in enumerate(batch.block_tables[group].tolist()):
            n = -(-lens[b] // bs)
            row = table[:n]
            pages = row[0] if row == list(range(row[0], row[0] + n)) else row
            plan.append((qsl[b], qsl[b + 1] - qsl[b], lens[b], pages))
        batch.scratch[key] = plan
    return batch.scratch[key]


def cross_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, group: int,
                    scale: float) -> torch.Tensor:
    """q [T, H, D] -> out [T, H, D]: softmax(q K_b^T * scale) V_b over sequence b's encoder K/V.

    One sequence at a time: its keys are a view of the cache when its cross blocks are
    consecutive (the manager hands them out and takes them back in runs, so for Whisper they
    almost always are), else gathered by block. Gathering every sequence into one padded
    batch instead copied each step's cross K/V once more and was ~2x slower on the CPU."""
    T, H, D = q.shape
    kvh = kv_cache.shape[3]
    g = H // kvh
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    streamed = not q.is_cuda and g == 1 and q.dtype == kv_cache.dtype == torch.float32
    for start, n_q, n_k, pages in _plan(batch, group):
        if isinstance(pages, int):
            n = -(-n_k // batch.block_size)
            k, v = kv_cache[0, pages:pages + n], kv_cache[1, pages:pages + n]
        else:
            k, v = kv_cache[0][pages], kv_cache[1][pages]
        if streamed and n_q == 1:
            k, v = k.reshape(-1, kvh, D)[:n_k], v.reshape(-1, kvh, D)[:n_k]
            if cpu_gemv.enabled() and k.stride(0) == v.stride(0) == D:  # head-major pages (new_cache)
                _one_query_blas(q[start] * scale, k, v, out[start])
            else:
                out[start] = _one_query(q[start] * scale, k, v)
            continue
        # [1, KVH, L, D] views of the pages (no copy): torch's fused kernel reads them strided,
        # where the einsum pair it replaced made a contiguous copy of K (~20% of a CPU step).
        k = k.reshape(-1, kvh, D)[:n_k].float().permute(1, 0, 2).unsqueeze(0)
        v = v.reshape(-1, kvh, D)[:n_k].float().permute(1, 0, 2).unsqueeze(0)
        qb = q[start:start + n_q].float().transpose(0, 1).unsqueeze(0)  # [1, H, n_q, D]
        o = F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=g > 1)
        out[start:start + n_q] = o[0].transpose(0, 1).to(q.dtype)
    return out


_scratch = threading.local()  # per engine thread: one step runs at a time on it


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(K q) V for one float32 query q [H, D] (scale applied) over k/v [L, H, D] on the
    CPU, reading K and V row after row (a product and a sum each). torch's fused attention
    reads each head's keys with a stride of H * D floats; over Whisper's 1,500 encoder rows
    (6 MB a layer, never in cache during a step) that took 6.7-7.7 ms for six layers on one
    thread against 4.3-4.8 here (2026-12-03, docs/benchmarks.md; at two threads the two were
    within noise). The products go to a reused buffer: fresh 3 MB ones were several times
    slower (page faults)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < k.numel():
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
            buf = _scratch.buf = torch.empty(k.numel(), dtype=torch.float32)
    prod = buf[:k.numel()].view(k.shape)
    p = torch.softmax(torch.mul(k, q, out=prod).sum(-1).t(), dim=-1)  # [H, L]
    return torch.mul(v, p.t()[:, :, None], out=prod).sum(0)


def _one_query_blas(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """``_one_query`` for k/v [L, H, D] whose heads are each contiguous [L, D] (``new_cache``'s
    layout): per head a GEMV over its keys and one over its values, through numpy's BLAS
    (model/cpu_gemv.py), each reading K or V once. Whisper base's six layers over 1,500 rows:
    3.3-3.5 ms against 4.3-5.1 for ``_one_query`` on two threads, 3.6-3.8 against 5.2-5.3 on
    one (2026-12-03, cold pages). The result is written into ``out`` [H, D] (contiguous)."""
    H, D = q.shape
    L = k.shape[0]
    s = torch.empty(H, L, 1)
    np.matmul(k.permute(1, 0, 2).numpy(), q.contiguous().numpy()[:, :, None], out=s.numpy())
    p = torch.softmax(s.view(H, L), dim=-1)
    np.matmul(p.numpy()[:, None, :], v.permute(1, 0, 2).numpy(), out=out.view(H, 1, D).numpy())


def new_cache(spec, num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU cross cache of float pages: the usual shape ``[2, blocks, block_size, kvh,
    head_dim]`` (every read and write indexes it as before), laid out head-major in memory
    (``[2, kvh, blocks, block_size, head_dim]``, permuted), so that over a run of consecutive
    blocks each head's keys and values are one contiguous [L, head_dim] matrix for a GEMV
    (``_one_query_blas``); the encoder writes them once per request. Not on 2 MB pages: a
    request's run touches a slice of each head's plane, and the first write to each 2 MB page
    zeroes all of it (a fresh run of Whisper base's 1,500 rows: 24-51 ms a layer on 2 MB
    pages, 2 ms on 4 KB ones, 2026-12-03; the pool hands out fresh blocks until it has used
    them all)."""
    from qkv.kvcache.zero_pages import zeros

    two, n, bs, kvh, d = spec.cache_shape(num_blocks, block_size)
    return zeros((two, kvh, n, bs, d), dtype, "cpu").permute(0, 2, 3, 1, 4)


def attend(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, group: int,
           scale: float, *, name: str = "reference") -> torch.Tensor:
    """Cross attention through backend ``name`` (the calling module's, set by the engine with
    ``backend.use``); ``cross_attention``'s contract."""
    if q.is_cuda and name == "triton":
        from qkv.attention.triton.cross import cross_attention as triton_cross

        return triton_cross(q, kv_cache, batch, group, scale)
    return cross_attention(q, kv_cache, batch, group, scale)


def write_cross_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store the encoder's K/V [N, KVH, D] at ``slots`` [N] (every row has its own slot).

    Slots that run consecutively on the CPU (one request's run of blocks, the usual case) are
    written as a slice copy: an indexed write into the head-major pages (``new_cache``) took
    ~11 ms a layer for Whisper base's 1,500 rows (2026-12-03)."""
    kvh, d = k.shape[1], k.shape[2]
    n = slots.numel()
    if n and not slots.is_cuda:
        first = int(slots[0])
        if int(slots[-1]) - first == n - 1 and torch.equal(slots, torch.arange(first, first + n)):
            kv_cache[0].view(-1, kvh, d)[first:first + n].copy_(to_cache(k, kv_cache.dtype))
            kv_cache[1].view(-1, kvh, d)[first:first + n].copy_(to_cache(v, kv_cache.dtype))
            return
    kv_cache[0].view(-1, kvh, d)[slots] = to_cache(k, kv_cache.dtype)
    kv_cache[1].view(-1, kvh, d)[slots] = to_cache(v, kv_cache.dtype)
