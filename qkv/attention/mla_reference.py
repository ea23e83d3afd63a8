"""Reference paged MLA attention over the latent cache (DeepSeek-V2/V3).

The cache holds, per token, only ``[c_KV | k_rope]``: the normalized KV latent
(``kv_lora_rank``) and the one RoPE key shared by all heads (``rope_dim``). Layout per
layer: ``[num_blocks, block_size, kv_lora_rank + rope_dim]`` (spec ``MLA.cache_shape``).

Two mathematically equal ways to attend, selected by ``absorbed``:
  - naive: up-project every visible latent to per-head K_nope and V
    (``W_UK``, ``W_UV`` = the two halves of ``kv_b_proj``), then ordinary MHA;
  - absorbed: fold ``W_UK`` into the query (``q_lat = q_nope W_UK``, one R-vector per head)
    and ``W_UV`` into the output (``out = (P c_KV) W_UV^T``), so attention runs as MQA with
    one shared "KV head" of width R (+ the RoPE part) straight over the cached latents. This
    is the decode path that keeps MLA's memory advantage: nothing per-head is materialized
    per cached token.

Like the dense reference, it reads every visible key before writing this step's entries.
"""

from __future__ import annotations

import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.reference import step_indices
from qkv.kvcache import kv_pages
from qkv.kvcache.kv_pages import layout_of
from qkv.kvcache.kv_quant import to_cache


def mla_paged_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        kv_cache: torch.Tensor, batch: AttentionBatch, group: int, scale: float,
                        w_uk: torch.Tensor, w_uv: torch.Tensor, absorbed: bool) -> torch.Tensor:
    """Attention of this step's queries over the cached and new latents; writes the new ones.

    q_nope [T, H, Dn], q_pe [T, H, P] (RoPE applied), c_kv [T, R] (normalized latent),
    k_pe [T, P] (RoPE applied), w_uk [H, Dn, R], w_uv [H, Dv, R]. Returns [T, H, Dv].
    """
    subsets = split_mixed(batch, group)
    if subsets is not None:
        out = None
        for rows, sub in subsets:
            part = mla_paged_attention(q_nope[rows], q_pe[rows], c_kv[rows], k_pe[rows], kv_cache, sub, group,
                                       scale, w_uk, w_uv, absorbed)
            if out is None:
                out = part.new_empty((q_nope.shape[0],) + part.shape[1:])
            out[rows] = part
        return out
    R, P = c_kv.shape[1], k_pe.shape[1]
    packed = layout_of(kv_cache) is not None  # int8/int4 latent rows (kvcache/kv_pages.py)
    if packed:
        new = kv_pages.stored(kv_cache, 0, torch.cat([c_kv, k_pe], dim=-1)[:, None])[:, 0]
    else:
        flat = kv_cache.view(-1, R + P)
        new = to_cache(torch.cat([c_kv, k_pe], dim=-1), flat.dtype)
    ix = step_indices(batch, group)
    from_cache, from_step, q_rows, q_valid = ix.from_cache, ix.from_step, ix.q_rows, ix.q_valid
    pick_new, mask = ix.is_new[:, :, None], ix.mask[:, None]
    # Cached latents come from the pages, this step's from ``new``: no copy of the whole cache.
    cached = (kv_pages.read(kv_cache, 0, from_cache, c_kv.dtype)[..., 0, :].float() if packed
              else flat[from_cache].float())
    entries = torch.where(pick_new, new[from_step].float(), cached)  # [B, L, R + P]
    lat, rope_k = entries[..., :R], entries[..., R:]
    qn, qp = q_nope[q_rows].float(), q_pe[q_rows].float()  # [B, Q, H, *]

    rope_scores = torch.einsum("bqhp,blp->bhql", qp, rope_k)
    if absorbed:
        q_lat = torch.einsum("bqhd,hdr->bqhr", qn, w_uk.float())
        scores = torch.einsum("bqhr,blr->bhql", q_lat, lat) + rope_scores
    else:
        k_nope = torch.einsum("blr,hdr->blhd", lat, w_uk.float())
        values = torch.einsum("blr,hdr->blhd", lat, w_uv.float())
        scores = torch.einsum("bqhd,blhd->bhql", qn, k_nope) + rope_scores
    scores = scores.masked_fill(~mask, float("-inf")) * scale
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if absorbed:
        o_lat = torch.einsum("bhql,blr->bqhr", probs, lat)
        out = torch.einsum("bqhr,hvr->bqhv", o_lat, w_uv.float())
    else:
        out = torch.einsum("bhql,blhv->bqhv", probs, values)
    out = out[q_valid].to(q_nope.dtype)

    keep = batch.slot_mappings[group] >= 0
    if packed:  # stored from the unrounded rows: quantizing ``new`` again would round twice
        kv_pages.write(kv_cache, 0, torch.cat([c_kv, k_pe], dim=-1)[keep][:, None], batch.slot_mappings[group][keep])
    else:
        flat[batch.slot_mappings[group][keep]] = new[keep]
    return out


def split_mixed(batch: AttentionBatch, group: int):
    """A step that mixes one-token decodes with longer chunks, as two sub-batches: padded
    together, every decode would carry the longest chunk's query rows ([B, Q, L] scores: 256
    decodes beside a 512-token chunk take gigabytes). Returns None for a uniform step, else
    [(token rows, sub-batch)], computed once per step (every layer of the group reuses it)."""
    if batch.num_seqs < 2 or batch.max_query_len == 1:
        return None
    key = ("mla_split", group)
    if key not in batch.scratch:
        qlens, computed = batch.query_lens.tolist(), batch.num_computed.tolist()
        starts = batch.query_start_loc.tolist()
        kinds = [[b for b, n in enumerate(qlens) if n == 1], [b for b, n in enumerate(qlens) if n > 1]]
        subsets = None
        if all(kinds):
            subsets = []
            dev = batch.query_lens.device
            for seqs in kinds:
                rows = [t for b in seqs for t in range(starts[b], starts[b + 1])]
                idx, rows_t = torch.tensor(seqs, device=dev), torch.tensor(rows, device=dev)
                lens = [qlens[b] for b in seqs]
                qsl = torch.tensor([0] + lens, device=dev).cumsum(0)
                sub = AttentionBatch(
                    query_start_loc=qsl, num_computed=batch.num_computed[idx], query_lens=batch.query_lens[idx],
                    max_query_len=max(lens), max_seq_len=max(computed[b] + qlens[b] for b in seqs),
                    block_size=batch.block_size, block_tables=[t[idx] for t in batch.block_tables],
                    slot_mappings=[m[rows_t] for m in batch.slot_mappings], ring_blocks=batch.ring_blocks)
                subsets.append((rows_t, sub))
        batch.scratch[key] = subsets
    return batch.scratch[key]
