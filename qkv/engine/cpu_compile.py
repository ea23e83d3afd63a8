"""A CPU decode step run as one compiled graph (``LLM(..., compile_decode=True)``, ``--compile``).

Batch-1 decode on a CPU is a chain of ~1,100 small ops per step for SmolLM2 (~37 a layer):
each pays Python and dispatcher cost that the weights' bytes do not explain
(docs/benchmarks.md). Here the layers of a Llama-family model run as one ``torch.compile``
graph (inductor's C++ backend): norms, residual adds, RoPE and the SwiGLU product fuse into
a few C++ loops, and the int4/int8 matmuls are called from the compiled wrapper. The
attention is the reference backend's ``decode_pages``, traced into the graph: its cache
write becomes an in-place scatter (inductor re-inplaces it; the pages are never copied), and
the number of keys it gathers grows every step, so it is symbolic: one compile serves every
length (an opaque custom op instead cost ~0.1 ms a call in Python wrapping, 3 ms a step).

The eager model stays the oracle: prefill, mixed steps and any step this graph does not
cover run eagerly, and tests/test_cpu_compile.py checks the compiled step against it. The
first decode step compiles (tens of seconds on 2 cores; torch caches the result on disk, so
a later process re-traces in a few seconds): opt-in, not the default, since it would cost
the first token that long. engine/cpu_aoti.py compiles the same step (``decode_layers``) ahead
of time, once per model, and is the default where that package exists.

Covered: the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2) and Gemma 3 (QK norms, its
(1 + w) sandwich norms and embedding scale, GeGLU) with RoPE from tables (no dynamic/longrope
scaling; Gemma's local and global tables both), attention in float (or fp8) pages, full or in
an undilated sliding window, any number of layer groups. The step gathers each attention view's
keys (a cache group with its window, ``plan``) once, as the eager layers do
(``reference.step_indices``). Anything else is refused by name when the engine is built
(``unsupported``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qkv.attention import reference
from qkv.attention.batch import AttentionBatch
from qkv.model.layers import rotate


def unsupported(model, runner) -> str | None:
    """Why this model and cache cannot run the compiled step, or None when they can."""
    from qkv.kvcache.kv_pages import layout_of
    from qkv.model.gemma3 import Gemma3ForCausalLM
    from qkv.model.layers import GatedMLP
    from qkv.model.llama import LlamaForCausalLM

    if type(model) not in (LlamaForCausalLM, Gemma3ForCausalLM):
        return f"{type(model).__name__} (it covers the Llama family and Gemma 3 only)"
    for layer in model.model.layers:
        a = layer.self_attn
        if a.rope is None or a.rope.threshold is not None:
            return "length-dependent RoPE scaling"
        if a.dilation != 1:
            return "dilated sliding windows"
        if layout_of(a.kv_cache) is not None or a.kv_cache.shape[-1] != a.head_dim:
            return "int8/int4 KV pages"
        if not isinstance(layer.mlp, GatedMLP):
            return "a non-gated MLP"
    return None


class Plan(NamedTuple):
    """What a decode step's layers share, in first-use order: the RoPE tables (Gemma 3: a local
    and a global one) and the attention views, one per (cache group, window) (Gemma 3: the
    sliding layers' and the global layers'); each layer's index into both; Gemma's embedding
    scale as the activation dtype rounds it (a Python number: computed here, outside any trace)."""

    ropes: list  # RotaryEmbedding modules
    views: list[tuple[int, int | None]]  # (group, window)
    layers: list[tuple[int, int]]  # (rope index, view index) of each layer
    embed_scale: float | None


def plan(model) -> Plan:
    from qkv.model.gemma3 import Gemma3ForCausalLM

    ropes, views, layers = [], [], []
    for layer in model.model.layers:
        a = layer.self_attn
        if not any(r is a.rope for r in ropes):
            ropes.append(a.rope)
        if (a.group, a.window) not in views:
            views.append((a.group, a.window))
        layers.append((next(i for i, r in enumerate(ropes) if r is a.rope), views.index((a.group, a.window))))
    scale = None
    if isinstance(model, Gemma3ForCausalLM):  # HF rounds it to the activation dtype (Gemma3ForCausalLM.forward)
        scale = torch.tensor(model.embed_scale, dtype=model.model.embed_tokens.weight.dtype).item()
    return Plan(ropes, views, layers, scale)


class CompiledDecode:
    """``run(input_ids, positions, batch)`` for a decode batch: the model's final hidden
    states [T, hidden], as ``model(input_ids, positions, batch)`` returns them."""

    def __init__(self, model):
        self.model = model
        self.plan = plan(model)
        # The modules do not change once built: no guard checks on their tensors per call.
        self._step = torch.compile(self._layers, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        slots, pages, masks = [], [], []
        for group, window in self.plan.views:
            ix = reference.step_indices(batch, group, window)
            mask = reference.decode_mask(ix, batch.num_seqs, window)
            # The key count grows each step and the batch size varies: symbolic from the first
            # call, so they compile once (sizes 0 and 1 are specialized by torch: batch 1 has
            # no mask without a window, its own graph).
            torch._dynamo.maybe_mark_dynamic(ix.from_pages, 1)
            if mask is not None:
                torch._dynamo.maybe_mark_dynamic(mask, 3)
            if batch.num_seqs > 1:
                for t in (batch.slot_mappings[group], ix.from_pages, mask):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            slots.append(batch.slot_mappings[group])
            pages.append(ix.from_pages)
            masks.append(mask)
        if batch.num_seqs > 1:
            for t in (input_ids, positions):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return self._step(input_ids, positions, slots, pages, masks)

    def _layers(self, input_ids, positions, slots, pages, masks):
        ropes = [(r.cos[positions][:, None, :], r.sin[positions][:, None, :]) for r in self.plan.ropes]
        caches = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        return decode_layers(self.model, self.plan, input_ids, ropes, list(zip(slots, pages, masks)), caches)


def decode_layers(model, step: Plan, input_ids, ropes, views, caches, native: bool = False):
    """The model's forward for a decode step with the attention inlined (same modules, same
    math). ``ropes``: (cos, sin) [T, 1, head_dim] (the table's rows at the positions) of each of
    ``plan(model).ropes``; ``views``: (slots [T], pages [B, L], mask [B, 1, 1, L] or None) of each
    of its views, as ``reference.decode_pages`` takes them; each layer's K/V written into
    ``caches[i]``; ``step``: ``plan(model)``. Also the function engine/cpu_aoti.py exports.
    ``native``: the attention is the C kernel's operator ``qkv::decode_attn`` (bf16 pages and
    activations; each view's mask then bool [B, L]), as the eager batched step runs it."""
    body = model.model
    x = body.embed_tokens(input_ids)
    if step.embed_scale is not None:  # Gemma 3: its sandwich norms, no fused residual adds
        x = x * step.embed_scale
        for layer, cache, (r, w) in zip(body.layers, caches, step.layers):
            h = _attention(layer.self_attn, layer.input_layernorm(x), ropes[r], views[w], cache, native)
            x = x + layer.post_attention_layernorm(h)
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        return body.norm(x)
    residual = None
    for layer, cache, (r, w) in zip(body.layers, caches, step.layers):
        if residual is None:
            residual, h = x, layer.input_layernorm(x)
        else:
            h, residual = layer.input_layernorm.add_norm(x, residual)
        h = _attention(layer.self_attn, h, ropes[r], views[w], cache, native)
        h, residual = layer.post_attention_layernorm.add_norm(h, residual)
        x = layer.mlp(h)
    return body.norm.add_norm(x, residual)[0]


def _attention(a, h, rope, view, cache, native: bool = False):
    """``Attention.forward`` for a decode step (reference backend, float pages): the QKV
    projection, QK norms if any, RoPE by the gathered cos/sin, ``decode_pages`` (``native``: the
    k/v write, then ``qkv::decode_attn``), the output projection."""
    (cos, sin), (slots, pages, mask) = rope, view
    qkv = a.qkv_proj(h)
    T = qkv.shape[0]
    H, KVH, D = a.num_heads, a.num_kv_heads, a.head_dim
    if a.q_norm is None:  # Q and K side by side: one rotation, as Attention.forward
        qk = rotate(qkv[:, : a.q_size + a.kv_size].view(T, H + KVH, D), cos, sin)
        q, k = qk.split([H, KVH], dim=1)
    else:
        q = rotate(a.q_norm(qkv[:, : a.q_size].view(T, H, D)), cos, sin)
        k = rotate(a.k_norm(qkv[:, a.q_size : a.q_size + a.kv_size].view(T, KVH, D)), cos, sin)
    v = qkv[:, a.q_size + a.kv_size :].view(T, KVH, D)
    if native:
        from qkv.attention import decode_native

        decode_native.write(k, v, cache, slots)
        out = decode_native.op()(q, cache, pages, mask, a.scale)
    else:
        out = reference.decode_pages(q, k, v, cache, slots, pages, mask, a.scale)
    return a.o_proj(out.reshape(T, a.q_size))
