"""Named model shapes with random weights, for benchmarks that must download nothing.

``--random-weights SHAPE`` builds one of ``SHAPES`` as a ``ModelConfig``; the engine then
creates the parameters directly on the GPU in the chosen dtype (normal, std 0.02), so an
8B model costs no host memory and no disk. The numbers are the published configs' fields.
"""

from __future__ import annotations

import argparse

from qkv.config import ModelConfig

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(  # Meta-Llama-3-8B
        model_type="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, max_position_embeddings=8192, norm_eps=1e-5, rope_theta=500000.0,
        bos_token_id=128000, eos_token_ids=[128001]),
    "llama3.2-1b": dict(  # Llama-3.2-1B (its llama3 RoPE scaling left out: it changes no cost)
        model_type="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=[128001, 128008, 128009]),
    "qwen3-0.6b": dict(  # Qwen3-0.6B
        model_type="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
        head_dim=128, intermediate_size=3072, max_position_embeddings=40960, norm_eps=1e-6, rope_theta=1000000.0,
        qk_norm=True, tie_word_embeddings=True, eos_token_ids=[151645]),
    "deepseek-v2-lite": dict(  # DeepSeek-V2-Lite: MLA, 64 routed experts of which 6 active, 2 shared
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, num_layers=27, num_heads=16,
        num_kv_heads=16, head_dim=192, intermediate_size=10944, max_position_embeddings=163840, norm_eps=1e-6,
        rope_theta=10000.0, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, layer_types=["mla"] * 27, eos_token_ids=[100001],
        extra=dict(n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
                   first_k_dense_replace=1, moe_layer_freq=1, routed_scaling_factor=1.0, topk_method="greedy",
                   n_group=1, topk_group=1, norm_topk_prob=False, scoring_func="softmax")),
}


def shape_config(name: str, tokenizer=None) -> ModelConfig:
    """The shape's config; with a ``tokenizer``, its vocabulary, BOS and EOS ids replace the shape's."""
    try:
        fields = dict(SHAPES[name])
    except KeyError:
        raise ValueError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})") from None
    if tokenizer is not None:
        fields.update(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                      eos_token_ids=list(tokenizer.eos_token_ids))
    return ModelConfig(**fields)


def random_engine(name: str, device: str = "cuda", dtype: str = "bfloat16", tokenizer=None, **engine_kwargs):
    """An LLMEngine of shape ``name`` with random weights made on ``device`` (and ``tokenizer``'s
    vocabulary when one is given)."""
    from qkv.engine.engine import LLMEngine

    return LLMEngine(shape_config(name, tokenizer), None, tokenizer, device=device, dtype=dtype, **engine_kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--random-weights", metavar="SHAPE", default=None, choices=sorted(SHAPES),
                   help=f"benchmark a named shape with random weights ({', '.join(SHAPES)}); downloads nothing")


def random_llm(name: str, device: str = "cuda", dtype: str = "bfloat16", tokenizer=None, **engine_kwargs):
    """An ``LLM`` (the offline API) over ``random_engine``: for benchmarks written against LLM.
    Without a ``tokenizer`` prompts must be token ids."""
    from qkv.engine.llm import LLM

    llm = LLM.__new__(LLM)
    llm.engine = random_engine(name, device, dtype, tokenizer, **engine_kwargs)
    llm.config = llm.engine.config
    llm.tokenizer = tokenizer
    llm.source = f"random:{name}"
    llm.generation_defaults = {}
    return llm
