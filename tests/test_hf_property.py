"""Property: for any valid HF config of a claimed architecture, qkv equals HF transformers.

Hypothesis draws a config (family, head layout GQA/MQA/MHA, head_dim != hidden/heads, biases,
tied embeddings, sliding windows and layer_types, RoPE scaling), builds the HF model with random
weights, saves it, loads the directory with ``qkv.LLM`` and checks fp32 logits over a prompt
longer than any window (1e-4 relative) and a few greedy tokens against ``generate``.
Derandomized, so a failure reproduces; sizes are tiny so the file runs in well under a minute.
"""

from __future__ import annotations

import math

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qkv import LLM, SamplingParams

N_GEN = 4
FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3_text", "deepseek_v2", "deepseek_v3"]
ROPE_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "deepseek_v2", "deepseek_v3"}


def hf_builds_deepseek_longrope() -> bool:
    """Whether this transformers builds a DeepSeek model with longrope. 5.17's attention reads
    ``rope_parameters["factor"]`` for every non-default type (for an mscale it then leaves
    unused when ``mscale_all_dim`` is unset) and longrope has none: KeyError in HF's own
    constructor. 5.25 builds it. Probed, not version-compared."""
    try:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m
    except ImportError:  # pragma: no cover - depends on the installed transformers
        return False
    try:
        m.yarn_apply_mscale({"rope_type": "longrope"}, 1.0)
    except KeyError:
        return False
    return True


@st.composite
def rope_scaling(draw, rot_dim: int, prompt_len: int, longrope: bool = True) -> tuple[dict | None, int]:
    """(rope scaling dict or None, max_position_embeddings)."""
    kind = draw(st.sampled_from(["none", "linear", "dynamic", "yarn", "llama3"] + (["longrope"] if longrope else [])))
    factor = draw(st.sampled_from([1.5, 2.0, 4.0]))
    orig = draw(st.integers(6, 2 * prompt_len))  # below or above the prompt: both branches
    if kind == "none":
        return None, 128
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}, 128
    if kind == "dynamic":
        # The rescaling starts past max_position_embeddings, so set it below the prompt; the
        # model's context is max_position_embeddings * factor (ModelConfig.max_context).
        return {"rope_type": "dynamic", "factor": factor}, draw(st.integers(max(6, math.ceil(prompt_len / factor)),
                                                                            prompt_len - 2))
    if kind == "yarn":
        s = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
        if draw(st.booleans()):
            s.update(beta_fast=draw(st.sampled_from([8, 32])), beta_slow=draw(st.sampled_from([1, 2])))
        return s, 128
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": orig}, 128
    n = rot_dim // 2
    short = draw(st.lists(st.floats(1.0, 2.0), min_size=n, max_size=n))
    long = draw(st.lists(st.floats(1.0, 8.0), min_size=n, max_size=n))
    return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": orig}, 128


@st.composite
def hf_case(draw, family: str):
    """(family, transformers config kwargs, prompt length)."""
    prompt_len = draw(st.integers(12, 24))
    vocab = draw(st.integers(64, 128))
    layers = draw(st.integers(1, 3))
    kw: dict = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    if family == "gpt2":
        heads = draw(st.sampled_from([2, 4]))
        kw.update(n_embd=heads * draw(st.sampled_from([8, 16])), n_layer=layers, n_head=heads, n_positions=128,
                  tie_word_embeddings=draw(st.booleans()))
        return family, kw, prompt_len
    heads = draw(st.sampled_from([2, 4, 8]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))  # MQA..MHA
    hidden = draw(st.sampled_from([32, 48, 64]))
    kw.update(hidden_size=hidden, intermediate_size=draw(st.sampled_from([32, 64, 96])), num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=draw(st.booleans()),
              rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])))
    window = draw(st.integers(3, prompt_len - 4))
    if family.startswith("deepseek"):
        rope_dim = draw(st.sampled_from([4, 8]))
        kw.update(kv_lora_rank=draw(st.sampled_from([16, 24])), q_lora_rank=draw(st.sampled_from([None, 24])),
                  qk_nope_head_dim=draw(st.sampled_from([8, 16])), qk_rope_head_dim=rope_dim,
                  v_head_dim=draw(st.sampled_from([8, 12])), num_key_value_heads=heads,
                  attention_bias=draw(st.booleans()), n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, n_shared_experts=draw(st.sampled_from([0, 1])),
                  first_k_dense_replace=draw(st.integers(0, layers)), n_group=2, topk_group=1,
                  norm_topk_prob=draw(st.booleans()), routed_scaling_factor=1.5)
        if family == "deepseek_v2":
            kw.update(topk_method=draw(st.sampled_from(["greedy", "group_limited_greedy"])),
                      mlp_bias=draw(st.booleans()))
        else:
            kw["rope_interleave"] = draw(st.booleans())
        rot_dim = rope_dim
    else:
        # None: hidden / heads. Qwen3 and Gemma 3 default head_dim to 128 / 256: always give it.
        head_dim = draw(st.sampled_from([8, 16, 24] + ([] if family in ("qwen3", "gemma3_text") else [None])))
        if head_dim:
            kw["head_dim"] = head_dim
        rot_dim = head_dim or hidden // heads
    if family in ("llama", "qwen3", "gemma3_text"):
        kw["attention_bias"] = draw(st.booleans())
    if family == "llama":
        kw["mlp_bias"] = draw(st.booleans())
    if family == "mistral":
        kw["sliding_window"] = draw(st.sampled_from([None, window]))
    if family in ("qwen2", "qwen3"):
        use = draw(st.booleans())
        kw.update(use_sliding_window=use, sliding_window=window, max_window_layers=draw(st.integers(0, layers)))
        if use and draw(st.booleans()):  # explicit layer_types, independent of max_window_layers
            kw["layer_types"] = draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]),
                                              min_size=layers, max_size=layers))
    if family == "gemma3_text":
        kw.update(sliding_window=window, query_pre_attn_scalar=draw(st.sampled_from([16, 24])),
                  final_logit_softcapping=draw(st.sampled_from([None, 30.0])),
                  layer_types=draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]),
                                            min_size=layers, max_size=layers)))
    longrope = not family.startswith("deepseek") or hf_builds_deepseek_longrope()
    scaling, max_pos = draw(rope_scaling(rot_dim, prompt_len, longrope)) if family in ROPE_FAMILIES else (None, 128)
    kw["max_position_embeddings"] = max_pos
    theta = draw(st.sampled_from([10000.0, 1e6]))
    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    if family == "gemma3_text":
        kw["rope_parameters"] = {"full_attention": params,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    else:
        kw["rope_parameters"] = params
    return family, kw, prompt_len


def build_hf(family: str, kw: dict, seed: int):
    import transformers as tf

    classes = {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel), "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM),
    }
    cfg_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF zero/one-initializes these: random values prove qkv reads them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or name.endswith("mlp.gate.weight"):
                p.copy_((1.0 if "norm" in name and family != "gemma3_text" else 0.0)
                        + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_qkv_equals_hf(family, data, seed):
    family, kw, prompt_len = data.draw(hf_case(family))
    rope = kw.get("rope_parameters", {})
    event(f"{family} rope={rope.get('full_attention', rope).get('rope_type', 'default')}")
    hf = build_hf(family, kw, seed)
    ids = torch.randint(2, kw["vocab_size"], (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = llm.logits(ids)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-4, f"{family} {kw}: logits differ by {err:.2e} relative"

    # The engine caps a request at the model's context, so generation starts from a prompt
    # that leaves room for N_GEN tokens.
    prompt = ids[: min(prompt_len, llm.engine.max_model_len - N_GEN)]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=N_GEN, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    out = llm.generate([prompt], SamplingParams(max_tokens=N_GEN, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want, f"{family} {kw}: greedy tokens differ"
    assert llm.stats()["num_blocks_in_use"] == 0
