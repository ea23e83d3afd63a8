"""MLA over int8/int4 latent pages in Triton (qkv/attention/triton/mla_packed.py) against the
reference MLA over the same pages (qkv/attention/mla_reference.py), the oracle.

The quantizing write must store ``kv_pages.write``'s bytes (a row written by a decode equals
one written by a prefill: prefix hits cannot change a score); decode steps (the packed
absorbed decode kernel) and steps with prompt tokens (``mla_extend``: prefix rows gathered
from the packed pages, decodes beside chunks through the kernel) must give the reference's
outputs and leave its bytes. Without CUDA the kernels run under Triton's interpreter in fp32.
"""

from __future__ import annotations

import pytest
import torch

from test_triton_packed import CUDA, DEV, make_batch  # noqa: I001  (sets TRITON_INTERPRET, patches the interpreter)
from qkv.attention import mla_reference
from qkv.attention.triton import mla as triton_mla
from qkv.attention.triton.mla_packed import kernels_read, write_latent
from qkv.kvcache import kv_pages
from qkv.kvcache.kv_int import resolve
from qkv.kvcache.spec import MLA

STEPS = {
    "decode": ([5, 40, 17], [1, 1, 1]),
    "prompts": ([0, 0], [13, 29]),
    "prefix-and-chunks": ([16, 5], [20, 9]),
    "mixed": ([30, 0, 17, 8], [1, 11, 1, 6]),
}


def latent_cache(kv: str, R: int, P: int, num_blocks: int, bs: int, gen) -> torch.Tensor:
    """A packed latent cache whose every slot holds a quantized random row (so a wrong page or
    offset read shows)."""
    spec = MLA(R, P, 1, packed=resolve(kv, None, None, torch.float32)[1])
    cache = kv_pages.new_cache(spec, num_blocks, bs, torch.uint8, DEV)
    rows = torch.randn(num_blocks * bs, 1, R + P, generator=gen).to(DEV)
    kv_pages.write(cache, 0, rows, torch.arange(num_blocks * bs, device=DEV))
    return cache


def copy(cache: torch.Tensor) -> torch.Tensor:
    c = cache.clone()
    c.kv_layout = cache.kv_layout
    return c


@pytest.mark.parametrize("kv", ["int8", "int4"])
@pytest.mark.parametrize("R,P", [(32, 16), (512, 64)])
def test_write_kernel_stores_the_reference_bytes(kv, R, P):
    gen = torch.Generator().manual_seed(3)
    bs, nb = 4, 4
    ref, got = latent_cache(kv, R, P, nb, bs, gen), None
    got = copy(ref)
    rows = torch.randn(6, R + P, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 1.0, 2.0, 0.5])[:, None]
    rows[1, :16] = 0.0  # an all-zero group
    rows = rows.to(DEV)
    slots = torch.tensor([3, 0, -1, 13, 8, 15], device=DEV)
    keep = slots >= 0
    assert kernels_read(ref, R, P)
    kv_pages.write(ref, 0, rows[keep][:, None], slots[keep])
    write_latent(got, rows, R, slots)
    assert torch.equal(ref, got)


def run_step(kv, computed, qlens, H, R, P, DN, DV, dtype, seed=0, bs=8):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + q) // bs) for c, q in zip(computed, qlens)) + 3
    batch = make_batch(computed, qlens, bs, num_blocks, None, gen)
    T = sum(qlens)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)  # noqa: E731
    cache = latent_cache(kv, R, P, num_blocks, bs, gen)
    q_nope, q_pe, c_kv, k_pe = rnd(T, H, DN), rnd(T, H, P), rnd(T, R), rnd(T, P)
    w = rnd(H, DN + DV, R) / R ** 0.5
    w_uk, w_uv = w[:, :DN], w[:, DN:]
    scale = (DN + P) ** -0.5
    ours_cache, ref_cache = copy(cache), copy(cache)
    ours = triton_mla.mla_paged_attention(q_nope, q_pe, c_kv, k_pe, ours_cache, batch, 0, scale, w_uk, w_uv, True)
    ref = mla_reference.mla_paged_attention(q_nope, q_pe, c_kv, k_pe, ref_cache, batch, 0, scale, w_uk, w_uv, True)
    return ours, ref, ours_cache, ref_cache


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kv", ["int8", "int4"])
@pytest.mark.parametrize("step", list(STEPS))
def test_step_matches_reference(kv, step):
    """fp32 (the interpreter, or IEEE dots on the GPU): outputs within 1e-4, the same bytes."""
    computed, qlens = STEPS[step]
    ours, ref, oc, rc = run_step(kv, computed, qlens, H=3, R=32, P=16, DN=16, DV=12, dtype=torch.float32)
    assert ours.shape == ref.shape == (sum(qlens), 3, 12)
    assert rel(ours, ref) < (1e-4 if not CUDA else 1e-3), (kv, step)
    assert torch.equal(oc, rc)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["int8", "int4"])
@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_deepseek_shape_bf16(kv, step):
    """DeepSeek-V2-Lite's head shapes (16 heads, latent 512 + 64, 128 | 128) in bf16."""
    computed, qlens = STEPS[step]
    computed = [c * 20 for c in computed]  # several tiles and splits
    ours, ref, oc, rc = run_step(kv, computed, qlens, H=16, R=512, P=64, DN=128, DV=128, dtype=torch.bfloat16)
    assert rel(ours, ref) < 2e-2
    assert torch.equal(oc, rc)


def test_kernels_read_rule():
    gen = torch.Generator().manual_seed(0)
    assert kernels_read(latent_cache("int4", 512, 64, 2, 16, gen), 512, 64)
    assert kernels_read(latent_cache("int8", 512, 64, 2, 16, gen), 512, 64)
    assert not kernels_read(latent_cache("int8", 24, 8, 2, 16, gen), 24, 8)  # not powers of two: the reference
    assert not kernels_read(torch.zeros(2, 16, 576), 512, 64)  # a float cache is not packed


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["int8", "int4"])
@pytest.mark.parametrize("variant", [dict(), dict(rows_on_m=0, chunks=4), dict(chunks=2, prefetch=2),
                                     dict(f16=1, chunks=4), dict(prefetch=0, rows_on_m=0)])
def test_decode_variants_deepseek_shape(kv, variant):
    """Each variant of the packed decode kernel (``mla_packed.VARIANT``; bf16 queries, PTX
    widening) against an fp32 computation over the rows as stored (``kv_pages.read``), at
    DeepSeek-V2-Lite's latent shape with several tiles, splits and a partial last page."""
    from qkv.attention.triton.mla import mla_decode

    gen = torch.Generator().manual_seed(5)
    H, R, P, bs, B, ctx = 16, 512, 64, 16, 3, 300
    nb = B * (ctx // bs + 1)
    spec = MLA(R, P, 1, packed=resolve(kv, None, None, torch.bfloat16)[1])
    cache = kv_pages.new_cache(spec, nb, bs, torch.uint8, DEV)
    write_latent(cache, torch.randn(nb * bs, R + P, generator=gen).to(DEV, torch.bfloat16), R,
                 torch.arange(nb * bs, device=DEV))
    stored = kv_pages.read(cache, 0, torch.arange(nb * bs, device=DEV), torch.float32)[:, 0]
    table = torch.randperm(nb, generator=gen).view(B, -1).to(DEV, torch.int32)
    nc = torch.tensor([ctx - 1, ctx // 2, 40], device=DEV)
    ql = torch.randn(B, H, R, generator=gen).to(DEV, torch.bfloat16)
    qr = torch.randn(B, H, P, generator=gen).to(DEV, torch.bfloat16)
    for splits in (1, 4):
        out = mla_decode(ql, qr, cache, table, nc, 0.1, splits=splits, variant=variant)
        for b in range(B):
            keys = stored.view(nb, bs, R + P)[table[b].long()].reshape(-1, R + P)[: int(nc[b]) + 1]
            s = ql[b].float() @ keys[:, :R].T + qr[b].float() @ keys[:, R:].T
            ref = (s * 0.1).softmax(-1) @ keys[:, :R]
            assert rel(out[b], ref) < 1e-2, (kv, variant, splits, b)
