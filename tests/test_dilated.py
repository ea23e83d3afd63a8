"""Dilated sliding window (Longformer, seed 003): the reference backend vs a brute-force mask.

A query at position i with window W and dilation d sees keys i, i-d, ..., i-(W-1)*d.
"""

from __future__ import annotations

import pytest
import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.reference import paged_attention, window_mask, write_kv


def brute_mask(n_q: int, n_k: int, q0: int, window: int | None, d: int) -> torch.Tensor:
    m = torch.zeros(n_q, n_k, dtype=torch.bool)
    for a in range(n_q):
        i = q0 + a
        if window is None:
            m[a, : i + 1] = True
        else:
            for t in range(window):
                if 0 <= i - t * d < n_k:
                    m[a, i - t * d] = True
    return m


@pytest.mark.parametrize("window,d", [(None, 1), (4, 1), (3, 2), (4, 3), (1, 5)])
def test_window_mask_matches_brute_force(window, d):
    q = torch.arange(20)[:, None]
    k = torch.arange(20)[None, :]
    assert torch.equal(window_mask(q, k, window, d), brute_mask(20, 20, 0, window, d))


@pytest.mark.parametrize("window,d", [(4, 1), (3, 2), (5, 3)])
def test_paged_attention_dilated(window, d):
    """Mixed batch (chunked prefill after a cached prefix, decode, fresh prefill) through the
    paged cache equals dense softmax attention with the brute-force dilated mask."""
    g = torch.Generator().manual_seed(window * 10 + d)
    bs, nblocks, H, KVH, D = 4, 64, 4, 2, 8
    seqs = [(13, 9), (30, 1), (0, 17)]  # (cached tokens, new tokens)
    total = [c + n for c, n in seqs]
    k_all = [torch.randn(t, KVH, D, generator=g) for t in total]
    v_all = [torch.randn(t, KVH, D, generator=g) for t in total]
    q_all = [torch.randn(n, H, D, generator=g) for _, n in seqs]
    cache = torch.zeros(2, nblocks, bs, KVH, D)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = []
    for t in total:  # scattered, non-contiguous pages
        nb = -(-t // bs)
        tables.append(perm[:nb])
        perm = perm[nb:]
    for (c, _), tab, k, v in zip(seqs, tables, k_all, v_all):
        slots = torch.tensor([tab[p // bs] * bs + p % bs for p in range(c)], dtype=torch.int64)
        write_kv(cache, k[:c], v[:c], slots)
    width = max(len(t) for t in tables)
    qlens = [n for _, n in seqs]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    new_slots = [tab[p // bs] * bs + p % bs for (c, n), tab in zip(seqs, tables) for p in range(c, c + n)]
    batch = AttentionBatch(
        query_start_loc=torch.tensor(qsl), num_computed=torch.tensor([c for c, _ in seqs]),
        query_lens=torch.tensor(qlens), max_query_len=max(qlens), max_seq_len=max(total), block_size=bs,
        block_tables=[torch.tensor([t + [0] * (width - len(t)) for t in tables])],
        slot_mappings=[torch.tensor(new_slots)], ring_blocks=[None],
    )
    q = torch.cat(q_all)
    k_new = torch.cat([k[c:] for (c, _), k in zip(seqs, k_all)])
    v_new = torch.cat([v[c:] for (c, _), v in zip(seqs, v_all)])
    scale = D ** -0.5
    out = paged_attention(q, k_new, v_new, cache, batch, 0, scale, window=window, dilation=d)

    refs = []
    for (c, n), qs, k, v in zip(seqs, q_all, k_all, v_all):
        mask = brute_mask(n, c + n, c, window, d)
        kk = k.repeat_interleave(H // KVH, dim=1)
        vv = v.repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("qhd,khd->hqk", qs, kk) * scale
        s = s.masked_fill(~mask, float("-inf"))
        refs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vv))
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-5, atol=1e-5)
    # The step's K/V were written after being read: the cache now holds every position.
    for (c, n), tab, k in zip(seqs, tables, k_all):
        slots = torch.tensor([tab[p // bs] * bs + p % bs for p in range(c + n)])
        assert torch.equal(cache[0].view(-1, KVH, D)[slots], k)
