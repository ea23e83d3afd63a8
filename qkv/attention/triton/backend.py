"""The Triton attention backend: same signature and results as ``reference.paged_attention``.

Decode steps (one new token per sequence) write K/V first and run the split-K GQA decode
kernel over the pages; every other step runs the varlen prefill kernel (cached prefix from
pages, new keys from ``k``/``v``) and writes K/V after. Nothing here reads a device value on
the host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from qkv.attention.batch import AttentionBatch
from qkv.attention.triton import pdl
from qkv.attention.triton.decode import paged_decode
from qkv.attention.triton.kv_write import write_kv
from qkv.attention.triton import order as launch_order  # looked up at call time
from qkv.attention.triton.prefill import paged_prefill
from qkv.kvcache.kv_pages import layout_of


def decode_keys(batch: AttentionBatch, max_keys: int) -> int | None:
    """The key count a decode step's launch sizes its splits by: None inside a CUDA graph, whose
    one capture replays for every length (the kernel then takes its graph-safe split count)."""
    capturing = batch.graph or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    return None if capturing else max_keys


def packed_attention(q, k, v, kv_cache, batch: AttentionBatch, group: int, scale: float, window, softcap):
    """int8/int4 pages, read as they are (widened tile by tile in registers): decode steps write
    (quantizing) and run the packed decode kernel; other steps run the packed prefill kernel
    (it writes the step's K/V itself, and hands a mixed step's one-token sequences to the
    decode kernel)."""
    from qkv.attention.triton.packed import packed_decode, write_packed
    from qkv.attention.triton.packed_prefill import packed_prefill

    if not batch.is_decode:
        return packed_prefill(q, k, v, kv_cache, batch.block_tables[group], batch.slot_mappings[group],
                              batch.query_start_loc, batch.num_computed, batch.max_query_len, scale, window,
                              batch.ring_blocks[group], softcap, mixed=batch.num_seqs > 1,
                              max_seq_len=batch.max_seq_len if window is None else min(batch.max_seq_len, window),
                              scratch=batch.scratch)
    write_packed(kv_cache, k, v, batch.slot_mappings[group])
    return packed_decode(q, kv_cache, batch.block_tables[group], batch.num_computed, scale, window,
                         batch.ring_blocks[group], softcap, max_seq_len=decode_keys(batch, batch.max_seq_len),
                         query_start_loc=batch.query_start_loc,
                         order=launch_order.longest_first(batch.num_computed, k.shape[1], batch.scratch))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    batch: AttentionBatch, group: int, scale: float, window: int | None = None,
                    softcap: float | None = None, dilation: int = 1) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] -> out [T, H, D]. Writes k/v into ``kv_cache`` pages."""
    if layout_of(kv_cache) is not None:  # dilated windows over packed pages: refused in check_supported
        return packed_attention(q, k, v, kv_cache, batch, group, scale, window, softcap)
    ring = batch.ring_blocks[group]
    table = batch.block_tables[group]
    slots = batch.slot_mappings[group]
    # The most keys a query reads, which sizes the decode kernel's splits: a window caps it (a
    # dilated one at the same W keys, though they span W*d positions).
    max_keys = batch.max_seq_len if window is None else min(batch.max_seq_len, window)
    if batch.is_decode:
        write_kv(kv_cache, k, v, slots)
        return paged_decode(q, kv_cache, table, batch.num_computed, scale, window, ring, softcap,
                            max_seq_len=decode_keys(batch, max_keys),
                            query_start_loc=batch.query_start_loc, dilation=dilation,
                            static_inputs=batch.graph and pdl.MODE != 0,
                            order=launch_order.longest_first(batch.num_computed, k.shape[1], batch.scratch))
    # A mixed step (decodes beside prefill chunks): the prefill kernel takes the multi-token
    # sequences and reads before the write; the GQA decode kernel takes the one-token ones
    # after it. Which is which is read on the device, so the host never waits.
    mixed = batch.num_seqs > 1
    out = paged_prefill(q, k, v, kv_cache, table, batch.query_start_loc, batch.num_computed,
                        batch.max_query_len, scale, window, ring, softcap, skip_decode=mixed, dilation=dilation)
    write_kv(kv_cache, k, v, slots)
    if mixed:
        paged_decode(q, kv_cache, table, batch.num_computed, scale, window, ring, softcap,
                     max_seq_len=max_keys, query_start_loc=batch.query_start_loc, out=out,
                     dilation=dilation, order=launch_order.longest_first(batch.num_computed, k.shape[1], batch.scratch))
    return out
