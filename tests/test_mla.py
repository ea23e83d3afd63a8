"""MLA (DeepSeek-V2/V3) parity with HF transformers, naive vs absorbed decode, latent-only cache."""

from __future__ import annotations

import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.kvcache.spec import MLA

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
MOE = dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
           first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5)

CASES = {
    "v2-dense-noqlora": ("v2", dict(q_lora_rank=None, first_k_dense_replace=2, n_routed_experts=8,
                                    moe_intermediate_size=32, num_experts_per_tok=2)),
    "v2-moe-yarn-grouped": ("v2", dict(q_lora_rank=40, rope_parameters=YARN, topk_method="group_limited_greedy",
                                       **MOE)),
    "v2-moe-greedy": ("v2", dict(q_lora_rank=40, topk_method="greedy", **MOE)),
    "v3-moe-yarn": ("v3", dict(q_lora_rank=40, rope_parameters=YARN, norm_topk_prob=True, **MOE)),
    "v3-noqlora-nointerleave": ("v3", dict(q_lora_rank=None, rope_interleave=False, **MOE)),
}


def tiny_deepseek(tmp_path, version: str, seed: int = 0, **overrides):
    import transformers as tf

    cfg_cls, model_cls = ((tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM) if version == "v2"
                          else (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM))
    cfg = cfg_cls(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF zero/one-initializes these; random values exercise them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    path = tmp_path / f"deepseek-{version}-{seed}"
    model.save_pretrained(path)
    return str(path), model


def set_mode(llm: LLM, mode: str) -> None:
    for m in llm.engine.model.attention_layers():
        m.mode = mode


@pytest.mark.parametrize("case", list(CASES))
def test_mla_parity(tmp_path, case):
    version, overrides = CASES[case]
    path, hf = tiny_deepseek(tmp_path, version, **overrides)
    prompt = torch.randint(2, 256, (60,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    llm = LLM(path, dtype="float32", device="cpu", block_size=8, num_kv_blocks=64, max_num_batched_tokens=24)
    # The cache is the latent only: one [R + P] row per token, no per-head K/V.
    specs = {g.spec for g in llm.engine.kv.groups}
    assert specs == {MLA(BASE["kv_lora_rank"], BASE["qk_rope_head_dim"], 4)}
    for m in llm.engine.model.attention_layers():
        assert m.kv_cache.shape[1:] == (8, BASE["kv_lora_rank"] + BASE["qk_rope_head_dim"])
    outs = {}
    for mode in ("naive", "absorbed"):
        set_mode(llm, mode)
        ours = llm.logits(prompt)
        err = ((ours - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-4, f"{mode}: logits relative error {err:.2e}"
        params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        outs[mode] = llm.generate(prompt, params)[0].token_ids
        assert outs[mode] == hf_out, mode
    assert outs["naive"] == outs["absorbed"]


def test_absorbed_equals_naive_decode(tmp_path):
    """Mixed prefill+decode batches: both modes produce the same logits step by step."""
    path, _ = tiny_deepseek(tmp_path, "v3", q_lora_rank=40, rope_parameters=YARN, **MOE)
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=128)
    prompts = [torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 33, 70)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    set_mode(llm, "naive")
    naive = [o.token_ids for o in llm.generate(prompts, params)]
    set_mode(llm, "absorbed")
    absorbed = [o.token_ids for o in llm.generate(prompts, params)]
    assert naive == absorbed
    seq = prompts[1] + absorbed[1]
    a = llm.logits(seq)
    set_mode(llm, "naive")
    n = llm.logits(seq)
    assert ((a - n).abs().max() / n.abs().max()).item() < 1e-5


def test_mla_bad_mode(tmp_path, monkeypatch):
    path, _ = tiny_deepseek(tmp_path, "v2", q_lora_rank=None)
    monkeypatch.setenv("QKV_MLA_MODE", "fast")
    with pytest.raises(ValueError, match="MLA mode"):
        LLM(path, dtype="float32", device="cpu", num_kv_blocks=16)


def test_moe_stacked_weights_are_the_expert_parameters(tmp_path):
    """The grouped GEMM's [E, 2I, H] / [E, H, I] weights (``MoE.stacked_weights``) hold the
    loaded experts without a second copy: after stacking the layer's output is unchanged, each
    expert's parameter is a view of the stack (a later load writes both), and a ``.to()``
    that moves the parameters is noticed and re-stacked."""
    from qkv.model.moe import MoE

    version, overrides = CASES["v3-moe-yarn"]
    path, _ = tiny_deepseek(tmp_path, version, **overrides)
    llm = LLM(path, dtype="float32", device="cpu", block_size=8, num_kv_blocks=16)
    moe = next(m for m in llm.engine.model.modules() if isinstance(m, MoE))
    x = torch.randn(7, BASE["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = moe(x)
        w13, w2 = moe.stacked_weights()
        torch.testing.assert_close(moe(x), before, rtol=1e-6, atol=1e-6)  # same weights; the copy may change summation order
        assert torch.equal(w2[3], moe.experts[3].down_proj.weight)
        moe.experts[3].down_proj.weight.copy_(torch.zeros_like(w2[3]))
        assert not w2[3].any()
        assert moe.stacked_weights()[0] is w13  # unchanged parameters: the same stack
        moe.to(torch.float64)
        w13_64, _ = moe.stacked_weights()
        assert w13_64.dtype == torch.float64 and w13_64[0].data_ptr() == moe.experts[0].gate_up_proj.weight.data_ptr()


def test_mixed_steps_split_and_match_one_by_one(tmp_path):
    """Decodes beside prefill chunks in one step: the reference MLA attends them as two
    sub-batches (no padding of every decode to the chunk's length), and the tokens equal
    those of each request run alone."""
    from qkv.attention import mla_reference

    version, overrides = CASES["v2-moe-greedy"]
    path, _ = tiny_deepseek(tmp_path, version, **overrides)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 256, (n,), generator=gen).tolist() for n in (30, 5, 47, 12)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = LLM(path, dtype="float32", device="cpu", block_size=8, num_kv_blocks=64)
    ref = [alone.generate(p, params)[0].token_ids for p in prompts]
    splits = []
    real = mla_reference.split_mixed
    mla_reference.split_mixed = lambda b, g: splits.append(real(b, g)) or splits[-1]
    try:
        llm = LLM(path, dtype="float32", device="cpu", block_size=8, num_kv_blocks=64, max_num_batched_tokens=16)
        got = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        mla_reference.split_mixed = real
    assert got == ref
    assert any(s is not None for s in splits)  # mixed steps did happen, and were split
    assert llm.stats()["num_blocks_in_use"] == 0
