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

Covered: the Llama family (Llama, Mistral, Qwen2, SmolLM2) with RoPE from a table (no
dynamic/longrope scaling), full attention in float (or fp8) pages, one layer group. Anything
else is refused by name when the engine is built (``unsupported``).
"""

from __future__ import annotations

import torch

from qkv.attention import reference
from qkv.attention.batch import AttentionBatch
from qkv.model.layers import rotate


def unsupported(model, runner) -> str | None:
    """Why this model and cache cannot run the compiled step, or None when they can."""
    from qkv.kvcache.kv_pages import layout_of
    from qkv.model.layers import GatedMLP
    from qkv.model.llama import LlamaForCausalLM

    if type(model) is not LlamaForCausalLM:
        return f"{type(model).__name__} (it covers the Llama family only)"
    if len(runner.kv.groups) != 1:
        return "several KV cache groups"
    for layer in model.model.layers:
        a = layer.self_attn
        if a.q_norm is not None or a.rope is None or a.rope.threshold is not None:
            return "QK norms or length-dependent RoPE scaling"
        if a.window is not None or a.dilation != 1:
            return "sliding-window attention"
        if layout_of(a.kv_cache) is not None or a.kv_cache.shape[-1] != a.head_dim:
            return "int8/int4 KV pages"
        if not isinstance(layer.mlp, GatedMLP):
            return "a non-gated MLP"
    return None


class CompiledDecode:
    """``run(input_ids, positions, batch)`` for a decode batch: the model's final hidden
    states [T, hidden], as ``model(input_ids, positions, batch)`` returns them."""

    def __init__(self, model):
        self.model = model
        # The modules do not change once built: no guard checks on their tensors per call.
        self._step = torch.compile(self._layers, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        ix = reference.step_indices(batch, 0)
        mask = reference.decode_mask(ix, batch.num_seqs, None)
        pages = ix.from_pages
        # The key count grows each step and the batch size varies: symbolic from the first
        # call, so they compile once (sizes 0 and 1 are specialized by torch: batch 1 has
        # no mask, its own graph).
        torch._dynamo.maybe_mark_dynamic(pages, 1)
        if mask is not None:
            torch._dynamo.maybe_mark_dynamic(mask, 3)
            for t in (input_ids, positions, batch.slot_mappings[0], pages, mask):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        return self._step(input_ids, positions, batch.slot_mappings[0], pages, mask)

    def _layers(self, input_ids, positions, slots, pages, mask):
        rope = self.model.model.layers[0].self_attn.rope
        cos, sin = rope.cos[positions][:, None, :], rope.sin[positions][:, None, :]
        caches = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        return decode_layers(self.model, input_ids, cos, sin, slots, pages, mask, caches)


def decode_layers(model, input_ids, cos, sin, slots, pages, mask, caches):
    """LlamaForCausalLM.forward for a decode step with the attention inlined (same modules, same
    math): RoPE by ``cos``/``sin`` [T, 1, head_dim] (the table's rows at the positions), each
    layer's K/V written into ``caches[i]`` at ``slots``. Also the function engine/cpu_aoti.py
    exports."""
    body = model.model
    x = body.embed_tokens(input_ids)
    T = x.shape[0]
    residual = None
    for layer, cache in zip(body.layers, caches):
        a = layer.self_attn
        if residual is None:
            residual, h = x, layer.input_layernorm(x)
        else:
            h, residual = layer.input_layernorm.add_norm(x, residual)
        qkv = a.qkv_proj(h)
        H, KVH, D = a.num_heads, a.num_kv_heads, a.head_dim
        qk = rotate(qkv[:, : a.q_size + a.kv_size].view(T, H + KVH, D), cos, sin)
        q, k = qk.split([H, KVH], dim=1)
        v = qkv[:, a.q_size + a.kv_size :].view(T, KVH, D)
        out = reference.decode_pages(q, k, v, cache, slots, pages, mask, a.scale)
        h, residual = layer.post_attention_layernorm.add_norm(a.o_proj(out.reshape(T, a.q_size)), residual)
        x = layer.mlp(h)
    return body.norm.add_norm(x, residual)[0]
