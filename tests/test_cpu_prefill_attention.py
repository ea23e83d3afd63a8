"""The CPU prefill paths: the attention (qkv/attention/reference.py ``_attend_cpu``): one
sequence at a time in query blocks, and a mixed step's one-query rows batched, give the plain
softmax(Q K^T * scale) V of each query over the keys it may see (causal, window), read back
from the pages; and the many-row RMSNorm (model/layers.py) is F.rms_norm bit for bit."""

from __future__ import annotations

import pytest
import torch

from qkv.attention import reference
from qkv.attention.batch import AttentionBatch
from qkv.attention.reference import paged_attention

BS = 4


def mixed_step(cached: list[int], qlens: list[int]):
    """Sequences with ``cached`` tokens in their pages and ``qlens`` new ones this step."""
    nblk = (max(c + n for c, n in zip(cached, qlens)) + BS - 1) // BS
    tables = torch.arange(len(cached) * nblk).view(len(cached), nblk)
    slots = [int(tables[b, p // BS]) * BS + p % BS for b, (c, n) in enumerate(zip(cached, qlens))
             for p in range(c, c + n)]
    t = torch.tensor
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    batch = AttentionBatch(query_start_loc=t(starts), num_computed=t(cached), query_lens=t(qlens),
                           max_query_len=max(qlens), max_seq_len=max(c + n for c, n in zip(cached, qlens)),
                           block_size=BS, block_tables=[tables], slot_mappings=[t(slots)], ring_blocks=[None])
    return batch, tables


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_prefill_is_the_plain_attention(monkeypatch, window, dtype):
    monkeypatch.setattr(reference, "QUERY_BLOCK", 4)  # several blocks per sequence, on tiny shapes
    monkeypatch.setattr(reference, "CAUSAL_ROWS", 8)  # the 11-token prompt: one is_causal call (no window)
    torch.manual_seed(0)
    H, KVH, D = 6, 2, 16
    cached, qlens = [0, 5, 9, 0, 3, 0, 7], [11, 1, 6, 1, 1, 4, 1]
    batch, tables = mixed_step(cached, qlens)
    cache = torch.zeros(2, tables.numel(), BS, KVH, D, dtype=dtype)
    for b, c in enumerate(cached):
        for p in range(c):
            cache[:, tables[b, p // BS], p % BS] = torch.randn(2, KVH, D).to(dtype)
    T = sum(qlens)
    q, k, v = (torch.randn(T, h, D).to(dtype) for h in (H, KVH, KVH))
    out = paged_attention(q, k, v, cache, batch, 0, 0.25, window)
    assert out.shape == (T, H, D) and out.dtype == dtype
    row = 0
    for b, (c, n) in enumerate(zip(cached, qlens)):
        pos = torch.arange(c + n)
        slot = tables[b, pos // BS] * BS + pos % BS
        keys = cache[0].reshape(-1, KVH, D)[slot].float().repeat_interleave(H // KVH, dim=1)  # [L, H, D]
        vals = cache[1].reshape(-1, KVH, D)[slot].float().repeat_interleave(H // KVH, dim=1)
        for j in range(n):
            qpos = c + j
            seen = (pos <= qpos) & ((qpos - pos < window) if window else True)
            probs = torch.softmax(torch.einsum("hd,lhd->hl", q[row].float(), keys[seen]) * 0.25, dim=-1)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[row].float(), torch.einsum("hl,lhd->hd", probs, vals[seen]),
                                       atol=tol, rtol=tol)
            row += 1


def test_many_row_rms_norm_is_one_op_rms_norm():
    """RMSNorm of a bf16 x of MANY_ROWS rows or more (model/layers.py) widens its weight itself:
    bit for bit what F.rms_norm gives."""
    import torch.nn.functional as F

    from qkv.model.layers import MANY_ROWS, RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(torch.bfloat16)
    norm.weight.data = (torch.randn(96) * 2).bfloat16()
    for rows, scale in [(MANY_ROWS, 1.0), (3 * MANY_ROWS + 5, 30.0), (2 * MANY_ROWS, 0.01)]:
        x = (torch.randn(rows, 96) * scale).bfloat16()
        assert torch.equal(norm(x), F.rms_norm(x, (96,), norm.weight, 1e-5))
