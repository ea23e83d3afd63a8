"""The CPU decode step's short paths (qkv/attention/reference.py ``decode_attention``, the merged
Q|K rotation in model/attention.py, the one-op RMSNorm): the same numbers as the textbook
paths they skip, on batches of several sequences, sliding windows, rings and fp8 pages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.attention.batch import AttentionBatch
from qkv.attention.reference import paged_attention
from qkv.model.layers import RMSNorm

BS = 4


def make_step(lens: list[int], ring: int | None, max_query_len: int = 1):
    """A decode step of sequences with ``lens`` cached tokens each (own blocks, in order)."""
    nblk = max(lens) // BS + 2 if ring is None else ring
    tables = torch.arange(len(lens) * nblk).view(len(lens), nblk)
    slots = [int(tables[b, (n // BS) % nblk]) * BS + n % BS for b, n in enumerate(lens)]
    t = torch.tensor
    batch = AttentionBatch(query_start_loc=t([0, *range(1, len(lens) + 1)]), num_computed=t(lens),
                           query_lens=torch.ones(len(lens), dtype=torch.long), max_query_len=max_query_len,
                           max_seq_len=max(lens) + 1, block_size=BS, block_tables=[tables],
                           slot_mappings=[t(slots)], ring_blocks=[ring])
    return batch, tables, nblk


@pytest.mark.parametrize("window,ring,dtype", [(None, None, torch.float32), (None, None, torch.bfloat16),
                                               (6, None, torch.float32), (6, 3, torch.float32),
                                               (None, None, torch.float8_e4m3fn)])
def test_decode_attention_is_the_textbook_attention(window, ring, dtype):
    torch.manual_seed(0)
    H, KVH, D = 6, 2, 16
    lens = [9, 3, 14] if ring is None else [9, 5, 11]
    batch, tables, nblk = make_step(lens, ring)
    cdt = torch.float32 if dtype == torch.float8_e4m3fn else dtype
    cache = torch.zeros(2, tables.numel(), BS, KVH, D, dtype=dtype)
    for b, n in enumerate(lens):  # the history: random keys at each position's slot
        for p in range(max(0, n - (ring or 99) * BS + BS), n):
            blk = tables[b, (p // BS) % nblk]
            cache[:, blk, p % BS] = torch.randn(2, KVH, D).to(dtype)
    q, k, v = torch.randn(3, H, D).to(cdt), torch.randn(3, KVH, D).to(cdt), torch.randn(3, KVH, D).to(cdt)
    fast_cache, slow_cache = cache.clone(), cache.clone()
    fast = paged_attention(q, k, v, fast_cache, batch, 0, 0.25, window)
    # max_query_len 2 is padding only, but it is not a decode step: the padded textbook path.
    slow = paged_attention(q, k, v, slow_cache, make_step(lens, ring, max_query_len=2)[0], 0, 0.25, window)
    assert fast.dtype == slow.dtype == cdt
    tol = 1e-5 if cdt == torch.float32 else 1e-2
    torch.testing.assert_close(fast, slow, atol=tol, rtol=tol)
    assert torch.equal(fast_cache.float(), slow_cache.float())  # the same K/V were written
    # And the plain formula, for the first sequence: its visible keys from the pages.
    n = lens[0]
    first = max(0, n + 1 - window) if window else 0
    pos = torch.arange(first, n + 1)
    slot = tables[0, (pos // BS) % nblk] * BS + pos % BS
    keys = slow_cache[0].reshape(-1, KVH, D)[slot].float().repeat_interleave(H // KVH, dim=1)  # [L, H, D]
    vals = slow_cache[1].reshape(-1, KVH, D)[slot].float().repeat_interleave(H // KVH, dim=1)
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q[0].float(), keys) * 0.25, dim=-1)
    torch.testing.assert_close(fast[0].float(), torch.einsum("hl,lhd->hd", probs, vals), atol=tol * 5, rtol=tol * 5)


def test_one_op_rms_norm_is_the_two_step_norm():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64)
    x = torch.randn(5, 64)
    assert torch.equal(norm(x), norm.weight * F.rms_norm(x, (64,), eps=1e-6))  # float32: bitwise
    norm16 = RMSNorm(64, 1e-6).to(torch.bfloat16)
    norm16.weight.data = norm.weight.data.bfloat16()
    exact = norm.weight.bfloat16().float() * F.rms_norm(x.bfloat16().float(), (64,), eps=1e-6)
    # bf16: one rounding, of the product (the two-step form rounds twice)
    assert (norm16(x.bfloat16()).float() - exact).abs().max() <= exact.abs().max() / 128


def test_merged_rotation_matches_hf_decode(tiny_model):
    """Greedy decode of the engine (merged Q|K rotation, decode attention) against HF's own."""
    from qkv import LLM, SamplingParams

    path, hf = tiny_model("qwen2")  # biased QKV, one KV head
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=64, quantization="none")
    ids = [3, 17, 42, 99, 5, 8]
    out = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert out.token_ids == ref
    full = llm.logits(ids + out.token_ids[:-1])  # prefill: the textbook path
    hf_logits = hf(torch.tensor([ids + out.token_ids[:-1]])).logits[0]
    torch.testing.assert_close(full, hf_logits, atol=1e-4, rtol=1e-4)
