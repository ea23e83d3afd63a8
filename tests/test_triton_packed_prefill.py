"""The packed prefill kernel (int8/int4 pages read directly) vs ``reference.packed_attention``.

Prefill, chunked prefill over a cached prefix, decodes beside prefill chunks, windows over a
ring shorter than the chunk (read before write), softcap, GQA with a non-power-of-two group;
int8 and int4 for K and V separately, Hadamard-rotated planes or not. The kernel must give the
reference's outputs and leave the reference's bytes in the cache. Without CUDA the kernel runs
under Triton's interpreter (test_triton_packed patches it) with fp32 queries.

Tolerances: fp32 queries take the same dequantized values and IEEE dots, differing only in
summation order and the online softmax's rescaling: 1e-4. bf16 queries (GPU): the kernel
rounds the probabilities to bf16 before the P.V dot (8 significant bits, FlashAttention's
choice) and the reference rounds its output once, a few bf16 ulps (2^-8) of a value ~1: 2e-2,
the bound test_triton_packed's decode check uses.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_triton_packed import CUDA, DEV, cache_for, make_batch, other_layout  # noqa: I001  (patches the interpreter)
from qkv.attention import reference
from qkv.attention.triton.backend import packed_attention
from qkv.attention.triton.packed_prefill import packed_prefill
from qkv.kvcache import kv_pages

CASES = {
    "prefill-gqa": dict(computed=[0, 0], qlens=[21, 7], H=4, KVH=2, D=32),
    "chunk-prefix": dict(computed=[37, 16], qlens=[12, 30], H=8, KVH=2, D=64),
    "mixed": dict(computed=[40, 5, 0, 9], qlens=[1, 9, 1, 14], H=4, KVH=1, D=32),
    "group-3-softcap": dict(computed=[19, 0], qlens=[10, 5], H=6, KVH=2, D=32, softcap=20.0),
    "window": dict(computed=[30, 3], qlens=[20, 9], H=4, KVH=2, D=32, window=16),
    # a 30-token chunk over a 24-slot ring: its last keys take slots its first queries read
    "mixed-ring": dict(computed=[40, 3, 20], qlens=[1, 30, 1], H=4, KVH=2, D=32, window=16, ring=3, bs=8,
                       softcap=30.0),
    "window-ring": dict(computed=[25, 0], qlens=[30, 12], H=4, KVH=2, D=32, window=16, ring=3, bs=8),
}
FORMATS = ["int4", "int8", "int4,int8", "int8,int4"]


def unrotated(cache):
    """The same pages with plain (unrotated) planes, as a width that is not a power of two stores."""
    lay = cache.kv_layout
    cache.kv_layout = dataclasses.replace(lay, planes=tuple(dataclasses.replace(p, rotated=False) for p in lay.planes))
    return cache


def run_case(case, kv, rotated=True, dtype=None, via_backend=False, seed=0, **variant):
    c = dict(CASES[case])
    computed, qlens, H, KVH, D = c.pop("computed"), c.pop("qlens"), c.pop("H"), c.pop("KVH"), c.pop("D")
    window, softcap, ring, bs = c.pop("window", None), c.pop("softcap", None), c.pop("ring", None), c.pop("bs", 16)
    dtype = dtype or (torch.bfloat16 if CUDA else torch.float32)
    gen = torch.Generator().manual_seed(seed)
    nb = sum(-(-(n + q) // bs) for n, q in zip(computed, qlens)) + 2
    batch = make_batch(computed, qlens, bs, nb, ring=ring, gen=gen)
    cache = cache_for(kv, KVH, D, nb, bs)
    if not rotated:
        unrotated(cache)
    # Every page holds keys (the cached prefix, and stale ring slots), then the step attends.
    slots = torch.arange(nb * bs, device=DEV)
    kv_pages.write(cache, 0, torch.randn(nb * bs, KVH, D, generator=gen).to(DEV), slots)
    kv_pages.write(cache, 1, torch.randn(nb * bs, KVH, D, generator=gen).to(DEV), slots)
    T = sum(qlens)
    q, k, v = (torch.randn(T, n, D, generator=gen).to(DEV, dtype) for n in (H, KVH, KVH))
    ref_cache = cache.clone()
    ref_cache.kv_layout = cache.kv_layout
    ref = reference.packed_attention(q, k, v, ref_cache, batch, 0, D ** -0.5, window, softcap)
    if via_backend:
        out = packed_attention(q, k, v, cache, batch, 0, D ** -0.5, window, softcap)
    else:
        out = packed_prefill(q, k, v, cache, batch.block_tables[0], batch.slot_mappings[0], batch.query_start_loc,
                             batch.num_computed, batch.max_query_len, D ** -0.5, window, ring, softcap,
                             block_t=4, block_n=16, **variant)  # several query and key tiles; one-token rows here too
    assert torch.equal(cache, ref_cache), "the K/V writes differ from the reference's bytes"
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-4)
    assert out.isfinite().all()
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kv", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_packed_prefill_equals_reference(kv, case):
    run_case(case, kv)


@pytest.mark.parametrize("halves,rot_in_kernel", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("kv", ["int4", "int8,int4"])
@pytest.mark.parametrize("case", ["mixed", "window-ring"])
def test_packed_prefill_variants_equal_reference(kv, case, halves, rot_in_kernel):
    """The kernel's other variants: natural-order tiles (the session-8 kernel), the rotations of
    the query and the output inside the kernel (mixed: the decode rows then rotate their own)."""
    run_case(case, kv, halves=halves, rot_in_kernel=rot_in_kernel)


@pytest.mark.parametrize("halves", [True, False])
@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4", "int4,int8"])
@pytest.mark.parametrize("case", ["prefill-gqa", "chunk-prefix", "mixed", "group-3-softcap", "window", "window-ring"])
def test_packed_prefill_own_keys_as_float_rows_equal_reference(kv, case, halves):
    """``own_float`` (int8's default): this step's keys read back once into rows of the
    query's dtype (in the halves' column order) and scored from there, the pages read for the cached prefix only (rings keep
    their scratch pages: the flag leaves them alone)."""
    run_case(case, kv, halves=halves, own_float=True)


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
@pytest.mark.parametrize("case", ["prefill-gqa", "chunk-prefix", "mixed", "group-3-softcap"])
def test_packed_prefill_pages_ahead_equals_reference(kv, case, own):
    """``pages_ahead`` (staged, off by default): the cached prefix's whole tiles take their
    block-table entries a tile ahead; the reference's values, with and without own rows."""
    run_case(case, kv, own_float=own, pages_ahead=True)


@pytest.mark.parametrize("half_order", [False, True])
@pytest.mark.parametrize("kv", ["int4", "int8", "int4,int8", "int8,int4"])
def test_read_back_is_the_pages_values(kv, half_order):
    """``_read_back``: each slot's K and V exactly as the reference reads them from the pages
    (kv_pages.read; rotated planes stay rotated); slot -1 rows are zeros. ``half_order``: an
    int4 plane's rows hold the even columns, then the odd ones; an int8 plane's are unchanged.
    With the step's scratch, a second read-back writes the first's rows (its own values)."""
    from qkv.attention.triton.packed_prefill import _read_back

    KVH, D, nb, bs = 2, 64, 4, 16
    gen = torch.Generator().manual_seed(7)
    cache = cache_for(kv, KVH, D, nb, bs)
    slots_all = torch.arange(nb * bs, device=DEV)
    for plane in (0, 1):
        kv_pages.write(cache, plane, torch.randn(nb * bs, KVH, D, generator=gen).to(DEV), slots_all)
    slots = torch.tensor([5, 17, -1, 40, 63, 0, 33], device=DEV)
    dtype = torch.bfloat16 if CUDA else torch.float32
    scratch = {}  # a step's: the second layer's read-back reuses the first's rows
    first = _read_back(cache, slots.flip(0), dtype, 4, half_order, scratch)
    kf, vf = _read_back(cache, slots, dtype, 4, half_order, scratch)
    assert kf.data_ptr() == first[0].data_ptr() and vf.data_ptr() == first[1].data_ptr()
    ok = slots >= 0
    bits = [4 if f == "int4" else 8 for f in (kv.split(",") * 2)[:2]]
    for plane, got in ((0, kf), (1, vf)):
        want = kv_pages.read(cache, plane, slots[ok], torch.float32).to(dtype)
        if half_order and bits[plane] == 4:
            want = torch.cat([want[..., 0::2], want[..., 1::2]], -1)
        assert torch.equal(got[ok], want)
        assert not got[~ok].any()


@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
@pytest.mark.parametrize("case", ["chunk-prefix", "mixed", "window-ring", "mixed-ring"])
@pytest.mark.parametrize("own,ahead", [(False, False), (True, True)])
def test_packed_prefill_in_the_other_layout_equals_reference(kv, case, own, ahead, monkeypatch):
    """Pages in the layout the format's default does not take (``test_triton_packed.other_layout``):
    the prefill kernel, its own rows' read-back, entries a tile ahead, the scratch pages of a ring
    and the one-token rows' decode kernel give the reference's values and bytes."""
    other_layout(kv, monkeypatch)
    run_case(case, kv, own_float=own, pages_ahead=ahead)


@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
def test_read_back_is_the_pages_values_in_the_other_layout(kv, monkeypatch):
    other_layout(kv, monkeypatch)
    test_read_back_is_the_pages_values(kv, True)


@pytest.mark.parametrize("kv", ["int4", "int8,int4"])
@pytest.mark.parametrize("case", ["chunk-prefix", "window-ring"])
def test_packed_prefill_unrotated_equals_reference(kv, case):
    run_case(case, kv, rotated=False)


@pytest.mark.parametrize("kv", ["int4", "int8"])
@pytest.mark.parametrize("case", ["mixed", "mixed-ring"])
def test_backend_prefill_step_equals_reference(kv, case):
    """The Triton backend's entry point on mixed steps: its tile sizes, and the one-token rows
    handed to the packed decode kernel (after the ring's write)."""
    run_case(case, kv, via_backend=True, seed=3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["int4", "int8"])
@pytest.mark.parametrize("case", ["chunk-prefix", "mixed", "window-ring"])
def test_packed_prefill_fp16_query_equals_reference(kv, case):
    run_case(case, kv, dtype=torch.float16, seed=5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["int4", "int8,int4"])
def test_engine_window_chunked_prefix_triton_equals_reference(tiny_model, kv):
    """A sliding-window (ring) model with chunks longer than the window, mixed steps and prefix
    hits: the Triton backend's greedy tokens equal the reference backend's over the same cache."""
    from qkv import LLM, SamplingParams

    path, _ = tiny_model("mistral", sliding_window=24, head_dim=64, seed=2)
    base = list(range(5, 5 + 40))
    prompts = [base + [3, 4], list(range(9, 9 + 70)), base + [7] * 9, [11] * 5]  # the third hits the first's prefix
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("reference", "triton"):
        llm = LLM(path, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64, kv_dtype=kv,
                  attention_backend=backend, enforce_eager=True, max_num_batched_tokens=32,
                  enable_prefix_caching=True)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    assert outs["triton"] == outs["reference"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
def test_engine_own_float_triton_equals_reference(tiny_model, monkeypatch, kv):
    """``OWN_FLOAT`` through the engine (full attention: chunked prefill, mixed steps, prefix
    hits, CUDA graphs for the decodes): the same greedy tokens as the reference backend."""
    from qkv import LLM, SamplingParams
    from qkv.attention.triton import packed_prefill as pp

    monkeypatch.setattr(pp, "OWN_FLOAT", {4: True, 8: True})
    path, _ = tiny_model("llama", head_dim=64, seed=4)
    base = list(range(5, 5 + 40))
    prompts = [base + [3, 4], list(range(9, 9 + 70)), base + [7] * 9, [11] * 5]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("reference", "triton"):
        llm = LLM(path, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64, kv_dtype=kv,
                  attention_backend=backend, max_num_batched_tokens=32, enable_prefix_caching=True)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    assert outs["triton"] == outs["reference"]


def test_own_float_variants_build_for_sm90():
    """The prefill kernel with and without ``OWN_FLOAT`` (Llama-3-8B's int4 constants, the
    default tiling) and the read-back kernel assemble for sm_90 (ptxas, no GPU needed); the
    own-keys kernel loads more (the float rows). With pointers 16-byte aligned (as the JIT
    specializes them), int4's own rows load as wide as int8's: no more 2-byte loads than int8's
    build (before the read-back's halves order, int4's even/odd columns loaded 2 bytes at a time:
    196 against 72), and the read-back stores 16-byte vectors. ``PAGES_AHEAD`` gives the cached
    prefix's page data two pipeline buffers at 3 stages instead of one. In a subprocess: the
    interpreter is on here."""
    from compiled_run import run_uninterpreted

    pytest.importorskip("triton.backends.nvidia")
    script = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qkv.attention.triton import packed_prefill as pp

def build(fn, types, const, warps, stages, ttgir=False):
    sig = {n: ("constexpr" if n in const else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in const and sig[n].startswith("*")}
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    assert len(k.asm["cubin"]) > 0
    return k.asm["ptx"] if not ttgir else k.asm["ttgir"]

ptrs = dict(Q="*bf16", C8="*u8", C16="*fp16", C32="*i32", S8="*u8", S16="*fp16", S32="*i32", BT="*i64",
            QSL="*i64", NC="*i64", OUT="*bf16", HPM="*bf16", CUM="*i32", KF="*bf16", VF="*bf16", SLOT="*i64",
            sm_scale="fp32", softcap="fp32")
const = dict(KVH=8, G=4, G_PAD=4, D=128, BS=16, BLOCK_T=32, BLOCK_N=64, ALIGN=4, HAS_WINDOW=False,
             HAS_RING=False, HAS_SOFTCAP=False, STEP_IN_CACHE=True, SKIP_DECODE=True, IEEE=False, HALVES=True, ASM=2,
             ROT_Q=False, ROT_O=False, RSQ=128 ** -0.5, COMPACT=True, PAGES_AHEAD=False, HEAD_MAJOR=False)
fmt = {b: dict(K_BITS=b, K_GRP=16 if b == 4 else 64, V_BITS=b, V_GRP=16 if b == 4 else 64) for b in (4, 8)}
pages = build(pp._packed_prefill_kernel, ptrs, dict(const, **fmt[4], OWN_FLOAT=False), 8, 3)
own = {b: build(pp._packed_prefill_kernel, ptrs, dict(const, **fmt[b], OWN_FLOAT=True), 8, 3) for b in (4, 8)}
rb = build(pp._read_back_kernel, ptrs, dict(KVH=8, D=128, BS=16, BLOCK=32, ALIGN=4, HALF_ORDER=True, **fmt[4]), 4, 1)
loads = lambda ptx: ptx.count("ld.global") + ptx.count("cp.async.c")  # noqa: E731
print(loads(own[4]) > loads(pages), own[4].count("ld.global.b16") <= own[8].count("ld.global.b16"),
      rb.count("st.global.v4") > 0 and "st.global.b16" not in rb)
# the cached prefix's page data: one buffer with the entries loaded in the tile's iteration, two a tile ahead
bufs = [build(pp._packed_prefill_kernel, ptrs, dict(const, **fmt[4], OWN_FLOAT=True, PAGES_AHEAD=a), 8, 3, True)
        for a in (False, True)]
print("2x64x64xi8" not in bufs[0] and "2x64x64xi8" in bufs[1])
'''
    assert run_uninterpreted(script) == ["True"] * 4
