"""The PTX that widens packed latent words in ``attention/triton/mla_packed.py``, run by a small
emulator of the instructions it uses (no GPU), against the reference dequantization: each
widened value must equal ``kv_int``'s (int4: the integer times its e5m3 scale; int8: the fp32
product cast) bit for bit, in the lane order the kernel joins the outputs in.

The emulator rounds each float instruction once (round to nearest even), as PTX's ``.rn``
does: an exact float64 result cast to the instruction's type (these operands' products and
sums are exact in float64).
"""

from __future__ import annotations

import re

import pytest
import torch

from qkv.kvcache.kv_int import e5m3_decode

mla_packed = pytest.importorskip("qkv.attention.triton.mla_packed")  # needs triton to import

F = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _f(bits: int, t: str) -> float:
    """The value of a 16- or 32-bit pattern of type t."""
    dt = {"bf16": torch.int16, "f16": torch.int16, "f32": torch.int32}[t]
    if t != "f32" and bits >= 1 << 15:
        bits -= 1 << 16
    if t == "f32" and bits >= 1 << 31:
        bits -= 1 << 32
    return torch.tensor([bits], dtype=dt).view(F[t]).double().item()


def _bits(x: float, t: str) -> int:
    """x rounded once to type t (nearest even), as its bit pattern."""
    v = torch.tensor([x], dtype=torch.float64).to(F[t])
    b = v.view(torch.int16 if t != "f32" else torch.int32).item()
    return b & (0xFFFF if t != "f32" else 0xFFFFFFFF)


def _prmt(a: int, b: int, sel: int) -> int:
    src = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(src[(sel >> 4 * i) & 7] for i in range(4)), "little")


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for i in range(32):
        k = ((a >> i) & 1) << 2 | ((b >> i) & 1) << 1 | ((c >> i) & 1)
        out |= ((lut >> k) & 1) << i
    return out


def _pair(fn, t, *regs):
    """A paired 16-bit instruction: fn over each half, rounded once to t."""
    lo = _bits(fn(*(_f(r & 0xFFFF, t) for r in regs)), t)
    hi = _bits(fn(*(_f(r >> 16, t) for r in regs)), t)
    return hi << 16 | lo


def emulate(asm: str, args: list[int], n_out: int) -> list[int]:
    """Run the asm block on 32-bit ``args`` ($n_out, ...); returns $0 .. $n_out-1."""
    reg = {f"${n_out + i}": v & 0xFFFFFFFF for i, v in enumerate(args)}

    def val(x: str) -> int:
        if x in reg:
            return reg[x]
        if x.startswith("0f"):
            return int(x[2:], 16)
        return int(x, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *s = [x.strip() for x in rest.split(",")]
        v = [val(x) for x in s]
        if op == "mov.b32":
            r = v[0]
        elif op == "xor.b32":
            r = v[0] ^ v[1]
        elif op == "shr.b32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = v[0] << v[1]
        elif op == "prmt.b32":
            r = _prmt(v[0], v[1], v[2])
        elif op == "lop3.b32":
            r = _lop3(v[0], v[1], v[2], v[3])
        elif m := re.fullmatch(r"fma\.rn\.(bf16|f16)x2", op):
            r = _pair(lambda a, b, c: a * b + c, m.group(1), *v)
        elif m := re.fullmatch(r"mul\.rn\.(bf16|f16)x2", op):
            r = _pair(lambda a, b: a * b, m.group(1), *v)
        elif op == "fma.rn.f32":
            r = _bits(_f(v[0], "f32") * _f(v[1], "f32") + _f(v[2], "f32"), "f32")
        elif op in ("sub.rn.f32", "mul.rn.f32"):
            a, b = _f(v[0], "f32"), _f(v[1], "f32")
            r = _bits(a - b if op.startswith("sub") else a * b, "f32")
        elif m := re.fullmatch(r"cvt\.rn\.(bf16|f16)x2\.f32", op):  # d = {hi: s0, lo: s1}
            r = _bits(_f(v[0], "f32"), m.group(1)) << 16 | _bits(_f(v[1], "f32"), m.group(1))
        else:
            raise AssertionError(f"emulator: no {op}")
        reg[d] = r & 0xFFFFFFFF
    return [reg[f"${i}"] for i in range(n_out)]


def _halves(r: int, t: str) -> tuple[float, float]:
    return _f(r & 0xFFFF, t), _f(r >> 16, t)


@pytest.mark.parametrize("seed", range(3))
def test_int4_fused_fma_is_the_reference(seed):
    """I4F_ASM: output m of two words holds nibble m of each, = (n - 8) * s exactly in bf16."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        w = torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64).tolist()
        codes = torch.randint(1, 248, (2,), generator=g, dtype=torch.int64)
        s = e5m3_decode(codes.to(torch.uint8)).double().tolist()
        sc = _bits(s[1], "bf16") << 16 | _bits(s[0], "bf16")
        off = _bits(-136 * s[1], "bf16") << 16 | _bits(-136 * s[0], "bf16")
        out = emulate(mla_packed.I4F_ASM.value, [w[0], w[1], sc, off], 8)
        for m in range(8):
            got = _halves(out[m], "bf16")
            want = tuple(_f(_bits((((w[k] >> 4 * m) & 15) - 8) * s[k], "bf16"), "bf16") for k in range(2))
            assert got == want, (m, w, s)


@pytest.mark.parametrize("asm,t", [("I8W_ASM_BF16", "bf16"), ("I8H_ASM", "f16")])
def test_int8_words_are_the_reference(asm, t):
    """I8W_ASM_BF16 (fp32 scales) and I8H_ASM (fp16 scales, the F16 variant): output m of two
    words holds byte m of each, = the signed byte times its fp16 scale, rounded once to t."""
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        w = torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64).tolist()
        s = (torch.rand(2, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-12, 6, (2,), generator=g))
        s = s.to(torch.float16).double().tolist()  # the cache's fp16 scales
        if t == "bf16":
            args = [w[0], w[1], _bits(s[0], "f32"), _bits(s[1], "f32")]
        else:
            args = [w[0], w[1], _bits(s[1], "f16") << 16 | _bits(s[0], "f16")]
        out = emulate(getattr(mla_packed, asm).value, args, 4)
        for m in range(4):
            byte = [((w[k] >> 8 * m) & 255) for k in range(2)]
            v = [b - 256 if b >= 128 else b for b in byte]
            want = tuple(_f(_bits(_f(_bits(v[k] * s[k], "f32"), "f32"), t), t) for k in range(2))
            assert _halves(out[m], t) == want, (m, w, s)
