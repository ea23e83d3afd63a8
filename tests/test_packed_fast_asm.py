"""The one-fma int4 widening PTX of ``attention/triton/packed_widen.py`` (``fused``: the byte
form for K and V halves, and the word form for V read as words), run by the emulator of
tests/test_mla_packed_asm.py against the reference dequantization: every widened value must
equal ``kv_int``'s (the integer times its e5m3 scale, exact in bf16) bit for bit, in the
register lanes the kernel reads them from.
"""

from __future__ import annotations

import pytest
import torch

from qkv.kvcache.kv_int import e5m3_decode
from test_mla_packed_asm import _bits, _f, _halves, emulate

packed_widen = pytest.importorskip("qkv.attention.triton.packed_widen")  # needs triton to import
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _scales(g, n):
    s = e5m3_decode(torch.randint(1, 248, (n,), generator=g, dtype=torch.int64).to(torch.uint8)).double().tolist()
    return s, [_bits(x, "bf16") for x in s], [_bits(-136 * x, "bf16") for x in s]


def _want(n: int, s: float) -> float:
    return _f(_bits((n - 8) * s, "bf16"), "bf16")


@pytest.mark.parametrize("seed", range(3))
def test_int4_bytes_fused_is_the_reference(seed):
    """I4F_ASM_BF16 (pack=4 bytes in $4; scales $5, $6 and -136 s $7, $8, two elements each):
    $0, $1 the low nibbles of bytes (0, 1), (2, 3); $2, $3 their high nibbles."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        word = torch.randint(0, 1 << 32, (1,), generator=g, dtype=torch.int64).item()
        s, sb, sn = _scales(g, 4)
        args = [word, sb[1] << 16 | sb[0], sb[3] << 16 | sb[2], sn[1] << 16 | sn[0], sn[3] << 16 | sn[2]]
        out = emulate(packed_widen.I4F_ASM_BF16.value, args, 4)
        byte = [(word >> 8 * i) & 255 for i in range(4)]
        for reg, (e0, hi) in enumerate([(0, 0), (2, 0), (0, 1), (2, 1)]):
            want = tuple(_want((byte[e] >> 4 * hi) & 15, s[e]) for e in (e0, e0 + 1))
            assert _halves(out[reg], "bf16") == want, (reg, word, s)


@pytest.mark.parametrize("seed", range(3))
def test_int4_words_fused_is_the_reference(seed):
    """I4WF_ASM_BF16 (pack=2 words $8, $9; scales $10, -136 s $11): output m holds nibble m
    of each word."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        w = torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64).tolist()
        s, sb, sn = _scales(g, 2)
        out = emulate(packed_widen.I4WF_ASM_BF16.value, [w[0], w[1], sb[1] << 16 | sb[0], sn[1] << 16 | sn[0]], 8)
        for m in range(8):
            want = tuple(_want((w[k] >> 4 * m) & 15, s[k]) for k in range(2))
            assert _halves(out[m], "bf16") == want, (m, w, s)


def test_int8_words_fused_is_the_reference():
    """I8WF_ASM_BF16 (pack=2 words $4, $5; fp32 s / 256 $6, $7 and -(2^15 + 2^7) s $8, $9):
    output m holds byte m of each word, = the signed byte times its fp16 scale rounded once to bf16."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        w = torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64).tolist()
        s = (torch.rand(2, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-24, 16, (2,), generator=g))
        s = s.to(torch.float16).double().tolist()  # the cache's fp16 scales, subnormal ones too
        args = [w[0], w[1], _bits(s[0] / 256, "f32"), _bits(s[1] / 256, "f32"), _bits(-32896 * s[0], "f32"),
                _bits(-32896 * s[1], "f32")]
        out = emulate(packed_widen.I8WF_ASM_BF16.value, args, 4)
        for m in range(4):
            v = [((w[k] >> 8 * m) & 255) for k in range(2)]
            v = [b - 256 if b >= 128 else b for b in v]
            want = tuple(_f(_bits(v[k] * s[k], "bf16"), "bf16") for k in range(2))
            assert _halves(out[m], "bf16") == want, (m, w, s)


def test_e5m3_to_bf16_scales_is_exact():
    """SC_ASM_BF16: every code pair (all 248 codes, subnormal ones included) -> (s, -136 s) in bf16,
    exactly the decoded scale and its multiple (lanes as the codes')."""
    codes = list(range(248))
    s = e5m3_decode(torch.tensor(codes, dtype=torch.uint8)).double().tolist()
    for i in range(0, 248, 2):
        out = emulate(packed_widen.SC_ASM_BF16.value, [codes[i + 1] << 16 | codes[i]], 2)
        assert _halves(out[0], "bf16") == (s[i], s[i + 1]), i
        assert _halves(out[1], "bf16") == (-136 * s[i], -136 * s[i + 1]), i


@triton.jit
def _scales_kernel(C, S1, S2, N: tl.constexpr):
    i = tl.arange(0, N)
    s1, s2 = packed_widen._fused_scales(tl.load(C + i))
    tl.store(S1 + i, s1)
    tl.store(S2 + i, s2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the PTX on the device)")
def test_e5m3_to_bf16_scales_on_gpu():
    """The same on the device: bf16 multiplies keep subnormal inputs (codes 1..7), not flush them."""
    c = torch.arange(256, device="cuda").clamp(max=247).to(torch.uint8)
    s1 = torch.empty(256, dtype=torch.bfloat16, device="cuda")
    s2 = torch.empty_like(s1)
    _scales_kernel[(1,)](c, s1, s2, N=256)
    want = e5m3_decode(c)
    assert torch.equal(s1.double(), want.double())
    assert torch.equal(s2.double(), -136 * want.double())
