"""One MLA step that has prompt or chunk tokens: decodes absorbed, prefill chunks up-projected.

The choice is per sequence, as vLLM makes it. A one-token sequence (a decode beside the
chunks of a mixed step) is memory-bound: the absorbed decode kernel (``mla.py``) reads each
cached latent row once for all heads. A multi-token sequence is compute-bound: its keys'
latents are up-projected once and ``mla_prefill.py`` runs causal flash attention at
``Dn + P + Dv`` per query/key/head instead of ``2R + P``. Both read the same pages, both in
one forward pass: no decode is padded to the chunk's length.

The token rows of each kind are planned on the host once per step from the runner's lengths
(``batch.scratch["host_lens"]``; one device read when a caller did not provide them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.triton.mla_prefill import mla_prefill
from qkv.kvcache import kv_pages
from qkv.kvcache.kv_pages import layout_of
from qkv.kvcache.kv_quant import as_stored


@dataclass
class StepPlan:
    """Index tensors (on the device) of one step's two kinds of sequences."""
    dec_seqs: torch.Tensor | None  # [D] one-token sequences, None when there are none
    dec_rows: torch.Tensor | None  # [D] their token rows
    q_start: torch.Tensor  # [S] per prefill sequence: first token row, query count,
    q_len: torch.Tensor  #     first row in the key buffer, cached prefix length
    k_start: torch.Tensor
    nc: torch.Tensor
    max_query_len: int
    num_keys: int  # rows of the key buffer: sum over prefill sequences of nc + q_len
    identity: bool  # the key buffer is this step's rows as they are (no prefix, no decodes)
    new_src: torch.Tensor | None  # token rows of the prefill sequences -> key rows new_dst
    new_dst: torch.Tensor | None
    ctx_seq: torch.Tensor | None  # prefix keys: sequence index, position -> key rows ctx_dst
    ctx_pos: torch.Tensor | None
    ctx_dst: torch.Tensor | None


def host_lens(batch: AttentionBatch) -> tuple[list[int], list[int]]:
    """(query lengths, cached lengths) per sequence as host lists."""
    if "host_lens" not in batch.scratch:
        batch.scratch["host_lens"] = (batch.query_lens.tolist(), batch.num_computed.tolist())
    return batch.scratch["host_lens"]


def plan(batch: AttentionBatch, absorb_decodes: bool) -> StepPlan:
    """The step's plan, built once and reused by every layer. ``absorb_decodes`` False sends
    one-token sequences through the prefill kernel too (latent sizes the decode kernel lacks)."""
    key = ("mla_plan", absorb_decodes)
    if key in batch.scratch:
        return batch.scratch[key]
    qlens, computed = host_lens(batch)
    qlens, computed = np.asarray(qlens, dtype=np.int64), np.asarray(computed, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(qlens)[:-1]]) if len(qlens) else np.zeros(0, np.int64)
    is_dec = (qlens == 1) if absorb_decodes else np.zeros(len(qlens), bool)
    dec, pre = np.nonzero(is_dec)[0], np.nonzero(~is_dec)[0]
    dev = batch.query_lens.device
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(dev, non_blocking=True)  # noqa: E731
    kl = computed[pre] + qlens[pre]
    k_start = np.concatenate([[0], np.cumsum(kl)[:-1]]) if len(pre) else np.zeros(0, np.int64)
    identity = len(dec) == 0 and not computed.any()
    new_src = new_dst = ctx_seq = ctx_pos = ctx_dst = None
    if not identity:
        new_src = np.concatenate([np.arange(starts[b], starts[b] + qlens[b]) for b in pre] or [np.zeros(0)])
        new_dst = np.concatenate([k_start[i] + computed[b] + np.arange(qlens[b]) for i, b in enumerate(pre)]
                                 or [np.zeros(0)])
        ctx = [(i, b) for i, b in enumerate(pre) if computed[b]]
        if ctx:
            ctx_seq = t(np.concatenate([np.full(computed[b], b) for _, b in ctx]))
            ctx_pos = t(np.concatenate([np.arange(computed[b]) for _, b in ctx]))
            ctx_dst = t(np.concatenate([k_start[i] + np.arange(computed[b]) for i, b in ctx]))
        new_src, new_dst = t(new_src), t(new_dst)
    p = StepPlan(dec_seqs=t(dec) if len(dec) else None, dec_rows=t(starts[dec]) if len(dec) else None,
                 q_start=t(starts[pre]), q_len=t(qlens[pre]), k_start=t(k_start if not identity else starts[pre]),
                 nc=t(computed[pre]), max_query_len=int(qlens[pre].max()) if len(pre) else 0,
                 num_keys=int(kl.sum()), identity=identity, new_src=new_src, new_dst=new_dst,
                 ctx_seq=ctx_seq, ctx_pos=ctx_pos, ctx_dst=ctx_dst)
    batch.scratch[key] = p
    return p


def up_project(lat: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lat [K, R] -> (k_nope [K, H, Dn], v [K, H, Dv]), views of one [K, H, Dn + Dv] product.
    When w_uk/w_uv are the two halves of one ``kv_b_proj`` weight (the layer's ``up_weights``)
    that is a single GEMM over the weight as stored; otherwise one per half."""
    H, DN, R = w_uk.shape
    DV = w_uv.shape[1]
    es = w_uk.element_size()
    halves = (w_uk.stride() == ((DN + DV) * R, R, 1) and w_uv.stride() == w_uk.stride()
              and w_uv.data_ptr() == w_uk.data_ptr() + DN * R * es)
    if not halves:
        return (torch.matmul(lat, w_uk.transpose(1, 2)).transpose(0, 1),
                torch.matmul(lat, w_uv.transpose(1, 2)).transpose(0, 1))
    w = torch.as_strided(w_uk, (H * (DN + DV), R), (R, 1))  # kv_b_proj.weight itself
    kv = (lat @ w.T).view(lat.shape[0], H, DN + DV)
    return kv[..., :DN], kv[..., DN:]


def mla_extend(q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               kv_cache: torch.Tensor, batch: AttentionBatch, group: int, scale: float, w_uk: torch.Tensor,
               w_uv: torch.Tensor) -> torch.Tensor:
    """The reference's contract (``mla_reference.mla_paged_attention``, absorbed or not: equal
    results) for a step with prompt tokens. Writes this step's latent rows to ``kv_cache``
    first; returns [T, H, Dv] in q_nope's dtype. Allocates the per-step key buffers (freed on
    return): ``(prefix + chunk) x H x (Dn + Dv)`` per prefill sequence."""
    from qkv.attention.triton.mla import mla_decode, store_rows

    R, P = c_kv.shape[1], k_pe.shape[1]
    pow2 = R & (R - 1) == 0 and P & (P - 1) == 0
    p = plan(batch, absorb_decodes=pow2)
    rows = torch.cat([c_kv, k_pe], dim=-1)
    lay = layout_of(kv_cache)  # int8/int4 latent pages (the caller checked mla_packed.kernels_read)
    store_rows(kv_cache, rows, R, batch.slot_mappings[group])
    T, H, _ = q_nope.shape
    out = q_nope.new_empty((T, H, w_uv.shape[1]))
    dt = q_nope.dtype
    if p.dec_rows is not None:
        q_lat = torch.einsum("thd,hdr->thr", q_nope[p.dec_rows], w_uk.to(dt))
        o_lat = mla_decode(q_lat, q_pe[p.dec_rows].contiguous(), kv_cache, batch.block_tables[group][p.dec_seqs],
                           batch.num_computed[p.dec_seqs], scale)
        out[p.dec_rows] = torch.einsum("thr,hvr->thv", o_lat, w_uv.to(o_lat.dtype))
    if p.num_keys == 0:
        return out
    # The keys as the cache holds them (an fp8 or int cache rounds them), widened to the compute
    # dtype. Over packed pages the prefix rows are dequantized as gathered: the up-projection
    # below turns them into per-head keys and values anyway.
    stored = kv_pages.stored(kv_cache, 0, rows[:, None])[:, 0] if lay is not None else as_stored(rows, kv_cache.dtype)
    if p.identity:
        keys = stored
    else:
        keys = stored.new_empty((p.num_keys, R + P))
        keys[p.new_dst] = stored[p.new_src]
        if p.ctx_dst is not None:
            bs = lay.block_size if lay is not None else kv_cache.shape[1]
            table = batch.block_tables[group]
            slots = table[p.ctx_seq, p.ctx_pos // bs] * bs + p.ctx_pos % bs
            if lay is not None:
                keys[p.ctx_dst] = kv_pages.read(kv_cache, 0, slots, keys.dtype)[:, 0]
            else:
                keys[p.ctx_dst] = kv_cache.view(-1, R + P)[slots].to(keys.dtype)
    k_nope, v = up_project(keys[:, :R].to(dt), w_uk.to(dt), w_uv.to(dt))
    mla_prefill(q_nope, q_pe, k_nope, v, keys[:, R:].to(dt), p.q_start, p.q_len, p.k_start, p.nc,
                p.max_query_len, scale, out)
    return out
