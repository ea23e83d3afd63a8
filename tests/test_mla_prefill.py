"""The Triton MLA prefill/extend path (qkv/attention/triton/mla_step.py, mla_prefill.py)
against the reference MLA (qkv/attention/mla_reference.py), the oracle.

Kernel-level cases run on the GPU, or without one under Triton's interpreter on small shapes;
end-to-end cases (tiny DeepSeek-V2/V3 checkpoints) need a CUDA GPU and skip otherwise.
"""

from __future__ import annotations

import pytest
import torch

from test_triton import CUDA, DEV, greedy_by_variant, gpu, make_batch  # noqa: E402  (sets TRITON_INTERPRET)

from qkv.attention import mla_reference  # noqa: E402
from qkv.attention.triton import mla as triton_mla  # noqa: E402

# (cached tokens, new tokens) per sequence: prompts, prefix hits / later chunks, and mixed
# steps where one-token decodes sit beside chunks.
STEPS = {
    "prompts": ([0, 0], [13, 29]),
    "prefix-and-chunks": ([16, 5], [20, 9]),
    "mixed": ([30, 0, 17, 8], [1, 11, 1, 6]),
    "one-long-chunk": ([21], [40]),
}


def run_step(computed, qlens, H, R, P, DN, DV, dtype, cache_dtype=None, seed=0, bs=8, separate=False):
    """One MLA step through the Triton backend and through the reference, each on its own copy
    of the same shuffled pages. Returns (triton out, reference out, triton cache, reference cache)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + q) // bs) for c, q in zip(computed, qlens)) + 3
    batch = make_batch(computed, qlens, bs, num_blocks, None, gen)
    T = sum(qlens)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)  # noqa: E731
    cache = torch.randn(num_blocks, bs, R + P, generator=gen).to(DEV, cache_dtype or dtype)
    q_nope, q_pe, c_kv, k_pe = rnd(T, H, DN), rnd(T, H, P), rnd(T, R), rnd(T, P)
    w = rnd(H, DN + DV, R) / R ** 0.5
    w_uk, w_uv = w[:, :DN], w[:, DN:]  # views of one kv_b_proj weight, as the layer passes them
    if separate:  # two unrelated tensors: the up-projection's two-GEMM path
        w_uk, w_uv = w_uk.clone(), w_uv.clone()
    scale = (DN + P) ** -0.5
    ours_cache, ref_cache = cache.clone(), cache.clone()
    ours = triton_mla.mla_paged_attention(q_nope, q_pe, c_kv, k_pe, ours_cache, batch, 0, scale, w_uk, w_uv, True)
    ref = mla_reference.mla_paged_attention(q_nope, q_pe, c_kv, k_pe, ref_cache, batch, 0, scale, w_uk, w_uv, True)
    return ours, ref, ours_cache, ref_cache


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("latent", ["pow2", "odd"])
def test_extend_matches_reference_fp32(step, latent):
    """fp32, small heads: the output and the written pages equal the reference's. With a
    power-of-two latent the decodes of a mixed step go through the absorbed decode kernel;
    with an odd one (24 + 8, as the tiny HF configs) every sequence is up-projected (and the
    up-projection takes its two-GEMM path)."""
    computed, qlens = STEPS[step]
    R, P = (32, 16) if latent == "pow2" else (24, 8)
    ours, ref, oc, rc = run_step(computed, qlens, H=3, R=R, P=P, DN=16, DV=12, dtype=torch.float32,
                                 separate=latent == "odd")
    assert ours.shape == ref.shape == (sum(qlens), 3, 12)
    assert rel(ours, ref) < (1e-4 if not CUDA else 1e-3), step
    assert torch.equal(oc, rc)


def test_prefill_plan_rows():
    """The plan routes one-token sequences to the decode kernel and the rest, with their
    prefixes, to the prefill kernel; its key buffer puts each sequence's prefix then chunk."""
    from qkv.attention.triton.mla_step import plan

    batch = make_batch([30, 0, 17, 8], [1, 11, 1, 6], 8, 20, None, torch.Generator().manual_seed(0))
    p = plan(batch, absorb_decodes=True)
    assert p.dec_seqs.tolist() == [0, 2] and p.dec_rows.tolist() == [0, 12]
    assert p.q_start.tolist() == [1, 13] and p.q_len.tolist() == [11, 6]
    assert p.k_start.tolist() == [0, 11] and p.nc.tolist() == [0, 8] and p.num_keys == 25
    assert p.new_dst.tolist() == list(range(11)) + list(range(19, 25))
    assert p.ctx_dst.tolist() == list(range(11, 19)) and p.ctx_pos.tolist() == list(range(8))
    assert plan(batch, absorb_decodes=True) is p  # once per step, every layer reuses it
    assert plan(batch, absorb_decodes=False).dec_seqs is None


@gpu
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("cache", ["bf16", "fp8"])
def test_extend_matches_reference_deepseek_shape(step, cache):
    """DeepSeek-V2-Lite's head shapes (16 heads, latent 512 + 64, 128 | 128) in bf16, over a
    bf16 or fp8 latent cache: close to the reference (which computes in fp32 from the same
    stored rows), and the pages written alike."""
    computed, qlens = STEPS[step]
    computed = [c * 20 for c in computed]  # longer prefixes: several key tiles
    qlens = [q * 10 if q > 1 else 1 for q in qlens]
    cdt = torch.float8_e4m3fn if cache == "fp8" else None
    ours, ref, oc, rc = run_step(computed, qlens, H=16, R=512, P=64, DN=128, DV=128, dtype=torch.bfloat16,
                                 cache_dtype=cdt)
    assert rel(ours, ref) < 2e-2
    assert torch.equal(oc.view(torch.uint8), rc.view(torch.uint8))


MODELS = {
    "v2-greedy": ("v2", dict(topk_method="greedy")),
    "v2-group-limited": ("v2", dict(topk_method="group_limited_greedy")),
    "v3-noaux-tc": ("v3", dict(norm_topk_prob=True)),
}


def deepseek(tmp_path, name):
    from test_mla import MOE, tiny_deepseek

    version, extra = MODELS[name]
    return tiny_deepseek(tmp_path, version, kv_lora_rank=32, qk_rope_head_dim=16, q_lora_rank=None,
                         **dict(MOE, **extra))[0]


def prompts_with_prefixes(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(2, 250, (n,), generator=g).tolist() for n in (37, 5, 70, 23)]
    ps.append(ps[2][:48] + [9, 9, 9])  # a prefix-cache hit of 3 blocks on prompt 2
    ps.append(ps[0] + [7] * 20)  # prompt 0 whole, then 20 tokens more
    return ps


@gpu
@pytest.mark.parametrize("name,kv_dtype", [("v2-greedy", "auto"), ("v2-group-limited", "fp8"),
                                           ("v3-noaux-tc", "auto"), ("v3-noaux-tc", "fp8"),
                                           ("v2-greedy", "int8"), ("v3-noaux-tc", "int4")])
def test_engine_prefill_matches_reference(tmp_path, name, kv_dtype):
    """Greedy tokens of tiny DeepSeek-V2/V3 models: reference backend == Triton eager == Triton
    with CUDA graphs, over an fp32, fp8, int8 or int4 latent cache (int: mla_packed's kernels).
    A 16-token budget chunks every prompt and puts decodes beside chunks (mixed steps); the
    last two prompts reuse earlier prompts' cached blocks (prefix-cache hits, asserted)."""
    path = deepseek(tmp_path, name)
    results = greedy_by_variant(path, prompts_with_prefixes(), 12, block_size=16, num_kv_blocks=64,
                                max_num_seqs=4, max_num_batched_tokens=16, kv_dtype=kv_dtype)
    assert results["triton-eager"] == results["reference"]
    assert results["triton-graphs"] == results["reference"]
    hits = [cached for _, cached in results["triton-eager"]]
    assert hits[4] >= 32 and hits[5] >= 32, hits


@gpu
@pytest.mark.parametrize("name", ["v2-greedy", "v3-noaux-tc"])
def test_engine_prefill_logits_close(tmp_path, name):
    """All-position logits of a 90-token prompt in 16-token chunks: Triton within 1e-3 of the
    reference backend (fp32)."""
    from qkv import LLM

    path = deepseek(tmp_path, name)
    prompt = torch.randint(2, 250, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    logits = {}
    for be in ("reference", "triton"):
        llm = LLM(path, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64,
                  max_num_batched_tokens=16, attention_backend=be, enforce_eager=True)
        logits[be] = llm.logits(prompt)
    err = ((logits["triton"] - logits["reference"]).abs().max() / logits["reference"].abs().max()).item()
    assert err < 1e-3, f"relative error {err:.2e}"
