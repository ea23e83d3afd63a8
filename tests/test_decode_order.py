"""Longest sequences first (qkv/attention/triton/order.py): the order changes which program takes
which sequence, never a value. The decode kernels run under Triton's interpreter without CUDA."""

from __future__ import annotations

import pytest
import torch

from test_triton_packed import cache_for  # noqa: I001  (sets TRITON_INTERPRET; skips without triton)
from test_triton import CUDA, DEV, make_batch  # noqa: E402
from qkv.attention.triton import order  # noqa: E402
from qkv.kvcache import kv_pages  # noqa: E402


def test_longest_first_is_off_for_few_rows_and_made_once_a_step(monkeypatch):
    nc = torch.tensor([5, 900, 30, 900, 1])
    monkeypatch.setattr(order, "ON", False)
    assert order.longest_first(nc, 512) is None
    monkeypatch.setattr(order, "ON", True)
    assert order.longest_first(nc, 8) is None  # 40 rows: every program is resident at once
    scratch = {}
    o = order.longest_first(nc, 512, scratch)
    assert o.dtype == torch.int32 and sorted(o.tolist()) == list(range(5))
    assert nc[o.long()].tolist() == sorted(nc.tolist(), reverse=True)
    assert order.longest_first(nc, 512, scratch) is o  # shared by the step's layers
    assert order.longest_first(nc[:3], 512, scratch) is not o  # another batch: made again


def _reversed_lengths(computed: list[int]) -> torch.Tensor:
    """Longest first, as longest_first orders them (not the identity for these lengths)."""
    return torch.argsort(torch.tensor(computed), descending=True).to(torch.int32).to(DEV)


@pytest.mark.parametrize("splits", [1, 3])
def test_float_decode_in_another_order_is_the_same_bit_for_bit(splits):
    from qkv.attention.triton.decode import paged_decode

    computed = [5, 70, 33, 130, 1]
    gen = torch.Generator().manual_seed(3)
    batch = make_batch(computed, [1] * len(computed), 16, 24, None, gen)
    q = torch.randn(len(computed), 8, 32, generator=gen).to(DEV)
    cache = torch.randn(2, 24, 16, 2, 32, generator=gen).to(DEV)
    args = (q, cache, batch.block_tables[0], batch.num_computed, 0.2)
    plain = paged_decode(*args, splits=splits, block_n=16)
    # (into NaNs: a (sequence, KV head) the order left out would show)
    ordered = paged_decode(*args, splits=splits, block_n=16, order=_reversed_lengths(computed),
                           out=torch.full_like(plain, float("nan")))
    assert torch.equal(plain, ordered)
    if splits == 1:  # and the kernel does read it: every program on sequence 0 leaves the other rows
        out = torch.full_like(plain, float("nan"))
        paged_decode(*args, splits=1, block_n=16, out=out, order=torch.zeros(len(computed), dtype=torch.int32,
                                                                              device=DEV))
        assert torch.equal(out[0], plain[0]) and out[1:].isnan().all()


@pytest.mark.parametrize("kv", ["int4", "int8"])
def test_packed_decode_in_another_order_is_the_same_bit_for_bit(kv):
    from qkv.attention.triton.packed import packed_decode

    computed, H, KVH, D, bs = [40, 3, 97, 17], 8, 2, 64, 16
    gen = torch.Generator().manual_seed(5)
    nb = sum(-(-(n + 1) // bs) for n in computed) + 2
    batch = make_batch(computed, [1] * len(computed), bs, nb, gen=gen)
    cache = cache_for(kv, KVH, D, nb, bs)
    slots = torch.arange(nb * bs, device=DEV)
    kv_pages.write(cache, 0, torch.randn(nb * bs, KVH, D, generator=gen).to(DEV), slots)
    kv_pages.write(cache, 1, torch.randn(nb * bs, KVH, D, generator=gen).to(DEV), slots)
    dtype = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(len(computed), H, D, generator=gen).to(DEV, dtype)
    for splits in (1, 2):
        kw = dict(max_seq_len=batch.max_seq_len, splits=splits, fast=True, block_n=16,
                  num_warps=1)
        plain = packed_decode(q, cache, batch.block_tables[0], batch.num_computed, D ** -0.5, **kw)
        ordered = packed_decode(q, cache, batch.block_tables[0], batch.num_computed, D ** -0.5,
                                order=_reversed_lengths(computed), out=torch.full_like(q, float("nan")), **kw)
        assert torch.equal(plain, ordered)
    out = torch.full_like(q, float("nan"))  # every program on sequence 0: the other rows untouched
    got = packed_decode(q, cache, batch.block_tables[0], batch.num_computed, D ** -0.5, out=out,
                        order=torch.zeros(len(computed), dtype=torch.int32, device=DEV), **dict(kw, splits=1))
    assert got is out and torch.equal(out[0], packed_decode(q, cache, batch.block_tables[0], batch.num_computed,
                                                            D ** -0.5, **dict(kw, splits=1))[0])
    assert out[1:].isnan().all()


def test_ordered_kernels_compile_for_sm90():
    """The int4 fast kernel (the defaults' constants) and the fp8 float kernel assemble for sm_90
    (ptxas, no GPU needed) with the order, one global load more than without. In a subprocess:
    the interpreter is on in this one."""
    from compiled_run import run_uninterpreted

    pytest.importorskip("triton.backends.nvidia")
    script = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qkv.attention.triton import decode, packed, packed_fast

def build(fn, types, const, order, warps):
    const = dict(const, HAS_ORDER=order, **({} if order else {"ORDER": None}))
    sig = {n: ("constexpr" if n in const else types.get(n, "i32")) for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": 2})
    assert len(k.asm["cubin"]) > 0
    return k.asm["ptx"].count("ld.global")

fast = (packed_fast.fast_decode_kernel,
        dict(Q="*bf16", C8="*u8", C16="*fp16", C32="*i32", BT="*i32", NC="*i64", QSL="*i64", ACC="*fp32",
             ML="*fp32", OUT="*bf16", ORDER="*i32", sm_scale="fp32", softcap="fp32"),
        dict(KVH=8, G=4, G_PAD=8, D=128, BS=16, BLOCK_N=32, S=1, K_BITS=4, K_GRP=16, V_BITS=4, V_GRP=16, ALIGN=4,
             HAS_WINDOW=False, HAS_RING=False, HAS_SOFTCAP=False, IEEE=False, ASM=2,
             V_WORDS=packed.V_WORDS, LAZY=0, ROT_Q=True, ROT_O=True, LOG2D=7,
             L_DEFER=False, ONE_PAGE=packed.ONE_PAGE[4], K_WORDS=packed.K_WORDS, HEAD_MAJOR=False), 1)
flt = (decode._decode_kernel,
       dict(Q="*fp16", KC="*fp8e4nv", VC="*fp8e4nv", BT="*i32", NC="*i64", QSL="*i64", ACC="*fp32", ML="*fp32",
            CNT="*i32", OUT="*bf16", ORDER="*i32", sm_scale="fp32", softcap="fp32"),
       dict(G=4, G_PAD=8, D=128, D_PAD=128, BS=16, BLOCK_N=128, S=1, HAS_WINDOW=False, HAS_RING=False,
            HAS_SOFTCAP=False, MERGE=True, KEYS_ON_M=True, DOT_F16=True, DILATED=False, MERGE_VEC=False, G2=4,
            S2=1, SC=1, PDL=0, PRE=False, CHUNK_SKIP=True), 4)
print(*[build(fn, t, c, True, w) == build(fn, t, c, False, w) + 1 for fn, t, c, w in (fast, flt)])  # one load more
'''
    assert run_uninterpreted(script) == ["True"] * 2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["int4", "fp8"])
def test_engine_tokens_are_the_same_longest_first(tiny_model, monkeypatch, kv):
    """Mixed and decode steps (CUDA graphs too) with the order on every launch: the same greedy
    tokens as without it."""
    from qkv import LLM, SamplingParams

    path, _ = tiny_model("llama", head_dim=64)
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 61, 12, 90)]
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs, made = [], []
    real = order.longest_first
    monkeypatch.setattr(order, "longest_first", lambda *a: made.append(real(*a) is not None) or real(*a))
    monkeypatch.setattr(order, "MIN_ROWS", 1)
    for on in (False, True):
        monkeypatch.setattr(order, "ON", on)
        llm = LLM(path, dtype="bfloat16", device="cuda", block_size=16, num_kv_blocks=64, kv_dtype=kv)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, p)])
        assert any(made) == on  # the launches did take the order
        made.clear()
    assert outs[0] == outs[1]
