"""Less-travelled model paths on the CPU (tiny random-weight models, fp32): what an audit found."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qkv import LLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """One saved DeepSeek-V2 and one V3 with routed experts (8 experts in 2 groups)."""
    from test_mla import MOE, tiny_deepseek

    d = tmp_path_factory.mktemp("moe")
    return {v: tiny_deepseek(d, v, q_lora_rank=None, **MOE)[0] for v in ("v2", "v3")}


# (version, config.json edits, what the error must name): each is a routing the engine does not
# run. Before, the first four loaded and ran their version's routing unsaid (HF's V2 has no
# noaux_tc at all), the last three loaded and failed in the first step inside torch.topk
# ("selected index k out of range").
ROUTING = {
    "v2-noaux_tc": ("v2", dict(topk_method="noaux_tc"), "topk_method 'noaux_tc'"),
    "v3-greedy": ("v3", dict(topk_method="greedy"), "topk_method 'greedy'"),
    "v2-sigmoid": ("v2", dict(scoring_func="sigmoid"), "scoring_func 'sigmoid'"),
    "moe-layer-freq": ("v3", dict(moe_layer_freq=2), "moe_layer_freq 2"),
    "v2-topk_group": ("v2", dict(topk_method="group_limited_greedy", topk_group=3), "topk_group=3"),
    "v3-topk_group": ("v3", dict(topk_group=3), "topk_group=3"),
    "v3-groups-of-one": ("v3", dict(n_group=8, topk_group=2), "n_group=8"),
}


@pytest.mark.parametrize("case", list(ROUTING))
def test_moe_routing_the_engine_does_not_run_is_refused_by_name(tiny_moe, tmp_path, case):
    version, edits, named = ROUTING[case]
    path = tmp_path / "m"
    shutil.copytree(tiny_moe[version], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(edits)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=named):
        LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=16)


def test_moe_routing_the_engine_runs_still_loads(tiny_moe, tmp_path):
    from qkv import SamplingParams

    for version, edits in (("v2", dict(topk_method="group_limited_greedy", topk_group=2, scoring_func="softmax")),
                           ("v3", dict(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1))):
        path = tmp_path / version
        shutil.copytree(tiny_moe[version], path)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(edits)
        (path / "config.json").write_text(json.dumps(cfg))
        llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=16)
        assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3



@pytest.mark.parametrize("version", ["v2", "v3"])
def test_deepseek_kv_heads_other_than_heads_is_refused_by_name(tmp_path, version):
    # HF's DeepSeek fails at its first forward on such a config (no reference to match); qkv
    # loaded it and ran every query head from the latent, the field ignored.
    from test_mla import MOE, tiny_deepseek

    from qkv.loading.errors import LoadError

    path, hf = tiny_deepseek(tmp_path, version, q_lora_rank=None, num_key_value_heads=2, **MOE)
    with pytest.raises(RuntimeError):
        hf(torch.tensor([[5, 6, 7]]))
    with pytest.raises(LoadError, match="num_key_value_heads=2 must equal num_attention_heads=4"):
        LLM(path, dtype="float32", device="cpu", num_kv_blocks=16)


@pytest.mark.parametrize("kv", ["int8,int4", "int4,int8", "bfloat16,int8"])
def test_mla_kv_formats_for_k_and_v_apart_are_refused(tiny_moe, kv):
    # The latent is one plane stored in K's format: "int8,int4" ran as int8 (same bytes, same
    # tokens) and "bfloat16,int8" as bf16, the V format dropped unsaid.
    from qkv.tools.memory import kv_specs

    with pytest.raises(ValueError, match=f"kv_dtype {kv.replace('bfloat16', 'bf16')}: an MLA latent is one plane"):
        LLM(tiny_moe["v3"], dtype="float32", device="cpu", num_kv_blocks=16, kv_dtype=kv)
    k = kv.split(",")[0]
    llm = LLM(tiny_moe["v3"], dtype="float32", device="cpu", num_kv_blocks=16, kv_dtype=f"{k},{k}")  # one format
    with pytest.raises(ValueError, match="an MLA latent is one plane"):  # qkv memory's arithmetic too
        kv_specs(llm.config, kv)


def test_deepseek_v2_ignores_rope_interleave_as_hf(tmp_path):
    # HF's V2 always interleaves its RoPE dims (the flag is V3's); qkv read the field for V2
    # too and rotated un-interleaved: logits off by 4e-3 of their range.
    from test_mla import MOE, tiny_deepseek

    path, hf = tiny_deepseek(tmp_path, "v2", q_lora_rank=None, rope_interleave=False, **MOE)
    prompt = list(range(2, 30))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    got = LLM(path, dtype="float32", device="cpu", num_kv_blocks=32).logits(prompt)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_integer_weights_for_mla_are_refused_by_name(tiny_moe, q):
    # Loaded, then the first step failed: "'Int8Linear' object has no attribute 'weight'"
    # (MLA reads kv_b_proj's weight, per head, in both modes).
    from qkv import SamplingParams

    with pytest.raises(ValueError, match=f"quantization='{q}' does not support deepseek_v3"):
        LLM(tiny_moe["v3"], device="cpu", num_kv_blocks=16, quantization=q)
    llm = LLM(tiny_moe["v3"], device="cpu", num_kv_blocks=16, quantization="bf16")  # the way it names
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids) == 2

# ---------------------------------------------------------------- tensor parallelism options
def test_tensor_parallel_size_true_is_refused_not_one_rank(tiny_model):
    # True == 1 skipped the layout's check (only sizes != 1 reach it) and ran one process.
    path, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive whole number, got True"):
        LLM(path, device="cpu", num_kv_blocks=16, tensor_parallel_size=True)


def test_compile_decode_under_tensor_parallelism_is_refused_before_the_ranks_start(tiny_model):
    # Was refused only after both ranks had started and loaded, saying it was a CUDA matter.
    from unittest import mock

    from qkv.distributed import executor

    path, _ = tiny_model("llama")
    with mock.patch.object(executor, "TensorParallelExecutor", side_effect=AssertionError("ranks started")):
        with pytest.raises(ValueError, match="compile_decode is not supported with tensor_parallel_size > 1"):
            LLM(path, device="cpu", num_kv_blocks=16, tensor_parallel_size=2, compile_decode=True)
