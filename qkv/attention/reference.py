"""The reference attention backend: textbook softmax(Q K^T * scale) V over the paged cache.

Plain torch, no tricks: it is the correctness oracle every kernel is tested against.

For each sequence it gathers the keys it may see (the cached ones, read from pages, then
this step's own) into a padded [B, L] batch, masks with the causal mask, the padding
mask and the optional window, and only then writes this step's K/V into the pages. Reading
before writing matters for sliding-window rings: a chunk longer than the ring would
otherwise overwrite keys that its own first queries still need.

Cache layout per layer: ``[2, num_blocks, block_size, kv_heads, head_dim]`` (K plane, V plane).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qkv.attention import decode_native
from qkv.attention.batch import AttentionBatch
from qkv.kvcache import kv_pages
from qkv.kvcache.kv_int import hadamard
from qkv.kvcache.kv_pages import layout_of
from qkv.kvcache.kv_quant import as_stored, to_cache


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None,
                dilation: int = 1) -> torch.Tensor:
    """Which keys each query may see: causal, optionally within ``window``.

    With ``dilation`` d > 1 (Longformer's dilated window) a query at i sees i, i-d, ...,
    i-(window-1)*d. Shapes broadcast: q_pos [..., Q, 1] against k_pos [..., 1, L]."""
    dist = q_pos - k_pos
    allowed = dist >= 0
    if window is not None:
        allowed &= dist < window * dilation
        if dilation > 1:
            allowed &= dist % dilation == 0
    return allowed


def gather_keys(batch: AttentionBatch, group: int, window: int | None, align: int = 1):
    """Where each key a sequence may see lives, padded to [B, L].

    ``align``: the keys start at a multiple of it (in positions) and L is one; the keys added
    are masked (``valid`` False past the last one; before a window, ``window_mask`` hides them).

    Returns (cache slot, row of this step's k/v, whether it is this step's, key position, valid)."""
    bs = batch.block_size
    computed, qlens = batch.num_computed, batch.query_lens
    tables = batch.block_tables[group]
    ring = batch.ring_blocks[group]
    # Keys older than the window are not needed (and a ring no longer has them).
    kstart = (computed - window).clamp(min=0) if window is not None else torch.zeros_like(computed)
    kstart = kstart // align * align
    n_cached = computed - kstart
    n_keys = n_cached + qlens
    L = -(-int(n_keys.max()) // align) * align
    l_idx = torch.arange(L, device=computed.device)[None, :]
    kpos = kstart[:, None] + l_idx
    valid = l_idx < n_keys[:, None]
    blk = kpos // bs
    if ring is not None:
        blk = blk % ring
    blk = blk.clamp(max=tables.shape[1] - 1)
    slot = tables.gather(1, blk) * bs + kpos % bs
    new_row = batch.query_start_loc[:-1, None] + (l_idx - n_cached[:, None])
    is_new = l_idx >= n_cached[:, None]
    return slot, new_row, is_new, kpos, valid


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    batch: AttentionBatch, group: int, scale: float, window: int | None = None,
                    softcap: float | None = None, dilation: int = 1) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] -> out [T, H, Dv]. Writes k/v into ``kv_cache`` pages."""
    T, H, D = q.shape
    kvh = k.shape[1]
    if layout_of(kv_cache) is not None:  # int8/int4 pages: dequantized as read (kvcache/kv_pages.py)
        return packed_attention(q, k, v, kv_cache, batch, group, scale, window, softcap, dilation)
    # Attention sees this step's K/V as the cache will hold them (fp8 rounding included), so
    # a key gives the same scores whether it was computed in this step or read from a page.
    if batch.is_decode and softcap is None and dilation == 1 and not q.is_cuda:
        return decode_attention(q, k, v, kv_cache, batch, group, scale, window)
    aligned = kv_cache.dtype != k.dtype and not q.is_cuda  # the cache rounds K/V: KEY_BLOCK's note
    k, v = as_stored(k, kv_cache.dtype), as_stored(v, kv_cache.dtype)
    k_flat = kv_cache[0].view(-1, kvh, k.shape[2])
    v_flat = kv_cache[1].view(-1, kvh, v.shape[2])

    ix = step_indices(batch, group, window, dilation, aligned)
    ring = batch.ring_blocks[group] is not None
    if ring:  # read before writing: this step may reuse slots its own first queries still read
        pick_new = ix.is_new[:, :, None, None]
        keys = torch.where(pick_new, k[ix.from_step], k_flat[ix.from_cache].to(k.dtype))  # [B, L, KVH, D]
        values = torch.where(pick_new, v[ix.from_step], v_flat[ix.from_cache].to(v.dtype))
    else:  # every position has its own slot: store this step's K/V, then read all keys from pages
        write_kv(kv_cache, k, v, batch.slot_mappings[group], all_slots=True)
        keys, values = k_flat[ix.from_pages], v_flat[ix.from_pages]

    out = attend(q, keys, values, ix, batch, scale, softcap)
    if ring:
        write_kv(kv_cache, k, v, batch.slot_mappings[group])
    return out


def decode_attention(q, k, v, kv_cache, batch: AttentionBatch, group: int, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """``paged_attention`` for a decode step (one query per sequence) on the CPU: the same keys
    and mask, in a dozen ops instead of ~40 (a CPU decode step is bound by per-op cost).

    This step's K/V are written first, then every key is read from the pages: safe here even
    for a ring, whose one new slot held a position ``ring * block_size > window`` tokens back.
    The softmax(Q K^T * scale) V is computed in float32, each KV head serving its query group
    without repeating the keys (``_decode_sdpa``)."""
    T, H, D = q.shape
    kvh = k.shape[1]
    if k.shape[2] != v.shape[2]:  # K and V planes of different widths: one plane at a time
        write_kv(kv_cache, k, v, batch.slot_mappings[group], all_slots=True)
        ix = step_indices(batch, group, window)
        keys = kv_cache[0].view(-1, kvh, D)[ix.from_pages].transpose(1, 2)  # [B, KVH, L, D]
        values = kv_cache[1].view(-1, kvh, v.shape[2])[ix.from_pages].transpose(1, 2)
    else:  # both planes in one write and one gather
        ix = step_indices(batch, group, window)
        if decode_native.usable(q, kv_cache):  # bf16 pages read in place (C; attention/decode_native.py)
            return decode_native.attend(q, k, v, kv_cache, batch.slot_mappings[group], ix.from_pages,
                                        decode_mask(ix, ix.mask.shape[0], window), scale)
        return decode_pages(q, k, v, kv_cache, batch.slot_mappings[group], ix.from_pages,
                            decode_bias(ix, batch, group, window, kvh, H // kvh), scale)
    return _decode_sdpa(q, keys, values, decode_bias(ix, batch, group, window, kvh, H // kvh), scale)


def decode_bias(ix: StepIndices, batch: AttentionBatch, group: int, window: int | None, kvh: int,
                per_kv: int) -> torch.Tensor | None:
    """``decode_mask`` as an additive float32 bias, [B * KVH, H / KVH, L] of 0 and -inf, built
    once a step (``batch.scratch``) for every layer of the group: ``_decode_sdpa`` adds it in
    the scores' ``baddbmm``, where a bool mask cost each layer a scale multiply, a negation
    and a ``masked_fill`` (a 16-sequence SmolLM2 step: 30 layers of [48, 3, ~250])."""
    mask = decode_mask(ix, ix.mask.shape[0], window)
    if mask is None:
        return None
    key = ("decode_bias", group, window, kvh, per_kv)
    if key not in batch.scratch:
        B, L = mask.shape[0], mask.shape[-1]
        bias = torch.zeros(B, 1, 1, L).masked_fill_(~mask, float("-inf"))
        batch.scratch[key] = bias.expand(B, kvh, per_kv, L).reshape(B * kvh, per_kv, L)
    return batch.scratch[key]


def decode_mask(ix: StepIndices, num_seqs: int, window: int | None) -> torch.Tensor | None:
    """The mask ``decode_pages`` takes: None for one sequence without a window (every gathered
    key is visible; a window's first one may not be), else [B, 1, 1, L]."""
    return None if num_seqs == 1 and window is None else ix.mask[:, None]


def visible_pages(batch: AttentionBatch, group: int, window: int | None) -> torch.Tensor:
    """For a decode step of one sequence: the slots of exactly the keys its query sees, [1, L],
    so ``decode_pages`` needs no mask. ``gather_keys`` starts a window's keys one position early
    (``window + 1`` of them once the sequence is longer than the window, the first hidden by
    ``window_mask``); the visible ones are the last ``window`` (undilated windows only)."""
    pages = step_indices(batch, group, window).from_pages
    return pages if window is None else pages[:, -window:]


def decode_pages(q, k, v, kv_cache, slots: torch.Tensor, from_pages: torch.Tensor, mask: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """``decode_attention``'s core for K and V planes of one width, from the step's tensors only
    (engine/cpu_compile.py calls it as one opaque op): write k/v [T, KVH, D] at ``slots``, gather
    the keys at ``from_pages`` [B, L], attend. Returns [T, H, D]."""
    T, H, D = q.shape
    planes = kv_cache.view(2, -1, k.shape[1], D)
    planes[:, slots] = to_cache(torch.stack((k, v)), kv_cache.dtype)
    # index_select of whole [KVH * D] rows, then one copy that transposes and widens to float32
    # (what _decode_sdpa multiplies in), where an advanced index, a reshape copy and a float copy
    # each passed over the keys (16 sequences x 250 keys, microbenchmark: 1.6 -> 1.0 ms a layer).
    B, L = from_pages.shape
    if torch.compiler.is_compiling():  # the traced step (engine/cpu_compile.py): one op, as before
        kv = planes.flatten(2).index_select(1, from_pages.flatten()).view(2, B, L, k.shape[1], D)
    else:
        # Each plane gathered along its first dimension, into one buffer: that index_select runs
        # on both threads, the one along dimension 1 on one (16 x 258 keys, cold pages: 0.39 ->
        # 0.23 ms a layer, 2 threads).
        rows = planes.flatten(2)
        kv = torch.empty(2, B * L, rows.shape[2], dtype=rows.dtype)
        for i in (0, 1):
            torch.index_select(rows[i], 0, from_pages.flatten(), out=kv[i])
        kv = kv.view(2, B, L, k.shape[1], D)
    keys, values = kv.transpose(2, 3).to(torch.float32, memory_format=torch.contiguous_format).unbind(0)
    return _decode_sdpa(q, keys, values, mask, scale)  # keys, values [B, KVH, L, D]


def _decode_sdpa(q, keys, values, mask, scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V for one query per sequence, in float32: q [T, H, D], keys and
    values [T, KVH, L, D] (query head h reads KV head h // (H / KVH)), mask None, bool [T, 1, 1, L]
    or ``decode_bias``'s float32 [T * KVH, H / KVH, L].
    Plain matmuls: torch's fused CPU attention costs ~3x more for one query per sequence at a
    few hundred keys or several sequences (docs/benchmarks.md, 2026-12-03)."""
    T, H, D = q.shape
    kvh = keys.shape[1]
    L = keys.shape[2]
    qf = q.float().reshape(T * kvh, H // kvh, D)  # widened first: a strided bf16 q is copied once, not twice
    kt = keys.reshape(T * kvh, L, D).float().transpose(1, 2)
    if mask is not None and mask.dtype != torch.bool:  # decode_bias: scale and mask in the product
        scores = torch.baddbmm(mask, qf, kt, alpha=scale)
    else:
        scores = torch.bmm(qf, kt).view(T, kvh, H // kvh, L).mul_(scale)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(T * kvh, H // kvh, L)
    out = torch.bmm(probs, values.reshape(T * kvh, L, -1).float())  # [T * KVH, H / KVH, Dv]
    return out.to(q.dtype).view(T, H, -1)


def attend(q, keys, values, ix, batch: AttentionBatch, scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(Q K^T * scale) V of the padded queries over keys/values [B, L, KVH, D] -> [T, H, Dv]."""
    H, D, kvh = q.shape[1], q.shape[2], keys.shape[2]
    B, Qmax = batch.num_seqs, batch.max_query_len
    g = H // kvh
    qp = q[ix.q_rows].view(B, Qmax, kvh, g, D)
    if softcap is None and not q.is_cuda:
        return _attend_cpu(q, keys, values, ix, batch, scale)
    scores = torch.einsum("bqhgd,blhd->bhgql", qp.float(), keys.float()) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~ix.mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # padding query rows are all -inf (NaN), and dropped below
    out = torch.einsum("bhgql,blhd->bqhgd", probs, values.float()).reshape(B, Qmax, H, -1)
    return out.reshape(B * Qmax, H, -1).index_select(0, ix.q_packed).to(q.dtype)  # [T, H, Dv], packed order


# torch's fused CPU attention walks the keys in blocks of KEY_BLOCK (its kv_split_size) with an
# online softmax, and how it multiplies and sums a block depends on the block's length and on
# the rows of a call (1-3 rows take other code). Over a cache that rounds K/V (fp8, int8/int4,
# bf16 under float32) a step with prompt tokens gives it keys in whole KEY_BLOCKs from a
# multiple of KEY_BLOCK in positions (masked keys added, which change nothing) and rows in
# fours: every block then holds the same keys at the same offsets whatever the chunk's first
# query or the prefix hit was, so a prompt token's K/V are the same bits however its prompt was
# chunked or cached (tests/test_engine_invariance.py). Else a 1e-7 difference flips a rounding
# of the cache, and the flips grow layer by layer (Gemma 3 270M, int8: first-token logprobs
# 0.05 apart between a cold and a prefix-cached run). It costs keys: a 37-token prompt's
# attention reads 512 of them (SmolLM2, 2 cores: ~30 ms more a prefill). Float caches that
# round nothing keep the short calls (results equal to ~1e-6).
KEY_BLOCK = 512
# Query rows per call of torch's fused attention on the CPU: a block's keys end at its last
# query, so the causal mask's upper triangle is mostly skipped (the kernel itself skips it only
# for is_causal past 512 keys): a 512-token SmolLM2 prompt's attention 144 -> 110 ms (30 layers,
# 2 threads, profiler).
QUERY_BLOCK = 128
# Past this many queries a sequence with nothing cached and no window takes one is_causal call,
# which the kernel blocks itself (2,048 tokens: ~43 against ~53 ms in blocks of 128).
CAUSAL_ROWS = 512


def _attend_cpu(q, keys, values, ix, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """``attend`` on the CPU without softcap: torch's fused attention (no [B, H, Q, L] score
    tensor; query head kvh * g + j reads KV head kvh), one sequence at a time over its own keys
    in blocks of QUERY_BLOCK queries (a prompt longer than CAUSAL_ROWS with nothing cached and no
    window: one is_causal call), and the step's one-query sequences (decode rows of a mixed
    step) together through ``_decode_sdpa``. The padded batch cost every sequence the longest
    one's queries and keys (a mixed step of one 222-token chunk and 15 decode rows: 22 ms a
    SmolLM2 layer; the two prefill steps of ``qkv bench throughput``'s 16 requests 3.9-4.4 ->
    2.5-2.8 s). float32 inside, as the einsum path; returns [T, H, Dv] in q's dtype."""
    T, H, D = q.shape
    kvh = keys.shape[2]
    starts, qlens, nkeys = _host_plan(ix, batch)
    out = torch.empty(T, H, values.shape[-1], dtype=q.dtype)
    singles = [b for b, n in enumerate(qlens) if n == 1]
    if len(singles) > 1:  # one batched product for every one-query sequence
        sel = torch.tensor(singles)
        L = max(nkeys[b] for b in singles)
        rows = batch.query_start_loc[:-1].index_select(0, sel)
        ks = keys.index_select(0, sel)[:, :L].transpose(1, 2)  # [S, KVH, L, D]
        vs = values.index_select(0, sel)[:, :L].transpose(1, 2)
        mask = ix.mask.index_select(0, sel)[:, None, :1, :L]
        out[rows] = _decode_sdpa(q.index_select(0, rows), ks, vs, mask, scale)
    for b, n in enumerate(qlens):
        if n == 0 or (n == 1 and len(singles) > 1):
            continue
        if n > CAUSAL_ROWS and nkeys[b] == n and not ix.windowed:  # a whole prompt: plain causal
            qs = q[starts[b] : starts[b] + n].transpose(0, 1)[None].float()
            kb, vb = (t[b, :_keys_for(n, ix)].transpose(0, 1)[None].float() for t in (keys, values))
            out[starts[b] : starts[b] + n] = _sdpa(qs, kb, vb, None, scale, H > kvh, ix.aligned)[0].transpose(0, 1)
            continue
        for a in range(0, n, QUERY_BLOCK):
            e = min(n, a + QUERY_BLOCK)
            L = _keys_for(nkeys[b] - (n - e), ix)  # keys up to this block's last query (later ones are masked)
            qb = q[starts[b] + a : starts[b] + e].transpose(0, 1)[None].float()  # [1, H, Q, D]
            kb = keys[b, :L].transpose(0, 1)[None].float()
            vb = values[b, :L].transpose(0, 1)[None].float()
            ob = _sdpa(qb, kb, vb, ix.mask[b, None, None, a:e, :L], scale, H > kvh, ix.aligned)
            out[starts[b] + a : starts[b] + e] = ob[0].transpose(0, 1)
    return out


def _keys_for(n: int, ix: StepIndices) -> int:
    """The keys a call reads for ``n`` needed: whole KEY_BLOCKs when ``ix.aligned``."""
    return -(-n // KEY_BLOCK) * KEY_BLOCK if ix.aligned else n


def _sdpa(q, k, v, mask, scale: float, gqa: bool, aligned: bool) -> torch.Tensor:
    """torch's fused attention of q [1, H, Q, D] (``mask`` None: causal); ``aligned``: Q padded
    to a multiple of 4 rows (copies of the last, dropped after), as KEY_BLOCK's note says."""
    Q = q.shape[2]
    pad = -Q % 4 if aligned else 0
    if pad:
        q = torch.cat([q, q[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        if mask is not None:
            mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                           scale=scale, enable_gqa=gqa)
    return out[:, :, :Q] if pad else out


def _host_plan(ix: StepIndices, batch: AttentionBatch) -> tuple[list[int], list[int], list[int]]:
    """(first packed row, query count, key count) of each sequence as Python ints: one host
    read a step (kept in ``batch.scratch``), not one a layer."""
    key = ("host_plan", id(ix))
    if key not in batch.scratch:
        # One past the last key any of its queries sees (keys are a prefix; a window may hide the first).
        seen = ix.mask.any(dim=1) * torch.arange(1, ix.mask.shape[-1] + 1)
        nkeys = seen.amax(dim=1)
        batch.scratch[key] = (batch.query_start_loc[:-1].tolist(), batch.query_lens.tolist(), nkeys.tolist())
    return batch.scratch[key]


def packed_attention(q, k, v, kv_cache, batch: AttentionBatch, group: int, scale: float, window=None,
                     softcap=None, dilation: int = 1) -> torch.Tensor:
    """``paged_attention`` over packed int8/int4 pages: cached K/V are dequantized as they are
    gathered, this step's own K/V are used as stored (quantized and dequantized), and the
    step's K/V are written (quantized) after they are read, as for a ring."""
    raw_k, raw_v = k, v
    k, v = kv_pages.stored(kv_cache, 0, k), kv_pages.stored(kv_cache, 1, v)
    ix = step_indices(batch, group, window, dilation, aligned=not q.is_cuda)
    pick_new = ix.is_new[:, :, None, None]
    keys = torch.where(pick_new, k[ix.from_step], kv_pages.read(kv_cache, 0, ix.from_cache, k.dtype))
    values = torch.where(pick_new, v[ix.from_step], kv_pages.read(kv_cache, 1, ix.from_cache, v.dtype))
    # Rotated planes (kv_pages): score the rotated query, rotate the output back.
    out = attend(hadamard(q) if kv_pages.rotated(kv_cache, 0) else q, keys, values, ix, batch, scale, softcap)
    if kv_pages.rotated(kv_cache, 1):
        out = hadamard(out)
    k, v = raw_k, raw_v
    slots = batch.slot_mappings[group]
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    kv_pages.write(kv_cache, 0, k, slots)
    kv_pages.write(kv_cache, 1, v, slots)
    return out


class StepIndices(NamedTuple):
    from_pages: torch.Tensor  # slot of every key position
    from_cache: torch.Tensor  # slot of keys cached before this step (0 elsewhere)
    from_step: torch.Tensor  # row of this step's k/v (0 elsewhere)
    is_new: torch.Tensor  # the key is this step's
    q_rows: torch.Tensor  # packed row of each padded query
    q_valid: torch.Tensor
    q_packed: torch.Tensor  # flat [B*Q] index of each valid query, in packed order
    mask: torch.Tensor  # causal & window & padding
    windowed: bool = False  # a window (or dilation) masks more than causality and padding
    aligned: bool = False  # keys in whole KEY_BLOCKs from a multiple of it (gather_keys)


def step_indices(batch: AttentionBatch, group: int, window: int | None = None, dilation: int = 1,
                 aligned: bool = False):
    """Gather indices and the mask for one layer group, computed once per step (every layer of
    the group reuses them from ``batch.scratch``). ``aligned``: keys in whole KEY_BLOCKs (a CPU
    step with prompt tokens over a cache that rounds K/V; decode steps ignore it).

    Key indices are [B, L], query indices [B, Q], the mask [B, Q, L]."""
    aligned = aligned and not batch.is_decode
    key = ("step_indices", group, window, dilation, aligned)
    if key not in batch.scratch:
        slot, new_row, is_new, kpos, valid = gather_keys(batch, group, window * dilation if window else None,
                                                         KEY_BLOCK if aligned else 1)
        from_pages = torch.where(valid, slot, 0)
        from_cache = torch.where(valid & ~is_new, slot, 0)
        from_step = torch.where(valid & is_new, new_row, 0)
        q_idx = torch.arange(batch.max_query_len, device=slot.device)[None, :]
        q_valid = q_idx < batch.query_lens[:, None]
        q_rows = torch.where(q_valid, batch.query_start_loc[:-1, None] + q_idx, 0)
        q_pos = batch.num_computed[:, None] + q_idx
        mask = window_mask(q_pos[:, :, None], kpos[:, None, :], window, dilation) & valid[:, None, :]
        q_packed = q_valid.flatten().nonzero().squeeze(1)
        batch.scratch[key] = StepIndices(from_pages, from_cache, from_step, is_new, q_rows, q_valid, q_packed, mask,
                                         window is not None or dilation > 1, aligned)
    return batch.scratch[key]


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             all_slots: bool = False) -> None:
    """Store this step's K/V at their slots; rows with slot -1 are skipped (only rings have them:
    ``all_slots`` says there are none, which saves a check)."""
    kvh = k.shape[1]
    if not all_slots:
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    kv_cache[0].view(-1, kvh, k.shape[2])[slot_mapping] = to_cache(k, kv_cache.dtype)
    kv_cache[1].view(-1, kvh, v.shape[2])[slot_mapping] = to_cache(v, kv_cache.dtype)
