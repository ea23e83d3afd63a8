"""Config corners where qkv must read ``config.json`` exactly as HF transformers does.

Each parity test builds a tiny random HF model, saves it, loads it with qkv and compares
fp32 logits (1e-4 relative) over a prompt longer than any sliding window.
"""

from __future__ import annotations

import json

import pytest
import torch

from qkv import LLM
from qkv.config import ConfigError, ModelConfig

from conftest import tiny_config

PROMPT = torch.randint(2, 256, (24,), generator=torch.Generator().manual_seed(7)).tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build(tmp_path, family: str, seed: int = 0, **overrides):
    cfg, cls = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF initializes biases to zero: random ones prove they are loaded
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    path = tmp_path / family
    model.save_pretrained(path)
    return str(path), model


def assert_logits_match(path: str, hf) -> LLM:
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT])).logits[0]
    assert rel_err(llm.logits(PROMPT), ref) < 1e-4
    return llm


# ------------------------------------------------------------------ layer_types
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_layer_types_win_over_max_window_layers(tmp_path, family):
    """max_window_layers=2 alone would make layers 2, 3 sliding; layer_types says 0 and 2."""
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    path, hf = build(tmp_path, family, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                     layer_types=types, num_hidden_layers=4)
    llm = assert_logits_match(path, hf)
    assert llm.config.layer_types == ["sliding", "full", "sliding", "full"]


def test_qwen2_window_without_use_sliding_window_is_off(tmp_path):
    path, hf = build(tmp_path, "qwen2", use_sliding_window=False, sliding_window=8, max_window_layers=0)
    llm = assert_logits_match(path, hf)
    assert llm.config.layer_types == ["full", "full"] and llm.config.sliding_window is None


def test_qwen2_max_window_layers_defaults_like_hf():
    d = dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             num_hidden_layers=30, use_sliding_window=True, sliding_window=16)
    cfg = ModelConfig.from_hf(d)  # HF's default max_window_layers is 28
    assert cfg.layer_types == ["full"] * 28 + ["sliding"] * 2


def test_mistral_ignores_use_sliding_window_and_layer_types():
    """MistralConfig has neither field: the window applies to every layer, as HF runs it."""
    d = dict(model_type="mistral", vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             num_hidden_layers=2, sliding_window=16, use_sliding_window=False,
             layer_types=["full_attention", "full_attention"])
    assert ModelConfig.from_hf(d).layer_types == ["sliding", "sliding"]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3_text"])
def test_unknown_layer_type_is_refused_by_name(family):
    d = dict(model_type=family, vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             num_hidden_layers=2, use_sliding_window=True, sliding_window=16,
             layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ConfigError, match=r"layer_types\[1\]='linear_attention'"):
        ModelConfig.from_hf(d, source="x/config.json")


def test_sliding_layer_without_window_is_refused():
    d = dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="x/config.json: layer_types has sliding_attention"):
        ModelConfig.from_hf(d, source="x/config.json")


# ------------------------------------------------------------------ biases
@pytest.mark.parametrize("family,overrides", [
    ("qwen3", {"attention_bias": True}),  # q/k/v *and* o_proj
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),  # q/k/v only, always
])
def test_bias_flags_load_and_match(tmp_path, family, overrides):
    path, hf = build(tmp_path, family, **overrides)
    assert_logits_match(path, hf)


def test_biases_follow_each_modeling_file():
    base = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1,
                attention_bias=True, mlp_bias=True)
    got = {t: ModelConfig.from_hf({**base, "model_type": t}) for t in ("llama", "mistral", "qwen2", "qwen3")}
    flags = {t: (c.qkv_bias, c.o_bias, c.mlp_bias) for t, c in got.items()}
    assert flags == {"llama": (True, True, True), "mistral": (False, False, False),
                     "qwen2": (True, False, False), "qwen3": (True, True, False)}
    # Qwen2's q/k/v bias is hard-coded: attention_bias=False in the file does not remove it.
    assert ModelConfig.from_hf({**base, "model_type": "qwen2", "attention_bias": False}).qkv_bias


# ------------------------------------------------------------------ RoPE scaling
SHORT = [1.0 + 0.1 * i for i in range(8)]  # head_dim 16 -> 8 frequencies
LONG = [1.0 + 0.5 * i for i in range(8)]


@pytest.mark.parametrize("family,overrides", [
    # 24-token prompt past max_position_embeddings=16: HF rescales the base for the whole call.
    ("llama", {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}),
    ("qwen2", {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    # longrope past its original length (long_factor), and within it (short_factor).
    ("llama", {"max_position_embeddings": 64, "rope_scaling": {
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16}}),
    ("llama", {"max_position_embeddings": 64, "rope_scaling": {
        "rope_type": "longrope", "factor": 2.0, "short_factor": SHORT, "long_factor": LONG,
        "original_max_position_embeddings": 32}}),
    ("llama", {"max_position_embeddings": 64, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
], ids=["llama-dynamic", "qwen2-dynamic", "longrope-long", "longrope-short", "llama-yarn"])
def test_rope_scaling_matches_hf(tmp_path, family, overrides):
    path, hf = build(tmp_path, family, **overrides)
    llm = assert_logits_match(path, hf)
    if llm.config.max_position_embeddings >= len(PROMPT) + 6:
        # Cached decode past the longrope threshold equals HF's cached decode (generate).
        from qkv import SamplingParams

        with torch.no_grad():
            ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(PROMPT):].tolist()
        out = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        assert out.token_ids == ref


def test_unknown_rope_scaling_is_refused_by_name():
    d = dict(model_type="llama", vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             num_hidden_layers=1, rope_scaling={"rope_type": "su", "factor": 2.0})
    with pytest.raises(ConfigError, match="x/config.json: unsupported RoPE scaling 'su'"):
        ModelConfig.from_hf(d, source="x/config.json")


def test_longrope_top_level_original_length_wins():
    """Phi-3 style: a top-level original_max_position_embeddings overrides the one in rope_scaling,
    and a missing factor is max_position_embeddings / original, as HF standardizes them."""
    d = dict(model_type="llama", vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=64,
             num_hidden_layers=1, max_position_embeddings=128, original_max_position_embeddings=32,
             rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                           "original_max_position_embeddings": 64})
    s = ModelConfig.from_hf(d).rope_scaling
    assert (s["rope_type"], s["original_max_position_embeddings"], s["factor"]) == ("longrope", 32, 4.0)


# ------------------------------------------------------------------ validation at load
GOOD = dict(model_type="llama", vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, num_hidden_layers=2)


@pytest.mark.parametrize("change,field", [
    ({"num_attention_heads": 0}, "num_attention_heads"),  # was ZeroDivisionError
    ({"num_attention_heads": -4}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_kv_heads"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),  # 4 heads do not split into 3 groups
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_hidden_layers": 1e9}, "num_layers"),  # a float, and absurd
    ({"num_hidden_layers": 10**9}, "num_layers"),
    ({"vocab_size": 2**62}, "vocab_size"),
    ({"hidden_size": 2**40}, "hidden_size"),
    ({"intermediate_size": -1}, "intermediate_size"),
    ({"head_dim": -8}, "head_dim"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_theta": -10000.0}, "rope_theta"),
    ({"rms_norm_eps": float("nan")}, "norm_eps"),
    ({"rms_norm_eps": -1e-6}, "norm_eps"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "rope_scaling.factor"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
    ({"model_type": "mistral", "sliding_window": -4}, "sliding_window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0},
     "sliding_window"),
    # Every size within bounds, the product absurd: 10^4 layers of hidden 131072.
    ({"num_hidden_layers": 10_000, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
      "num_attention_heads": 128, "num_key_value_heads": 8}, "parameters"),
])
def test_bad_config_is_refused_naming_field_and_file(change, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**GOOD, **change}, source="m/config.json")
    assert str(e.value).startswith("m/config.json: ") and field in str(e.value)


def test_gpt2_heads_must_divide_hidden():
    d = dict(model_type="gpt2", vocab_size=64, n_embd=30, n_head=4, n_layer=1, n_positions=64)
    with pytest.raises(ConfigError, match="m/config.json: n_embd=30 is not a multiple of n_head=4"):
        ModelConfig.from_hf(d, source="m/config.json")


def test_bad_gguf_metadata_is_refused_naming_the_file(tmp_path):
    """A zero KV head count in GGUF metadata is refused naming the .gguf file and the key
    (the GGUF reader checks head counts before dividing by them)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from qkv.loading import LoadError, load

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_block_count(1)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(0)
    w.add_vocab_size(64)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LoadError, match=r"bad\.gguf: GGUF metadata llama\.attention\.head_count_kv must be a "
                                        r"positive integer, got 0"):
        load(str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scaling", [
    {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 16},
    {"rope_type": "dynamic", "factor": 2.0},
], ids=["longrope", "dynamic"])
def test_length_dependent_rope_on_gpu(tiny_model, scaling):
    """The per-token frequency path through the Triton rope kernels, eager and replayed in CUDA
    graphs (decode crosses the longrope threshold), gives the reference backend's greedy tokens,
    which equal HF's cached generate."""
    from test_triton import greedy_by_variant

    # dynamic: prompts stay within max_position_embeddings (the engine's cap), so only the
    # short branch runs end to end; scoring past it is covered on the CPU above.
    max_pos = 64 if scaling["rope_type"] == "longrope" else 48
    path, hf = tiny_model("llama", rope_scaling=scaling, max_position_embeddings=max_pos, num_attention_heads=4)
    prompts = [[int(t) for t in torch.randint(2, 250, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (5, 12, 20, 30)]
    results = greedy_by_variant(path, prompts, 12, block_size=16, num_kv_blocks=64, max_num_seqs=8)
    assert results["triton-eager"] == results["reference"]
    assert results["triton-graphs"] == results["reference"]
    for p, (tokens, _) in zip(prompts, results["reference"]):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist()
        assert tokens == want
