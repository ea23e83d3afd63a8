"""KV cache quantization (fp8 e4m3 storage) on the CPU reference backend.

An fp8 cache must (1) really store one byte per element, so the same memory holds twice the
tokens of a bf16 cache; (2) keep every property of a KV cache: tokens identical with prefix
caching on or off, for any token budget, with preemption forced, and no leaked block;
(3) stay close to the full-precision cache: logits of tiny models within a few percent, and
SmolLM2's perplexity within 2% of its fp32-cache perplexity. The Triton kernels over an fp8
cache are compared with this reference in tests/test_triton.py (GPU only).
"""

from __future__ import annotations

import random

import pytest
import torch

from qkv import LLM, SamplingParams
from qkv.kvcache.kv_quant import FP8, FP8_MAX, as_stored, to_cache

BS = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def test_to_cache_saturates_and_rounds():
    x = torch.tensor([1e4, -1e4, 447.0, 1.9976, float("inf")])
    stored = to_cache(x, FP8)
    assert stored.dtype == FP8 and stored.element_size() == 1
    back = stored.float()
    assert back[:2].tolist() == [FP8_MAX, -FP8_MAX]  # saturated, not NaN
    assert back[4] == FP8_MAX
    assert back[3] == 2.0  # round to nearest: e4m3 has 3 mantissa bits
    assert torch.equal(as_stored(x[:4], FP8), back[:4])
    assert as_stored(x, torch.float32) is x  # same dtype: untouched


def tiny(tiny_model, family, **overrides):
    path, _ = tiny_model(family, **overrides)
    return path


def make(path, **kw) -> LLM:
    kw.setdefault("block_size", BS)
    kw.setdefault("num_kv_blocks", 256)
    return LLM(path, dtype="float32", device="cpu", **kw)


def work(vocab: int, seed: int = 0, count: int = 10):
    rng = random.Random(seed)
    out = []
    for i in range(count):
        ids = [rng.randrange(2, vocab) for _ in range(rng.randint(3, 36))]
        p = (SamplingParams(max_tokens=rng.randint(1, 10), temperature=0, ignore_eos=True) if i % 2 else
             SamplingParams(max_tokens=rng.randint(1, 10), temperature=0.9, seed=i, ignore_eos=True))
        out.append((ids, p))
    base = out[2][0]
    out += [(base + [rng.randrange(2, vocab) for _ in range(j + 2)], SamplingParams(max_tokens=5, temperature=0))
            for j in range(3)]
    return out


def drive(engine, jobs) -> list[list[int]]:
    reqs = [engine.add_request(ids, p)[0] for ids, p in jobs]
    got = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    s = engine.stats()
    assert s["num_blocks_in_use"] == 0 and s["num_blocks_free"] + s["num_blocks_cached"] == s["num_blocks_total"]
    return [got[r.request_id] for r in reqs]


FAMILIES = {
    "llama-gqa": ("llama", {}),
    "mistral-window": ("mistral", dict(sliding_window=12)),
    "gpt2-mha": ("gpt2", {}),
}


@pytest.mark.parametrize("family", list(FAMILIES) + ["gemma3-hybrid"])
def test_fp8_cache_keeps_the_cache_properties(tiny_model, tmp_path, family):
    if family == "gemma3-hybrid":  # sliding and global layer groups, two pools
        from test_gemma3 import tiny_gemma3

        path, _ = tiny_gemma3(tmp_path)
    else:
        fam, over = FAMILIES[family]
        path = tiny(tiny_model, fam, **over)
    ref_llm = make(path, kv_dtype="fp8", enable_prefix_caching=False)
    assert all(c.dtype == FP8 for c in ref_llm.engine.runner.kv_caches)
    jobs = work(ref_llm.config.vocab_size)
    ref = [drive(ref_llm.engine, [j])[0] for j in jobs]  # one at a time, nothing shared
    longest = max(len(ids) + p.max_tokens for ids, p in jobs)
    for kw in (dict(), dict(max_num_batched_tokens=3), dict(max_num_batched_tokens=16, enable_prefix_caching=False),
               dict(num_kv_blocks=-(-longest // BS) + 1)):
        llm = make(path, kv_dtype="fp8", **kw)
        assert drive(llm.engine, jobs) == ref, kw
        if "num_kv_blocks" in kw and family in ("llama-gqa", "gpt2-mha"):  # rings rarely run dry
            assert llm.engine.scheduler.num_preemptions > 0


def test_fp8_mla_latent_cache(tmp_path):
    from test_mla import BASE, CASES, tiny_deepseek

    version, over = CASES["v2-dense-noqlora"]
    path, _ = tiny_deepseek(tmp_path, version, **over)
    full = make(path, block_size=8, num_kv_blocks=64)
    fp8 = make(path, block_size=8, num_kv_blocks=64, kv_dtype="fp8")
    spec = fp8.engine.kv.groups[0].spec
    assert spec.bytes_per_token == BASE["kv_lora_rank"] + BASE["qk_rope_head_dim"]  # one byte per element
    ids = list(range(5, 45))
    a, b = full.logits(ids), fp8.logits(ids)
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < 5e-2, err
    chunked = make(path, block_size=8, num_kv_blocks=64, kv_dtype="fp8", max_num_batched_tokens=7)
    torch.testing.assert_close(chunked.logits(ids), b, rtol=1e-4, atol=1e-4)


def test_fp8_doubles_the_tokens_of_a_bf16_cache(tiny_model):
    path = tiny(tiny_model, "llama")
    budget = 1 << 20
    caps = {}
    for kv in ("bfloat16", "fp8"):
        llm = LLM(path, dtype="float32", device="cpu", block_size=16, kv_cache_memory=budget, kv_dtype=kv)
        eng = llm.engine
        caps[kv] = eng.kv.groups[0].pool.num_blocks
        assert eng.runner.kv_cache_bytes <= budget + eng.runner.kv_cache_bytes // caps[kv]  # + the null page at most
        assert eng.specs[0].dtype_bytes == (1 if kv == "fp8" else 2)
    assert caps["fp8"] == 2 * caps["bfloat16"]
    # `qkv memory`'s arithmetic at 8 bits is the fp8 engine's allocation, to the byte.
    from qkv.tools.memory import pool_bytes, read_config

    assert eng.runner.kv_cache_bytes == pool_bytes(read_config(path), [caps["fp8"]], 8, 16)


def test_fp8_logits_close_to_full_precision(tiny_model):
    path = tiny(tiny_model, "qwen2")  # MQA: one kv head
    ids = list(range(3, 60))
    a = make(path).logits(ids)
    b = make(path, kv_dtype="fp8").logits(ids)
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < 5e-2, err  # quantized (not bit-equal), but close


def test_bad_kv_dtype_is_a_clear_error(tiny_model):
    path = tiny(tiny_model, "llama")
    with pytest.raises(ValueError, match="unsupported dtype 'int3'"):
        make(path, kv_dtype="int3")


def test_smollm2_fp8_perplexity(smollm2):
    from qkv.tools.perplexity import default_corpus, perplexity

    ids = smollm2.tokenizer.encode(default_corpus(), add_special_tokens=False)
    fp8 = LLM("smollm2", device="cpu", kv_dtype="fp8", max_num_batched_tokens=1024, quantization="none")
    torch.set_num_threads(2)  # a 135M model, unlike the tiny ones, gains from the second core
    full = perplexity(smollm2.logits, ids, 512, 1024).perplexity
    quant = perplexity(fp8.logits, ids, 512, 1024).perplexity
    assert quant != full and abs(quant / full - 1) < 0.02, (full, quant)
