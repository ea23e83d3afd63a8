"""Triton kernels over int8/int4 KV pages vs the reference (the oracle).

The quantizing write must store the very bytes ``kv_pages.write`` stores (so a key written
by a decode step equals one written by a prefill: prefix hits cannot change a score), and
the packed decode kernel must equal ``reference.packed_attention``. Without CUDA the kernels
run under Triton's interpreter on small shapes (skipped when triton is not installed).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("triton is not installed", allow_module_level=True)

if not CUDA:  # Triton 3.6's interpreter reads a scalar loop bound with int(array of shape [1]),
    # which numpy >= 2.4 refuses; read its one element instead (interpreter only).
    from triton.runtime import interpreter as _interp

    _patch_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

from qkv.attention import reference  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qkv.attention.triton.packed import packed_decode, write_packed  # noqa: E402
from qkv.attention.triton.packed_write import _rint_div  # noqa: E402
from qkv.kvcache import kv_pages  # noqa: E402
from qkv.kvcache.kv_int import resolve  # noqa: E402
from qkv.kvcache.spec import FullAttention  # noqa: E402
from test_triton import DEV, gpu, make_batch  # noqa: E402

FORMATS = ["int4", "int8", "int4,int8", "int8,int4"]


@triton.jit
def _quot_kernel(X, S, OUT, n, BLOCK: tl.constexpr):
    """packed_write._rint_div over x [n] and scales s [n] (test_rint_div_equals_rounded_division)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(X + i, mask=m, other=0.0)
    s = tl.load(S + i, mask=m, other=1.0)
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    tl.store(OUT + i, _rint_div(x, s, r, True), mask=m)


def cache_for(kv: str, kvh: int, D: int, num_blocks: int, bs: int):
    spec = FullAttention(kvh, D, 1, packed=resolve(kv, None, None, torch.float32)[1])
    return kv_pages.new_cache(spec, num_blocks, bs, torch.uint8, DEV)


@pytest.mark.parametrize("rows", [0, 4, 16])
@pytest.mark.parametrize("rot_in_kernel", [True, False])
@pytest.mark.parametrize("kv", FORMATS)
def test_write_kernel_stores_the_reference_bytes(kv, rot_in_kernel, rows, dtype=torch.float32, D=64):
    """Both ways of rotating (in the kernel's registers, or kv_int.hadamard first) store the
    reference's bytes, with one-row programs (rows 0) or packed_write's many-row ones (14 rows:
    a partial last program)."""
    gen = torch.Generator().manual_seed(1)
    T, kvh, bs, nb = 7, 2, 4, 5
    k = (torch.randn(T, kvh, D, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0, 2.0, 0.5])[:, None, None])
    v = torch.randn(T, kvh, D, generator=gen)
    k[1, 0, :32] = 0.0  # an all-zero group
    k, v = k.to(DEV, dtype), v.to(DEV, dtype)
    slots = torch.tensor([3, 0, -1, 17, 8, 19, 12], device=DEV)
    ref, got = cache_for(kv, kvh, D, nb, bs), cache_for(kv, kvh, D, nb, bs)
    assert ref.kv_layout.planes[0].rotated  # (a power-of-two width: the rotation is exercised)
    keep = slots >= 0
    kv_pages.write(ref, 0, k[keep], slots[keep])
    kv_pages.write(ref, 1, v[keep], slots[keep])
    write_packed(got, k, v, slots, rot_in_kernel=rot_in_kernel, rows=rows)
    assert torch.equal(ref, got)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter's bf16 is not the GPU's)")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kv", FORMATS)
@pytest.mark.parametrize("rows", [0, 16])
def test_write_kernel_bf16_rotated_in_kernel_stores_the_reference_bytes(kv, D, rows):
    """The engine's case: bf16 K/V rotated in the kernel and rounded to bf16 as hadamard() does."""
    test_write_kernel_stores_the_reference_bytes(kv, True, rows, torch.bfloat16, D)


@gpu
@pytest.mark.parametrize("rot_in_kernel", [True, False])
@pytest.mark.parametrize("kv", ["int4", "int8"])
def test_write_rows_kernel_many_tokens_store_the_reference_bytes(kv, rot_in_kernel):
    """packed_write's kernel at an engine step's size (2,000 tokens x 8 KV heads, D 128, bf16)
    over values that stress the int4 search: magnitudes over 2^-30 .. 2^10, rows of small
    multiples of 1/8 (quotients exactly half-way between integers: round half to even), zero
    groups and subnormal bf16; with rot_in_kernel off the kernel quantizes them unrotated."""
    gen = torch.Generator().manual_seed(5)
    T, kvh, D, bs = 2000, 8, 128, 16
    nb = T // bs + 1

    def values():
        x = torch.randn(T, kvh, D, generator=gen) * torch.exp2(torch.randint(-30, 11, (T, kvh, 1), generator=gen))
        x[::5] = torch.randint(-64, 64, (len(x[::5]), kvh, D), generator=gen) / 8.0  # ties
        x[1::7, :, 16:48] = 0.0
        x[2::11] *= 2.0 ** -120  # bf16 subnormals among normals
        return x.to(DEV, torch.bfloat16)

    k, v = values(), values()
    slots = torch.randperm(nb * bs, generator=gen)[:T].to(DEV)
    slots[3::97] = -1
    ref, got = cache_for(kv, kvh, D, nb, bs), cache_for(kv, kvh, D, nb, bs)
    keep = slots >= 0
    kv_pages.write(ref, 0, k[keep], slots[keep])
    kv_pages.write(ref, 1, v[keep], slots[keep])
    write_packed(got, k, v, slots, rot_in_kernel=rot_in_kernel, rows=16)
    assert torch.equal(ref, got)


@gpu
def test_rint_div_equals_rounded_division():
    """packed_write's quotient (a reciprocal and two fma corrections, then rint) against torch's
    ``(x / s).round()`` for every bf16 value x and every e5m3 code's scale s, and for 4M random
    fp32 values over 2^-40 .. 2^40."""
    scales = (torch.arange(1, 248, dtype=torch.int16, device=DEV) << 7).view(torch.float16).float()
    every_bf16 = torch.arange(-32768, 32768, dtype=torch.int32, device=DEV).to(torch.int16).view(torch.bfloat16).float()
    gen = torch.Generator(device=DEV).manual_seed(0)
    rand32 = torch.randn(1 << 22, generator=gen, device=DEV) * torch.exp2(
        torch.randint(-40, 41, (1 << 22,), generator=gen, device=DEV).float())
    for xs in (every_bf16[every_bf16.isfinite()], rand32):
        for s0 in range(0, 247, 16):
            s = scales[s0:s0 + 16]
            x, sb = torch.broadcast_tensors(xs[:, None], s[None, :])
            x, sb = x.contiguous().reshape(-1), sb.contiguous().reshape(-1)
            out = torch.empty_like(x)
            _quot_kernel[(triton.cdiv(x.numel(), 1024),)](x, sb, out, x.numel(), BLOCK=1024)
            ref = (x / sb).round()
            # (quotients past fp32's range are left out: the write's never exceed ~2^34, its
            # smallest scales being those of groups whose largest value is below 2^-10)
            bad = (out != ref) & ref.isfinite()
            assert not bad.any(), (x[bad][:4], sb[bad][:4], out[bad][:4], ref[bad][:4])


DECODE = {
    "gqa": dict(computed=[5, 40, 17], H=8, KVH=2, D=64),
    "mqa-splits": dict(computed=[130, 3], H=4, KVH=1, D=32, splits=4),
    "window-softcap": dict(computed=[50, 9], H=4, KVH=2, D=64, window=16, softcap=30.0),
    "d128": dict(computed=[40, 70, 3], H=8, KVH=2, D=128),  # (the nibble-position dots need D >= 128)
    "d128-splits": dict(computed=[130, 17], H=4, KVH=1, D=128, splits=3),
    "d128-window": dict(computed=[50, 9], H=4, KVH=2, D=128, window=21, softcap=30.0),
    "d256-splits": dict(computed=[70, 33], H=4, KVH=1, D=256, splits=2),  # (Gemma 3's head_dim)
}


@pytest.mark.parametrize("kv", FORMATS)
@pytest.mark.parametrize("case", list(DECODE))
def test_packed_decode_equals_reference(kv, case):
    check_decode(kv, case)


# The fast kernel (tiles widened in PTX on the GPU, by Triton ops in the interpreter) with its
# V tile options, and the plain kernel: each equals the reference.
@pytest.mark.parametrize("kv", ["int4", "int8"])
@pytest.mark.parametrize("fast,v_words,fused", [
    (False, 0, False), (True, 0, False), (True, 1, False), (True, 2, False), (True, 3, False), (True, 3, True),
    (True, 0, True)])
@pytest.mark.parametrize("case", ["gqa", "mqa-splits"])
def test_packed_decode_variants_equal_reference(kv, fast, v_words, fused, case):
    if kv == "int8" and v_words:
        pytest.skip("v_words reads int4 planes only")
    # 32-key tiles: two or more tiles per split (and the ragged end)
    check_decode(kv, case, fast=fast, v_words=v_words, fused=fused, block_n=32)


@gpu
@pytest.mark.parametrize("kv", ["int4", "int8"])
@pytest.mark.parametrize("block_n,warps,stages", [(16, 1, 2), (16, 1, 3), (32, 2, 2), (32, 1, 2), (64, 1, 2)])
def test_packed_decode_tilings_equal_reference(kv, block_n, warps, stages):
    """The fast kernel's single-warp tilings (the defaults' shape) and a deeper copy ring, with
    the fused widening and V by words (int4), lazy rescale."""
    extra = dict(fused=True, v_words=3) if kv == "int4" else dict(fused=True)
    check_decode(kv, "mqa-splits", fast=True, block_n=block_n, num_warps=warps,
                 num_stages=stages, lazy=8, **extra)


@pytest.mark.parametrize("kv", ["int4", "int8"])
@pytest.mark.parametrize("case", ["gqa", "mqa-splits", "window-softcap"])
def test_packed_decode_deferred_sum_equals_reference(kv, case):
    """The softmax denominators summed across lanes once, after the loop (16-key tiles: many
    tiles a split, ragged last tiles): the reference's values."""
    extra = dict(fused=True, v_words=3) if kv == "int4" else dict(fused=True)
    check_decode(kv, case, fast=True, block_n=16, num_warps=1, lazy=0, l_defer=True, **extra)


@pytest.mark.parametrize("kv", ["int4", "int8"])
@pytest.mark.parametrize("case", ["gqa", "mqa-splits", "window-softcap"])
@pytest.mark.parametrize("lazy", [1, 8])
def test_packed_decode_lazy_rescale_equals_reference(kv, case, lazy):
    """The running max moved only past a threshold (the accumulators' rescale skipped on the
    other tiles): the reference's values. 16-key tiles: many tiles a split, both branches taken."""
    check_decode(kv, case, fast=True, v_words=3 if kv == "int4" else 0, lazy=lazy, block_n=16)


@pytest.mark.parametrize("kv", ["int4", "int4,int8", "int8,int4"])
@pytest.mark.parametrize("case", ["d128", "d128-splits", "d128-window", "d256-splits"])
@pytest.mark.parametrize("block_n", [16, 32])
@pytest.mark.parametrize("v_words,k_words,one_page,lazy,l_defer", [
    (4, 0, 0, 0, False), (3, 1, 0, 0, False), (3, 0, 1, 0, False), (4, 1, 1, 0, False), (4, 1, 2, 0, False),
    (4, 1, 2, 1, False), (4, 1, 2, 1, True), (5, 1, 2, 0, False), (5, 1, 2, 1, True), (5, 0, 0, 0, False)])
def test_packed_decode_nibble_dots_and_page_tiles_equal_reference(kv, case, block_n, v_words, k_words, one_page, lazy,
                                                                   l_defer):
    """Issue 16, session 9: int4 V (``v_words`` 4; 5: its words loaded keys-fastest, session 16)
    and K (``k_words``) as eight dots, one per nibble position, tiles' block-table entries read as scalars (``one_page`` 1; 32-key tiles
    span two pages of 16), a tile ahead (2), the lazy rescale over the eight accumulators: the
    reference's values, ragged last tiles and splits included."""
    check_decode(kv, case, fast=True, fused=True, lazy=lazy, block_n=block_n, num_warps=1,
                 v_words=v_words, k_words=k_words, one_page=one_page, l_defer=l_defer)


@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
@pytest.mark.parametrize("case", ["d128", "d128-splits"])
@pytest.mark.parametrize("block_n,num_stages", [(16, 3), (16, 4), (32, 3)])
def test_packed_decode_pages_ahead_deeper_pipeline_equals_reference(kv, case, block_n, num_stages):
    """Block-table entries a tile ahead (``one_page`` 2) let the pipeliner keep 2-3 tiles of K/V
    in flight at 3-4 stages (issue 16, session 14): the reference's values, ragged tiles and
    splits included."""
    check_decode(kv, case, fast=True, fused=True, block_n=block_n, num_warps=1, num_stages=num_stages,
                 v_words=4, k_words=1, one_page=2)


def other_layout(kv: str, monkeypatch) -> None:
    """Force the page layout that ``kv``'s default does not take (``kv_pages.HEAD_MAJOR_BY_BITS``:
    int4 head-major, int8 token-major), so that every format's kernels are tested over both."""
    spec = FullAttention(1, 32, 1, packed=resolve(kv, None, None, torch.float32)[1])
    monkeypatch.setattr(kv_pages, "HEAD_MAJOR", not kv_pages.layout(spec, 16).head_major)


@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
def test_write_kernels_store_the_reference_bytes_in_the_other_layout(kv, monkeypatch):
    """Pages in the layout the format's default does not take (int4 token-major, int8 head-major):
    both write kernels store ``kv_pages.write``'s bytes."""
    other_layout(kv, monkeypatch)
    for rows in (0, 4):
        test_write_kernel_stores_the_reference_bytes(kv, True, rows)


@pytest.mark.parametrize("kv", ["int4", "int8", "int8,int4"])
@pytest.mark.parametrize("case", ["gqa", "d128", "d128-splits", "d128-window"])
@pytest.mark.parametrize("variant", ["default", "plain", "pages-ahead-st3", "one-page-16", "tiles-32"])
def test_packed_decode_in_the_other_layout_equals_reference(kv, case, variant, monkeypatch):
    """The decode kernels over pages in the layout the format's default does not take: the
    reference's values, with the default launch, the plain kernel, entries a tile ahead at 3
    stages, one-page tiles and 32-key tiles spanning two pages."""
    other_layout(kv, monkeypatch)
    kw = {"default": {}, "plain": dict(fast=False),
          "pages-ahead-st3": dict(fast=True, fused=True, block_n=16, num_warps=1, num_stages=3,
                                  v_words=4, k_words=1, one_page=2),
          "one-page-16": dict(fast=True, fused=True, block_n=16, num_warps=1, one_page=1),
          "tiles-32": dict(fast=True, fused=True, block_n=32, num_warps=1, one_page=1)}[variant]
    check_decode(kv, case, **kw)


@gpu
@pytest.mark.parametrize("kv", ["int4", "int8"])
def test_packed_decode_fp16_query_equals_reference(kv):
    check_decode(kv, "gqa", dtype=torch.float16)  # the PTX's fp16 magic numbers


def check_decode(kv, case, dtype=None, **variant):
    c = dict(DECODE[case])
    computed, H, KVH, D = c.pop("computed"), c.pop("H"), c.pop("KVH"), c.pop("D")
    window, softcap, splits = c.pop("window", None), c.pop("softcap", None), c.pop("splits", None)
    bs, dtype = 16, dtype or (torch.bfloat16 if CUDA else torch.float32)
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    nb = sum(-(-(n + 1) // bs) for n in computed) + 2
    batch = make_batch(computed, [1] * len(computed), bs, nb, gen=gen)
    cache = cache_for(kv, KVH, D, nb, bs)
    # Fill every page with keys (the cached prefix), then decode one token per sequence.
    all_k = torch.randn(nb * bs, KVH, D, generator=gen).to(DEV)
    all_v = torch.randn(nb * bs, KVH, D, generator=gen).to(DEV)
    slots = torch.arange(nb * bs, device=DEV)
    kv_pages.write(cache, 0, all_k, slots)
    kv_pages.write(cache, 1, all_v, slots)
    B = len(computed)
    q = torch.randn(B, H, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, KVH, D, generator=gen).to(DEV, dtype)
    v = torch.randn(B, KVH, D, generator=gen).to(DEV, dtype)
    ref_cache = cache.clone()
    ref_cache.kv_layout = cache.kv_layout
    ref = reference.packed_attention(q, k, v, ref_cache, batch, 0, D ** -0.5, window, softcap)
    write_packed(cache, k, v, batch.slot_mappings[0])
    assert torch.equal(cache, ref_cache)  # the decode write stores the reference's bytes
    out = packed_decode(q, cache, batch.block_tables[0], batch.num_computed, D ** -0.5, window, None, softcap,
                        max_seq_len=batch.max_seq_len, splits=splits, **variant)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-4)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@gpu
@pytest.mark.parametrize("kv", ["int4", "int8,int4"])
def test_engine_tokens_triton_equal_reference_int_cache(tiny_model, kv):
    from qkv import LLM, SamplingParams

    path, _ = tiny_model("llama", head_dim=64)
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 61)]
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("reference", "triton"):
        llm = LLM(path, dtype="float32", device="cuda", block_size=16, num_kv_blocks=64, kv_dtype=kv,
                  attention_backend=backend, enforce_eager=backend == "reference")
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    assert outs["triton"] == outs["reference"]
