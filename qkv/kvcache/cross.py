"""Cross-attention (encoder-decoder) caches: which layers have one, and how the pools are split.

An encoder-decoder model (Whisper) has two attentions per decoder layer. Self-attention caches
the decoder's own tokens in the usual paged way. Cross-attention reads K/V computed from the
encoder output: a fixed ``encoder_len`` entries per request (1500 for Whisper's 30-second
window), written once when the request's encoder runs (engine/encoder.py), read by every
decoder step, never appended to and never keyed in the prefix cache, freed with the request.

Cache layer numbering: decoder layer ``i``'s self-attention is cache layer ``i`` (its spec is
``layer_types[i]``), its cross-attention is cache layer ``num_layers + i``. All cross layers
have equal specs, so they form one layer group with one pool.
"""

from __future__ import annotations

from qkv.kvcache.spec import CrossAttention, cdiv


def encoder_len(config) -> int:
    """Encoder output positions of ``config`` (a ModelConfig); 0 for a decoder-only model."""
    return int((config.extra or {}).get("encoder_len") or 0)


def cross_specs(config, dtype_bytes) -> list[CrossAttention]:
    """One CrossAttention spec per decoder layer of an encoder-decoder model, else none."""
    n = encoder_len(config)
    if not n:
        return []
    return [CrossAttention(config.num_kv_heads, config.head_dim, dtype_bytes, encoder_len=n)] * config.num_layers


def cross_pool_blocks(spec: CrossAttention, block_size: int, max_num_seqs: int, budget_bytes: int,
                      self_bytes_per_seq: int, cross_block_bytes: int) -> int:
    """Blocks of the cross pool for a budget: enough for S requests, where S is the number of
    seats (at most ``max_num_seqs``) whose cross blocks *and* whole self-attention context
    (``self_bytes_per_seq``, the decoder at its longest) fit the budget together; at least one
    request's. The self-attention groups then take the rest of the budget, so S requests can
    always run to their full length at once."""
    per_req = spec.blocks_needed(0, block_size)
    seat = per_req * cross_block_bytes + self_bytes_per_seq
    seats = max(1, min(max_num_seqs, budget_bytes // seat))
    return seats * per_req


def cross_blocks_per_seq(encoder_len_: int, block_size: int) -> int:
    return cdiv(encoder_len_, block_size)


def plan_with_cross(specs, block_size: int, max_num_seqs: int, budget_bytes: int | None,
                    num_blocks: int | None, max_model_len: int | None, **self_kwargs) -> list[int]:
    """``plan_num_blocks`` for a model with cross layers (kvcache/plan.py calls this): the
    cross pool first (``cross_pool_blocks``; an int ``num_blocks`` gives it at most that many,
    capped by ``max_num_seqs`` requests), then the self-attention groups split the rest of the
    budget by plan.py's own rule. Counts come back in ``group_layers`` order."""
    from qkv.kvcache.manager import group_layers
    from qkv.kvcache.plan import plan_num_blocks

    grouped = group_layers(specs)
    self_specs = [s for s in specs if not isinstance(s, CrossAttention)]
    cross_groups = [(s, layers) for s, layers in grouped if isinstance(s, CrossAttention)]
    counts: dict[CrossAttention, int] = {}
    spent = 0
    for spec, layers in cross_groups:
        block_bytes = spec.bytes_per_token * block_size * len(layers)
        if num_blocks is not None:
            counts[spec] = min(num_blocks, max_num_seqs * spec.blocks_needed(0, block_size))
        else:
            longest = max_model_len or spec.encoder_len
            self_seq = sum(s.bytes_per_token * block_size * len(ls) * s.blocks_needed(longest, block_size)
                           for s, ls in group_layers(self_specs))
            counts[spec] = cross_pool_blocks(spec, block_size, max_num_seqs, budget_bytes, self_seq, block_bytes)
        spent += counts[spec] * block_bytes
    rest = plan_num_blocks(self_specs, block_size, max_num_seqs, None if num_blocks is not None else
                           max(0, budget_bytes - spent), num_blocks, **self_kwargs) if self_specs else []
    it = iter(rest)
    return [counts[s] if isinstance(s, CrossAttention) else next(it) for s, _ in grouped]
