"""``qkv memory``: the seed's arithmetic exactly, and predictions equal to what the engine allocates."""

from __future__ import annotations

import importlib.util
import json

import pytest

from qkv.cli import main
from qkv.tools.memory import footprint, pool_bytes, read_config

GIB = 1 << 30


def run_cli(capsys, *argv) -> str:
    assert main(["memory", *map(str, argv)]) == 0
    return capsys.readouterr().out


@pytest.fixture
def llama7b_16k(tmp_path):
    """A directory holding only the config.json of a Chinese-LLaMA-2-7B-16K-shaped model."""
    d = tmp_path / "chinese-llama-2-7b-16k"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 55296,
        "max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 4.0}}))
    return d


def test_seed_example_exactly(llama7b_16k, capsys):
    """2 * 16384 tokens * 32 layers * 4096 = 4,294,967,296 values: 8 GiB fp16, 2 GiB at 4 bits."""
    fp16 = json.loads(run_cli(capsys, llama7b_16k, "--context", 16384, "--dtype", "float16", "--json"))
    assert fp16["total_values"] == 2 * 16384 * 32 * 4096 == 4_294_967_296
    assert fp16["total_bytes"] == 8 * GIB
    assert fp16["bytes_per_token"] == 2 * 32 * 4096 * 2  # 512 KiB
    q4 = json.loads(run_cli(capsys, llama7b_16k, "--context", 16384, "--kv-bits", 4, "--json"))
    assert q4["total_values"] == 4_294_967_296 and q4["total_bytes"] == 2 * GIB
    # The context defaults to the model's maximum, 16K here.
    assert json.loads(run_cli(capsys, llama7b_16k, "--json"))["total_bytes"] == 8 * GIB
    # Twins: GQA-8 is a quarter, MQA 1/32, MLA (512 + 64) * 2 B per layer-token as DeepSeek-V2.
    v = fp16["variants"]
    assert v["GQA-8"]["total_bytes"] == 2 * GIB and v["MQA"]["total_bytes"] == GIB // 4
    assert v["MLA"]["groups"][0]["bytes_per_token_per_layer"] == (512 + 64) * 2


def test_text_report_and_plot(llama7b_16k, capsys, tmp_path):
    import matplotlib.image

    png = tmp_path / "kv.png"
    out = run_cli(capsys, llama7b_16k, "--context", 16384, "--batch", 2, "--plot", png)
    assert "17,179,869,184" in out and "GQA-8" in out and "MLA" in out  # 2 x 8 GiB
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["memory", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["memory", str(tmp_path)]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


def test_gguf_metadata_only(smollm2):
    """A GGUF file's header gives the same cache shape as loading the whole model."""
    cfg = read_config("smollm2")
    for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "layer_types", "sliding_window"):
        assert getattr(cfg, k) == getattr(smollm2.config, k)


# ---------------------------------------------------------------- engine allocation
def allocated_bytes(engine, request_id: str) -> int:
    """Bytes of the blocks the request's tables hold: blocks x block bytes, over every group."""
    total = 0
    for group, table in zip(engine.kv.groups, engine.kv.block_tables(request_id)):
        total += len(table) * engine.kv.block_size * group.spec.bytes_per_token * len(group.layers)
    return total


def check_engine_matches(path: str, lengths: list[int], block_size: int = 16, num_kv_blocks: int = 24):
    """For each prompt length n: after prefill (n tokens cached) and after one decode step
    (n + 1), the request's block tables hold exactly the blocks ``qkv memory`` predicts."""
    from qkv import LLM, SamplingParams

    llm = LLM(path, device="cpu", block_size=block_size, num_kv_blocks=num_kv_blocks, enable_prefix_caching=False)
    cfg, eng = llm.config, llm.engine
    pools = [g.pool.num_blocks for g in eng.kv.groups]
    assert llm.stats()["kv_cache_bytes"] == pool_bytes(cfg, pools, 32, block_size, prefix_caching=False)
    for n in lengths:
        (req,) = eng.add_request(list(range(2, 2 + n)), SamplingParams(max_tokens=3, ignore_eos=True))
        for cached in (n, n + 1):
            eng.step()
            assert req.num_computed_tokens == cached
            pred = footprint(cfg, cached, batch=1, bits=32, block_size=block_size)
            tables = eng.kv.block_tables(req.request_id)
            assert [len(t) for t in tables] == [g.blocks_per_sequence for g in pred.groups]
            assert allocated_bytes(eng, req.request_id) == pred.bytes_per_sequence
            assert eng.stats()["num_blocks_in_use"] == sum(g.blocks_per_sequence for g in pred.groups)
        eng.abort(req.request_id)
    return pred


def test_engine_allocates_the_prediction_full(tiny_model):
    path, _ = tiny_model("llama", num_key_value_heads=2)
    pred = check_engine_matches(path, [21, 32, 47])
    assert [g.spec.kind for g in pred.groups] == ["full"]


def test_engine_allocates_the_prediction_sliding(tiny_model):
    path, _ = tiny_model("mistral", sliding_window=20, num_key_value_heads=1)
    pred = check_engine_matches(path, [19, 32, 90])
    assert [g.spec.kind for g in pred.groups] == ["sliding"]
    assert pred.groups[0].blocks_per_sequence == 3  # the ring: ceil(20 / 16) + 1


@pytest.mark.skipif(importlib.util.find_spec("qkv.model.gemma3") is None, reason="no Gemma 3 model yet")
def test_engine_allocates_the_prediction_mixed(tmp_path):
    import torch
    import transformers as tf

    cfg = tf.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=20,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    tf.Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "gemma3")
    pred = check_engine_matches(str(tmp_path / "gemma3"), [19, 47, 70])
    assert sorted(g.spec.kind for g in pred.groups) == ["full", "sliding"]


@pytest.mark.skipif(importlib.util.find_spec("qkv.model.deepseek") is None, reason="no DeepSeek (MLA) model yet")
def test_engine_allocates_the_prediction_mla(tmp_path):
    import torch
    import transformers as tf

    cfg = tf.DeepseekV2Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                              v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                              first_k_dense_replace=1, max_position_embeddings=512, bos_token_id=0,
                              eos_token_id=1)
    torch.manual_seed(0)
    tf.DeepseekV2ForCausalLM(cfg).save_pretrained(tmp_path / "dsv2")
    pred = check_engine_matches(str(tmp_path / "dsv2"), [19, 32])
    assert [g.spec.kind for g in pred.groups] == ["mla"]
    assert pred.groups[0].bytes_per_token_per_layer == (32 + 8) * 4
