"""The fast packed decode kernel (``packed.packed_decode(fast=True)``, the default for bf16/fp16
queries on the GPU): split-K decode attention over int8/int4 pages, as ``packed``'s kernel,
with less work per cached element:

- each tile comes as two halves of D/2 columns (an int4 plane: the low and the high nibbles,
  i.e. the even and the odd columns; int8: the first and second half). Two dots of depth D/2
  replace one of depth D, and the query's columns (for K) and the output's (for V) are
  permuted to match, so no register shuffle interleaves the nibbles;
- the halves are widened in PTX (``ASM``): 4 packed bytes per asm block, paired bf16/fp16
  arithmetic on magic-number floats (int4) or byte permutes under an fp32 exponent (int8), no
  int->float conversion unit; the values equal the reference's (products exact or rounded once);
- ``KEYS_ON_M``: keys on the MMA's M dimension (transposed dots, heads padded to 8): a tile
  widened in registers is the A operand as it is (as decode.py's fp8 path).

Defaults (``packed``): int4 V read as 32-bit words into the halves (``V_WORDS`` 3, through an
opaque mov: fed straight to the dot it gave wrong values with 16-key tiles on the H200), int8
planes by words, one fma a value (pair) (``ASM`` 2), the rotations in registers (``ROT_Q``,
``ROT_O``), the lazy rescale for int8 (``LAZY``). Options kept for the record and the tests:
``V_WORDS`` 1/2, ``PREFETCH`` 1 (int4 V bytes a tile ahead) and 2 (K and V words a tile ahead
in registers; slower at batch 32 x 8k). The tiling (single-warp programs) is ``packed.FAST_TILING``.

Without ``ASM`` (Triton's interpreter, which runs no PTX) the tiles are widened by Triton ops:
the same values, so the tests check the kernel's structure on the CPU too.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qkv.attention.triton.decode import _scores
from qkv.attention.triton.page_rows import page_row

# Unpacking in PTX (ASM): each asm block takes 4 packed bytes in one register and widens them
# with bit operations and paired 16-bit arithmetic (2 elements per instruction), where the
# plain Triton ops convert each element through the (quarter-rate) int->float unit.
# int4: (nibble | 0x4300) read as bf16 is 128 + nibble (0x6400: 1024 + nibble in fp16); one
# paired fma subtracts 136 (1032), one multiplies by the group's scale: both exact, so the
# values are the reference's n * s. The scale arrives per element (elementwise semantics:
# the asm is correct whatever register layout Triton picks).
_I4_ASM = """{
.reg .b32 i4r, i4t, i4a, i4b, i4c, i4d, i4one, i4off, i4nz;
mov.b32 i4one, ONE;
mov.b32 i4off, OFF;
mov.b32 i4nz, 0x80008000;
prmt.b32 i4r, $4, 0, 0x3120;
lop3.b32 i4a, i4r, 0x000F000F, MAGIC, 0xea;
shr.b32 i4t, i4r, 4;
lop3.b32 i4b, i4t, 0x000F000F, MAGIC, 0xea;
shr.b32 i4t, i4r, 8;
lop3.b32 i4c, i4t, 0x000F000F, MAGIC, 0xea;
shr.b32 i4t, i4r, 12;
lop3.b32 i4d, i4t, 0x000F000F, MAGIC, 0xea;
fma.rn.T i4a, i4a, i4one, i4off;
fma.rn.T i4b, i4b, i4one, i4off;
fma.rn.T i4c, i4c, i4one, i4off;
fma.rn.T i4d, i4d, i4one, i4off;
fma.rn.T $0, i4a, $5, i4nz;
fma.rn.T $1, i4c, $6, i4nz;
fma.rn.T $2, i4b, $5, i4nz;
fma.rn.T $3, i4d, $6, i4nz;
}"""
I4_ASM_BF16 = tl.constexpr(_I4_ASM.replace("MAGIC", "0x43004300").replace("ONE", "0x3F803F80")
                           .replace("OFF", "0xC308C308").replace(".T", ".bf16x2"))
I4_ASM_F16 = tl.constexpr(_I4_ASM.replace("MAGIC", "0x64006400").replace("ONE", "0x3C003C00")
                          .replace("OFF", "0xE408E408").replace(".T", ".f16x2"))
# int4 in bf16 with one fma per value pair (``ASM`` 2): (128 + n) * s + (-136 s) ($7, $8: -136 s,
# exact in bf16: 8 significant bits) is (n - 8) * s exactly, so the fused fma rounds nothing and
# the separate offset fma of I4_ASM goes (4 of its 12 float instructions per 8 values). Not for
# fp16: 1032 s overflows fp16 from s = 64 on.
I4F_ASM_BF16 = tl.constexpr("\n".join(
    ["{", ".reg .b32 h4r, h4t;", "prmt.b32 h4r, $4, 0, 0x3120;"]
    + [line for sh, out, sc, off in ((0, 0, 5, 7), (4, 2, 5, 7), (8, 1, 6, 8), (12, 3, 6, 8)) for line in (
        ([f"shr.b32 h4t, h4r, {sh};"] if sh else [])
        + [f"lop3.b32 h4t, {'h4t' if sh else 'h4r'}, 0x000F000F, 0x43004300, 0xea;",
           f"fma.rn.bf16x2 ${out}, h4t, ${sc}, ${off};"])]
    + ["}"]))
# int8: byte ^ 0x80 placed under 0x4B (fp32 2^23 + u) by a byte permute, minus 2^23 + 128: the
# signed byte in fp32 exactly; times the fp32 scale, rounded once to DT (the reference's order).
_I8_ASM = """{
.reg .b32 i8w, i8f0, i8f1, i8f2, i8f3, i8hi;
mov.b32 i8hi, 0x4B000000;
xor.b32 i8w, $2, 0x80808080;
prmt.b32 i8f0, i8w, i8hi, 0x7440;
prmt.b32 i8f1, i8w, i8hi, 0x7441;
prmt.b32 i8f2, i8w, i8hi, 0x7442;
prmt.b32 i8f3, i8w, i8hi, 0x7443;
sub.rn.f32 i8f0, i8f0, 0f4B000080;
sub.rn.f32 i8f1, i8f1, 0f4B000080;
sub.rn.f32 i8f2, i8f2, 0f4B000080;
sub.rn.f32 i8f3, i8f3, 0f4B000080;
mul.rn.f32 i8f0, i8f0, $3;
mul.rn.f32 i8f1, i8f1, $4;
mul.rn.f32 i8f2, i8f2, $5;
mul.rn.f32 i8f3, i8f3, $6;
cvt.rn.T.f32 $0, i8f1, i8f0;
cvt.rn.T.f32 $1, i8f3, i8f2;
}"""
I8_ASM_BF16 = tl.constexpr(_I8_ASM.replace(".T", ".bf16x2"))
I8_ASM_F16 = tl.constexpr(_I8_ASM.replace(".T", ".f16x2"))


# e5m3 codes to bf16 scales for the one-fma widening, 2 codes per asm block (16-bit lanes of $2):
# the code shifted left by 4 is a bf16 bit pattern 2^-112 times the code's value (e5m3 is fp16
# shifted right by 7; bf16's exponent bias is 112 more than fp16's, its mantissa 3 bits shorter),
# subnormal codes included; one exact paired multiply by 2^112 (0x7780) gives s, one by
# -136 * 2^112 (0xFB08) gives -136 s. $0: s, $1: -136 s.
SC_ASM_BF16 = tl.constexpr("{\n.reg .b32 e5t, e5a, e5b;\nmov.b32 e5a, 0x77807780;\nmov.b32 e5b, 0xFB08FB08;\n"
                           "shl.b32 e5t, $2, 4;\nmul.rn.bf16x2 $0, e5t, e5a;\nmul.rn.bf16x2 $1, e5t, e5b;\n}")


@triton.jit
def _fused_scales(c):
    """(s, -136 s) in bf16 from e5m3 codes ``c`` (uint8), for I4F_ASM_BF16/I4WF_ASM_BF16."""
    return tl.inline_asm_elementwise(SC_ASM_BF16, "=r,=r,r", [c.to(tl.int16)], dtype=(tl.bfloat16, tl.bfloat16),
                                     is_pure=True, pack=2)


@triton.jit
def _int4_raw(C8, base, vals_at, scales_at, row, nmask, D: tl.constexpr, ALIGN: tl.constexpr):
    """An int4 plane's packed bytes [BLOCK_N, D/2] and e5m3 codes [BLOCK_N, D/16] for keys at
    page offsets ``base``, rows ``row`` (masked keys read zeros)."""
    boff = tl.multiple_of(base + vals_at + row * (D // 2), ALIGN * 4)
    soff = tl.multiple_of(base + scales_at + row * (D // 16), 8)
    x = tl.load(C8 + boff[:, None] + tl.arange(0, D // 2)[None, :], mask=nmask[:, None], other=0)
    c = tl.load(C8 + soff[:, None] + tl.arange(0, D // 16)[None, :], mask=nmask[:, None], other=0)
    return x, c


@triton.jit
def _int4_halves(x, c, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """An int4 plane's [BLOCK_N, D] tile (bytes ``x``, codes ``c``, as ``_int4_raw``) as two
    [BLOCK_N, D/2] halves, its even and its odd columns (each byte's low and high nibble),
    dequantized to DT: no interleaving shuffle; the caller permutes the query's and the
    output's columns instead. ``ASM``: widened in PTX (DT bf16/fp16)."""
    NG: tl.constexpr = D // 16
    HALF: tl.constexpr = D // 2
    s = (c.to(tl.int32) << 7).to(tl.int16).to(tl.float16, bitcast=True)
    if ASM == 2 and DT == tl.bfloat16:  # one fma per pair (I4F_ASM_BF16)
        s1, s2 = _fused_scales(c)
        sb = tl.reshape(tl.broadcast_to(s1[:, :, None], (BLOCK_N, NG, 8)), (BLOCK_N, HALF))
        sn = tl.reshape(tl.broadcast_to(s2[:, :, None], (BLOCK_N, NG, 8)), (BLOCK_N, HALF))
        lo, hi = tl.inline_asm_elementwise(I4F_ASM_BF16, "=r,=r,=r,=r,r,r,r,r,r", [x, sb, sn],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    elif ASM:
        sb = tl.reshape(tl.broadcast_to(s.to(DT)[:, :, None], (BLOCK_N, NG, 8)), (BLOCK_N, HALF))
        if DT == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(I4_ASM_BF16, "=r,=r,=r,=r,r,r,r", [x, sb],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(I4_ASM_F16, "=r,=r,=r,=r,r,r,r", [x, sb],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        sb = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, NG, 8)), (BLOCK_N, HALF))
        xi = x.to(tl.int32)
        lo = (((xi & 15) - 8).to(tl.float32) * sb).to(DT)
        hi = (((xi >> 4) - 8).to(tl.float32) * sb).to(DT)
    return lo, hi


@triton.jit
def _int8_half(C8, C16, boff, soff, nmask, NGH: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
               DT: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, HALF] columns of an int8 plane from byte offsets ``boff`` with NGH fp16 scales
    from ``soff``, dequantized (fp32 product rounded once to DT, as the reference)."""
    x = tl.load(C8 + boff[:, None] + tl.arange(0, HALF)[None, :], mask=nmask[:, None], other=0)
    s = tl.load(C16 + soff[:, None] + tl.arange(0, NGH)[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    sb = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NGH, HALF // NGH)), (BLOCK_N, HALF))
    if ASM:
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise(I8_ASM_BF16, "=r,=r,r,r,r,r,r", [x, sb], dtype=tl.bfloat16,
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(I8_ASM_F16, "=r,=r,r,r,r,r,r", [x, sb], dtype=tl.float16,
                                             is_pure=True, pack=4)
    else:
        return (x.to(tl.int8, bitcast=True).to(tl.float32) * sb).to(DT)


# int8 by words in bf16, one fma per value (``ASM`` 2): pack=2 over words w0 ($4), w1 ($5) with
# fp32 scales s / 256 ($6, $7) and -(2^15 + 2^7) s ($8, $9, exact: 9 x 11 bits); byte m ^ 0x80 = u
# permuted under 0x4B into bits 8..15 reads as 2^23 + 256 u, and the fma gives (u - 128) s, the
# signed byte times its scale exactly (19 bits), rounded once to bf16 (the reference's fp32
# product, cast). Output m holds byte m of both words (w0's in the low lane).
I8WF_ASM_BF16 = tl.constexpr("\n".join(
    ["{", ".reg .b32 k8a, k8b, k8f, k8g, k8hi;", "mov.b32 k8hi, 0x4B000000;",
     "xor.b32 k8a, $4, 0x80808080;", "xor.b32 k8b, $5, 0x80808080;"]
    + [line for m in range(4) for line in (
        f"prmt.b32 k8f, k8a, k8hi, 0x76{m}4;", f"prmt.b32 k8g, k8b, k8hi, 0x76{m}4;",
        "fma.rn.f32 k8f, k8f, $6, $8;", "fma.rn.f32 k8g, k8g, $7, $9;", f"cvt.rn.bf16x2.f32 ${m}, k8g, k8f;")]
    + ["}"]))


@triton.jit
def _int8_half_words(C32, C16, woff, soff, nmask, NGH: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                     DT: tl.constexpr, ASM: tl.constexpr):
    """``_int8_half``'s columns loaded as 32-bit words (``woff``: word offsets; no byte is split
    out and repacked) and widened by I8WF_ASM_BF16 (the interpreter: Triton ops, the same values)."""
    W: tl.constexpr = HALF // 4
    w = tl.load(C32 + woff[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    s = tl.load(C16 + soff[:, None] + tl.arange(0, NGH)[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
    sw = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NGH, W // NGH)), (BLOCK_N, W))
    if ASM:
        o0, o1, o2, o3 = tl.inline_asm_elementwise(I8WF_ASM_BF16, "=r,=r,=r,=r,r,r,r,r,r,r",
                                                   [w, sw * 0.00390625, sw * -32896.0],
                                                   dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2)
    else:
        o0 = (((w << 24) >> 24).to(tl.float32) * sw).to(DT)  # byte m, sign-extended
        o1 = (((w << 16) >> 24).to(tl.float32) * sw).to(DT)
        o2 = (((w << 8) >> 24).to(tl.float32) * sw).to(DT)
        o3 = ((w >> 24).to(tl.float32) * sw).to(DT)
    # word j's bytes are columns 4j .. 4j + 3 (joins lay out join(join(a, b), join(c, d)) as a, c, b, d)
    return tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), (BLOCK_N, HALF))


@triton.jit
def _halves(C8, C16, base, vals_at, scales_at, row, nmask, BITS: tl.constexpr, GRP: tl.constexpr,
            D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
            C32=None):
    """One plane's tile as two [BLOCK_N, D/2] halves (columns as ``_half_cols``)."""
    HALF: tl.constexpr = D // 2
    if BITS == 4:
        x, c = _int4_raw(C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
        return _int4_halves(x, c, D, BLOCK_N, DT, ASM)
    else:
        NG: tl.constexpr = D // GRP
        NGH: tl.constexpr = NG // 2 if NG > 1 else 1
        soff = (base + scales_at) // 2 + row * NG
        if ASM == 2 and DT == tl.bfloat16:  # by words, one fma a value
            woff = tl.multiple_of((base + vals_at) // 4 + row * (D // 4), ALIGN)
            a = _int8_half_words(C32, C16, woff, soff, nmask, NGH, HALF, BLOCK_N, DT, ASM)
            b = _int8_half_words(C32, C16, woff + HALF // 4, soff + (NG - NGH), nmask, NGH, HALF, BLOCK_N, DT, ASM)
        else:
            boff = tl.multiple_of(base + vals_at + row * D, ALIGN * 4)
            a = _int8_half(C8, C16, boff, soff, nmask, NGH, HALF, BLOCK_N, DT, ASM)
            b = _int8_half(C8, C16, boff + HALF, soff + (NG - NGH), nmask, NGH, HALF, BLOCK_N, DT, ASM)
        return a, b


@triton.jit
def _half_cols(BITS: tl.constexpr, D: tl.constexpr):
    """The columns of a plane's two halves: int4 even and odd, int8 first and second half."""
    i = tl.arange(0, D // 2)
    if BITS == 4:
        return 2 * i, 2 * i + 1
    else:
        return i, i + D // 2

# int4 by words (a V tile on the way to shared memory): pack=2 over 32-bit words (8 nibbles
# each); asm output m holds nibble m of both words, no byte is moved between registers, and
# the 8 outputs join into the tile in natural column order.
def _i4w_nibbles(word: str, out: int) -> str:
    """The four nibbles of each 16-bit half of ``word``, widened into outputs ``$out..$out+3``:
    the nibble OR'd into MAGIC's mantissa reads as MAGIC + n, one fma takes the offset off and
    one multiplies by the scale ($10)."""
    lines = []
    for j in range(4):
        if j:
            lines.append(f"shr.b32 w4t, {word}, {4 * j};")
        lines += [f"lop3.b32 w4t, {'w4t' if j else word}, 0x000F000F, MAGIC, 0xea;",
                  "fma.rn.T w4t, w4t, w4one, w4off;", f"fma.rn.T ${out + j}, w4t, $10, w4nz;"]
    return "\n".join(lines)


_I4W_ASM = "\n".join(["{", ".reg .b32 w4lo, w4hi, w4t, w4one, w4off, w4nz;", "mov.b32 w4one, ONE;",
                       "mov.b32 w4off, OFF;", "mov.b32 w4nz, 0x80008000;",
                       "prmt.b32 w4lo, $8, $9, 0x5410;", "prmt.b32 w4hi, $8, $9, 0x7632;",
                       _i4w_nibbles("w4lo", 0), _i4w_nibbles("w4hi", 4), "}"])
I4W_ASM_BF16 = tl.constexpr(_I4W_ASM.replace("MAGIC", "0x43004300").replace("ONE", "0x3F803F80")
                            .replace("OFF", "0xC308C308").replace(".T", ".bf16x2"))
I4W_ASM_F16 = tl.constexpr(_I4W_ASM.replace("MAGIC", "0x64006400").replace("ONE", "0x3C003C00")
                           .replace("OFF", "0xE408E408").replace(".T", ".f16x2"))


@triton.jit
def _int4_words(C32, C8, base, vals_at, scales_at, row, nmask, D: tl.constexpr, BLOCK_N: tl.constexpr,
                ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr, ORDER: tl.constexpr):
    """An int4 plane's [BLOCK_N, D] tile, loaded as 32-bit words: ORDER 1 natural column order,
    2 in ``_words_cols`` order (each asm output register's two values side by side)."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    voff = tl.multiple_of((base + vals_at) // 4 + row * W, ALIGN)
    w = tl.load(C32 + voff[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    soff = tl.multiple_of(base + scales_at + row * NG, 8)
    c = tl.load(C8 + soff[:, None] + tl.arange(0, NG)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
    s = (c << 7).to(tl.int16).to(tl.float16, bitcast=True)
    if ASM:
        sw = tl.reshape(tl.broadcast_to(s.to(DT)[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
        if DT == tl.bfloat16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.bfloat16,) * 8, is_pure=True,
                pack=2)
        else:
            sw = tl.reshape(tl.broadcast_to(s.to(DT)[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        sw = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
        o0 = ((((w >> 0) & 15) - 8).to(tl.float32) * sw).to(DT)
        o1 = ((((w >> 4) & 15) - 8).to(tl.float32) * sw).to(DT)
        o2 = ((((w >> 8) & 15) - 8).to(tl.float32) * sw).to(DT)
        o3 = ((((w >> 12) & 15) - 8).to(tl.float32) * sw).to(DT)
        o4 = ((((w >> 16) & 15) - 8).to(tl.float32) * sw).to(DT)
        o5 = ((((w >> 20) & 15) - 8).to(tl.float32) * sw).to(DT)
        o6 = ((((w >> 24) & 15) - 8).to(tl.float32) * sw).to(DT)
        o7 = ((((w >> 28) & 15) - 8).to(tl.float32) * sw).to(DT)
    if ORDER == 1:  # nested joins: the innermost pairs (m, m + 4), then + 2, then + 1: flat index m
        t = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
        return tl.reshape(t, (BLOCK_N, D))
    else:  # words 2i, 2i + 1 of one register kept side by side: [keys, i, m, word parity]
        H2: tl.constexpr = W // 2
        r0 = tl.reshape(o0, (BLOCK_N, H2, 2))
        r1 = tl.reshape(o1, (BLOCK_N, H2, 2))
        r2 = tl.reshape(o2, (BLOCK_N, H2, 2))
        r3 = tl.reshape(o3, (BLOCK_N, H2, 2))
        r4 = tl.reshape(o4, (BLOCK_N, H2, 2))
        r5 = tl.reshape(o5, (BLOCK_N, H2, 2))
        r6 = tl.reshape(o6, (BLOCK_N, H2, 2))
        r7 = tl.reshape(o7, (BLOCK_N, H2, 2))
        t = tl.join(tl.join(tl.join(r0, r4), tl.join(r2, r6)), tl.join(tl.join(r1, r5), tl.join(r3, r7)))
        return tl.reshape(tl.permute(t, (0, 1, 3, 4, 5, 2)), (BLOCK_N, D))


@triton.jit
def _words_cols(D: tl.constexpr):
    """Column of each position of a ``_int4_words`` ORDER 2 tile: 8 * word + nibble."""
    f = tl.arange(0, D)
    return 8 * (2 * (f // 16) + f % 2) + (f // 2) % 8


@triton.jit
def _keys(BT_ROW, start, hi, ring, page_bytes, kvh, KVH: tl.constexpr, BS: tl.constexpr,
          BLOCK_N: tl.constexpr, HAS_RING: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Keys [start, start + BLOCK_N): (valid mask, byte offset of each key's page, its row in
    the page's planes for this KV head)."""
    pos = start + tl.arange(0, BLOCK_N)
    nmask = pos < hi
    pg = pos // BS
    if HAS_RING:
        pg = pg % ring
    blk = tl.load(BT_ROW + pg, mask=nmask, other=0).to(tl.int64)
    return nmask, blk * page_bytes, page_row(pos % BS, kvh, KVH, BS, HEAD_MAJOR)


@triton.jit
def _page_entries(BT_ROW, start, hi, ring, BS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RING: tl.constexpr):
    """The block-table entries (scalars) of a page-aligned tile's page(s): (first, second; the
    second is the first when BLOCK_N <= BS). Past ``hi``: 0 (not read)."""
    pg = start // BS
    if HAS_RING:
        pg = pg % ring
    e0 = tl.load(BT_ROW + pg, mask=start < hi, other=0)
    e1 = e0
    if BLOCK_N > BS:
        pg2 = start // BS + 1
        if HAS_RING:
            pg2 = pg2 % ring
        e1 = tl.load(BT_ROW + pg2, mask=start + BS < hi, other=0)
    return e0, e1


@triton.jit
def _keys_entries(e0, e1, start, hi, page_bytes, kvh, KVH: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_MAJOR: tl.constexpr):
    """``_keys_one_page`` from entries ``_page_entries`` loaded earlier (``ONE_PAGE`` 2: a tile
    ahead, so the copies' addresses never wait on a block-table load)."""
    pos = start + tl.arange(0, BLOCK_N)
    if BLOCK_N > BS:
        base = tl.where(tl.arange(0, BLOCK_N) < BS, e0.to(tl.int64) * page_bytes, e1.to(tl.int64) * page_bytes)
    else:
        base = tl.zeros([BLOCK_N], tl.int64) + e0.to(tl.int64) * page_bytes
    nmask = pos < hi  # (before the row: the token-major build's op order, and so its SASS, unchanged)
    t = pos % BS
    if HEAD_MAJOR and BLOCK_N <= BS:  # one page: the tile's rows are one run, as arange shows the
        t = start % BS + tl.arange(0, BLOCK_N)  # compiler (500 -> 473 SASS a 16-key tile, sm_90)
    return nmask, base, page_row(t, kvh, KVH, BS, HEAD_MAJOR)


@triton.jit
def _keys_one_page(BT_ROW, start, hi, ring, page_bytes, kvh, KVH: tl.constexpr, BS: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_RING: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """``_keys`` for tiles aligned to pages (``ONE_PAGE``: tiles start at multiples of BLOCK_N,
    and BLOCK_N divides BS or is 2 BS): a tile's block-table entries are one or two scalar
    loads and its page offsets scalars (splat), not a load and a 64-bit product per key."""
    pos = start + tl.arange(0, BLOCK_N)
    pg = start // BS
    if BLOCK_N > BS:  # two pages
        pg2 = pg + 1
        if HAS_RING:
            pg2 = pg2 % ring
        blk2 = tl.load(BT_ROW + pg2, mask=start + BS < hi, other=0).to(tl.int64) * page_bytes
    if HAS_RING:
        pg = pg % ring
    blk = tl.load(BT_ROW + pg).to(tl.int64) * page_bytes
    if BLOCK_N > BS:
        base = tl.where(tl.arange(0, BLOCK_N) < BS, blk, blk2)
    else:
        base = tl.zeros([BLOCK_N], tl.int64) + blk
    nmask = pos < hi  # (before the row: the token-major build's op order, and so its SASS, unchanged)
    t = pos % BS
    if HEAD_MAJOR and BLOCK_N <= BS:  # one page: the tile's rows are one run, as arange shows the
        t = start % BS + tl.arange(0, BLOCK_N)  # compiler (500 -> 473 SASS a 16-key tile, sm_90)
    return nmask, base, page_row(t, kvh, KVH, BS, HEAD_MAJOR)


# int4 by words in bf16, one fma per value pair (as mla_packed.I4F_ASM): pack=2 over words
# w0 ($8), w1 ($9) of one key; output m holds nibble m of both; $10 the scales, $11 -136 s.
I4WF_ASM_BF16 = tl.constexpr("\n".join(
    ["{", ".reg .b32 g4lo, g4hi, g4t;", "prmt.b32 g4lo, $8, $9, 0x5410;", "prmt.b32 g4hi, $8, $9, 0x7632;"]
    + [line for half, word in ((0, "g4lo"), (4, "g4hi")) for j in range(4) for line in (
        ([f"shr.b32 g4t, {word}, {4 * j};"] if j else [])
        + [f"lop3.b32 g4t, {'g4t' if j else word}, 0x000F000F, 0x43004300, 0xea;",
           f"fma.rn.bf16x2 ${half + j}, g4t, $10, $11;"])]
    + ["}"]))


@triton.jit
def _int4_word_halves(C32, C8, base, vals_at, scales_at, row, nmask, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """An int4 plane's tile as ``_int4_halves`` returns it (even columns, odd columns), loaded
    as 32-bit words: a register holds 8 packed values as loaded (no byte is split out and
    repacked, as a byte tile carried to the next iteration in registers is), widened by words
    (I4WF_ASM_BF16 for bf16, else I4W_ASM) and joined in-thread into the halves."""
    w, c = _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
    lo, hi = _widen_word_halves(w, c, D, BLOCK_N, DT, ASM)
    # (through a no-op Triton cannot see into, as mla_packed._opaque: with 16-key tiles the halves
    # fed the transposed dot straight from the joins gave wrong values on the H200, session 7
    # round 1, max |error| 0.14; with 32-key tiles and in the register-prefetch path they were right)
    return _opaque(lo, ASM), _opaque(hi, ASM)


@triton.jit
def _opaque(t, ASM: tl.constexpr):
    """t through a non-pure ``mov`` (mla_packed._opaque): Triton's layout analysis stops here."""
    if ASM:
        t = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=t.dtype, is_pure=False, pack=2)
    return t


@triton.jit
def _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D: tl.constexpr, ALIGN: tl.constexpr):
    """An int4 plane's packed words [BLOCK_N, D/8] and e5m3 codes [BLOCK_N, D/16] (masked keys: zeros)."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    voff = tl.multiple_of((base + vals_at) // 4 + row * W, ALIGN)
    w = tl.load(C32 + voff[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    soff = tl.multiple_of(base + scales_at + row * NG, 8)
    c = tl.load(C8 + soff[:, None] + tl.arange(0, NG)[None, :], mask=nmask[:, None], other=0)
    return w, c


@triton.jit
def _widen_word_halves(w, c, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Words and codes (as ``_int4_words_raw``) -> the even and the odd half, as ``_int4_word_halves``."""
    o0, o1, o2, o3, o4, o5, o6, o7 = _widen_words8(w, c, D, BLOCK_N, DT, ASM)
    # word j's even columns 8j, 8j + 2, 8j + 4, 8j + 6 are nibbles 0, 2, 4, 6: half columns 4j .. 4j + 3
    # (nested joins lay out join(join(a, b), join(c, d)) as a, c, b, d)
    lo = tl.reshape(tl.join(tl.join(o0, o4), tl.join(o2, o6)), (BLOCK_N, D // 2))
    hi = tl.reshape(tl.join(tl.join(o1, o5), tl.join(o3, o7)), (BLOCK_N, D // 2))
    return lo, hi


@triton.jit
def _widen_words8(w, c, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Words and codes (as ``_int4_words_raw``) -> eight [BLOCK_N, D/8] tiles, tile m holding
    nibble m of every word (column 8j + m of word j), dequantized to DT."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    s = (c.to(tl.int32) << 7).to(tl.int16).to(tl.float16, bitcast=True)
    if ASM:
        if DT == tl.bfloat16:
            s1, s2 = _fused_scales(c)
            sw = tl.reshape(tl.broadcast_to(s1[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
            sn = tl.reshape(tl.broadcast_to(s2[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4WF_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, sw, sn], dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=2)
        else:
            sw = tl.reshape(tl.broadcast_to(s.to(DT)[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        sw = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, W))
        o0 = ((((w >> 0) & 15) - 8).to(tl.float32) * sw).to(DT)
        o1 = ((((w >> 4) & 15) - 8).to(tl.float32) * sw).to(DT)
        o2 = ((((w >> 8) & 15) - 8).to(tl.float32) * sw).to(DT)
        o3 = ((((w >> 12) & 15) - 8).to(tl.float32) * sw).to(DT)
        o4 = ((((w >> 16) & 15) - 8).to(tl.float32) * sw).to(DT)
        o5 = ((((w >> 20) & 15) - 8).to(tl.float32) * sw).to(DT)
        o6 = ((((w >> 24) & 15) - 8).to(tl.float32) * sw).to(DT)
        o7 = ((((w >> 28) & 15) - 8).to(tl.float32) * sw).to(DT)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def _int4_words_raw_t(C32, C8, base, vals_at, scales_at, row, nmask, D: tl.constexpr, ALIGN: tl.constexpr):
    """``_int4_words_raw`` transposed: words [D/8, BLOCK_N] and codes [D/16, BLOCK_N], the keys
    the fast dimension (so a pack=2 asm block pairs two keys' words, as the MMA's K pairs)."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    voff = tl.multiple_of((base + vals_at) // 4 + row * W, ALIGN)
    w = tl.load(C32 + voff[None, :] + tl.arange(0, W)[:, None], mask=nmask[None, :], other=0)
    soff = tl.multiple_of(base + scales_at + row * NG, 8)
    c = tl.load(C8 + soff[None, :] + tl.arange(0, NG)[:, None], mask=nmask[None, :], other=0)
    return w, c


@triton.jit
def _widen_words8_t(w, c, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """``_widen_words8`` over transposed words and codes (``_int4_words_raw_t``): eight
    [D/8, BLOCK_N] tiles, tile m holding nibble m of every word. The asm is elementwise, so
    the values are ``_widen_words8``'s, transposed; only the pairs it packs differ."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    s = (c.to(tl.int32) << 7).to(tl.int16).to(tl.float16, bitcast=True)
    if ASM:
        if DT == tl.bfloat16:
            s1, s2 = _fused_scales(c)
            sw = tl.reshape(tl.broadcast_to(s1[:, None, :], (NG, 2, BLOCK_N)), (W, BLOCK_N))
            sn = tl.reshape(tl.broadcast_to(s2[:, None, :], (NG, 2, BLOCK_N)), (W, BLOCK_N))
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4WF_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, sw, sn], dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=2)
        else:
            sw = tl.reshape(tl.broadcast_to(s.to(DT)[:, None, :], (NG, 2, BLOCK_N)), (W, BLOCK_N))
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        sw = tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, None, :], (NG, 2, BLOCK_N)), (W, BLOCK_N))
        o0 = ((((w >> 0) & 15) - 8).to(tl.float32) * sw).to(DT)
        o1 = ((((w >> 4) & 15) - 8).to(tl.float32) * sw).to(DT)
        o2 = ((((w >> 8) & 15) - 8).to(tl.float32) * sw).to(DT)
        o3 = ((((w >> 12) & 15) - 8).to(tl.float32) * sw).to(DT)
        o4 = ((((w >> 16) & 15) - 8).to(tl.float32) * sw).to(DT)
        o5 = ((((w >> 20) & 15) - 8).to(tl.float32) * sw).to(DT)
        o6 = ((((w >> 24) & 15) - 8).to(tl.float32) * sw).to(DT)
        o7 = ((((w >> 28) & 15) - 8).to(tl.float32) * sw).to(DT)
    return o0, o1, o2, o3, o4, o5, o6, o7


@triton.jit
def _natural8(t0, t1, t2, t3, t4, t5, t6, t7, R: tl.constexpr, D: tl.constexpr):
    """Eight [R, D/8] tiles (tile m: columns 8j + m) -> [R, D] in natural column order: the nested
    joins' innermost pairs are (m, m + 4), then + 2, then + 1, so the flat index is 8j + m."""
    t = tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))
    return tl.reshape(t, (R, D))


@triton.jit
def _split8(x, R: tl.constexpr, D: tl.constexpr):
    """[R, D] -> eight [R, D/8] tiles, tile m holding columns 8j + m (``_natural8``'s inverse)."""
    c0, c1 = tl.split(tl.reshape(x, (R, D // 8, 2, 2, 2)))  # the last dim is bit 0 of m, then bit 1, bit 2
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    t0, t4 = tl.split(c0b0)
    t2, t6 = tl.split(c0b1)
    t1, t5 = tl.split(c1b0)
    t3, t7 = tl.split(c1b1)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _qk_nibbles(C32, C8, base, vals_at, scales_at, row, nmask, q0, q1, q2, q3, q4, q5, q6, q7,
                D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                PREC: tl.constexpr, OPQ: tl.constexpr):
    """``K_WORDS``: an int4 K tile's scores [keys, heads] as one chain of eight dots of depth
    D/8, one per nibble position (``q<m>`` [D/8, heads]: the query's columns 8j + m), the widened
    words straight from the asm (no byte split out of the words, no join)."""
    w, c = _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
    o0, o1, o2, o3, o4, o5, o6, o7 = _widen_words8(w, c, D, BLOCK_N, DT, ASM)
    if OPQ == 2:
        o0 = _opaque(o0, ASM)
        o1 = _opaque(o1, ASM)
        o2 = _opaque(o2, ASM)
        o3 = _opaque(o3, ASM)
        o4 = _opaque(o4, ASM)
        o5 = _opaque(o5, ASM)
        o6 = _opaque(o6, ASM)
        o7 = _opaque(o7, ASM)
    s = tl.dot(o0, q0, input_precision=PREC)
    s = tl.dot(o1, q1, acc=s, input_precision=PREC)
    s = tl.dot(o2, q2, acc=s, input_precision=PREC)
    s = tl.dot(o3, q3, acc=s, input_precision=PREC)
    s = tl.dot(o4, q4, acc=s, input_precision=PREC)
    s = tl.dot(o5, q5, acc=s, input_precision=PREC)
    s = tl.dot(o6, q6, acc=s, input_precision=PREC)
    s = tl.dot(o7, q7, acc=s, input_precision=PREC)
    return s


@triton.jit
def _pv_dot(o, pd, acc, PREC: tl.constexpr, KEYS_FAST: tl.constexpr):
    """acc + V_m^T @ P for one nibble position's widened V tile ``o`` ([keys, D/8], or
    [D/8, keys] with KEYS_FAST)."""
    if KEYS_FAST:
        return tl.dot(o, pd, acc=acc, input_precision=PREC)
    else:
        return tl.dot(tl.trans(o), pd, acc=acc, input_precision=PREC)


@triton.jit
def _pv_nibbles(C32, C8, base, vals_at, scales_at, row, nmask, pd, alpha, a0, a1, a2, a3, a4, a5, a6, a7,
                D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                PREC: tl.constexpr, OPQ: tl.constexpr, RESCALE: tl.constexpr, KEYS_FAST: tl.constexpr = False):
    """``V_WORDS`` 4: an int4 V tile's P @ V as eight dots of M = D/8, one per nibble position
    (accumulator m [D/8, heads]: columns 8j + m), so the widened words go to the dots as the
    asm leaves them: no join repacks each value pair into natural column order (32 PRMT a
    16-key tile), the output's columns are permuted once, after the loop (``_natural8``).
    ``KEYS_FAST`` (``V_WORDS`` 5): the words load [D/8, keys], so each asm block widens two
    keys' words and its outputs are the A operand's key pairs: no transpose before the dots."""
    if KEYS_FAST:
        w, c = _int4_words_raw_t(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
    else:
        w, c = _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
    if OPQ == 1 and ASM:
        w = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
    if KEYS_FAST:
        o0, o1, o2, o3, o4, o5, o6, o7 = _widen_words8_t(w, c, D, BLOCK_N, DT, ASM)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = _widen_words8(w, c, D, BLOCK_N, DT, ASM)
    if OPQ == 2:
        o0 = _opaque(o0, ASM)
        o1 = _opaque(o1, ASM)
        o2 = _opaque(o2, ASM)
        o3 = _opaque(o3, ASM)
        o4 = _opaque(o4, ASM)
        o5 = _opaque(o5, ASM)
        o6 = _opaque(o6, ASM)
        o7 = _opaque(o7, ASM)
    if RESCALE:
        a0 = a0 * alpha[None, :]
    a0 = _pv_dot(o0, pd, a0, PREC, KEYS_FAST)
    if RESCALE:
        a1 = a1 * alpha[None, :]
    a1 = _pv_dot(o1, pd, a1, PREC, KEYS_FAST)
    if RESCALE:
        a2 = a2 * alpha[None, :]
    a2 = _pv_dot(o2, pd, a2, PREC, KEYS_FAST)
    if RESCALE:
        a3 = a3 * alpha[None, :]
    a3 = _pv_dot(o3, pd, a3, PREC, KEYS_FAST)
    if RESCALE:
        a4 = a4 * alpha[None, :]
    a4 = _pv_dot(o4, pd, a4, PREC, KEYS_FAST)
    if RESCALE:
        a5 = a5 * alpha[None, :]
    a5 = _pv_dot(o5, pd, a5, PREC, KEYS_FAST)
    if RESCALE:
        a6 = a6 * alpha[None, :]
    a6 = _pv_dot(o6, pd, a6, PREC, KEYS_FAST)
    if RESCALE:
        a7 = a7 * alpha[None, :]
    a7 = _pv_dot(o7, pd, a7, PREC, KEYS_FAST)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _v_tile(C32, C8, C16, base, vals_at, scales_at, row, nmask, BITS: tl.constexpr, GRP: tl.constexpr,
            D: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
            V_WORDS: tl.constexpr):
    """One V tile as ``_pv_acc`` takes it: (va, vb, v), the two halves, or the whole tile by
    words (``V_WORDS``; then va = vb = v)."""
    if V_WORDS == 3:  # halves, loaded as words
        va, vb = _int4_word_halves(C32, C8, base, vals_at, scales_at, row, nmask, D, BLOCK_N, ALIGN, DT, ASM)
        v = va
    elif V_WORDS:
        v = _int4_words(C32, C8, base, vals_at, scales_at, row, nmask, D, BLOCK_N, ALIGN, DT, ASM, V_WORDS)
        va = v
        vb = v
    else:
        va, vb = _halves(C8, C16, base, vals_at, scales_at, row, nmask, BITS, GRP, D, BLOCK_N, ALIGN, DT, ASM,
                         C32)
        v = va
    return va, vb, v


@triton.jit
def _pv_acc(acc_a, acc_b, va, vb, v, pd, alpha, KEYS_ON_M: tl.constexpr, WHOLE: tl.constexpr,
            PREC: tl.constexpr):
    """The accumulators after one tile: acc * alpha + P @ V (V^T @ P^T with KEYS_ON_M 2; with
    KEYS_ON_M 1 the scores arrive [keys, heads] and are transposed). WHOLE: one full tile
    ``v`` and one accumulator ``acc_a``; else halves ``va``/``vb`` into ``acc_a``/``acc_b``."""
    if KEYS_ON_M == 2:
        if WHOLE:
            acc_a = tl.dot(tl.trans(v), pd, acc=acc_a * alpha[None, :], input_precision=PREC)
        else:
            acc_a = tl.dot(tl.trans(va), pd, acc=acc_a * alpha[None, :], input_precision=PREC)
            acc_b = tl.dot(tl.trans(vb), pd, acc=acc_b * alpha[None, :], input_precision=PREC)
    else:
        if KEYS_ON_M == 1:
            pd = tl.trans(pd)
        if WHOLE:
            acc_a = tl.dot(pd, v, acc=acc_a * alpha[:, None], input_precision=PREC)
        else:
            acc_a = tl.dot(pd, va, acc=acc_a * alpha[:, None], input_precision=PREC)
            acc_b = tl.dot(pd, vb, acc=acc_b * alpha[:, None], input_precision=PREC)
    return acc_a, acc_b


@triton.jit
def _fwht(x, R: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr):
    """x [R, D] (fp32) times the normalized Sylvester Hadamard matrix: kv_int.hadamard's
    butterflies (pairs h apart: sum in the first, difference in the second), in registers."""
    for k in tl.static_range(LOG2D):
        y = tl.permute(tl.reshape(x, (R, D // (2 << k), 2, 1 << k)), (0, 1, 3, 2))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (R, D))
    return x * (1.0 / tl.sqrt(D * 1.0))


@triton.jit
def _pages(BT_ROW, pos, hi, ring, BS: tl.constexpr, HAS_RING: tl.constexpr):
    """The block-table entries of key positions ``pos`` (0 past ``hi``), as int64."""
    pg = pos // BS
    if HAS_RING:
        pg = pg % ring
    return tl.load(BT_ROW + pg, mask=pos < hi, other=0).to(tl.int64)


@triton.jit
def _rescaled(s, m_i, l_i, acc_a, acc_b, LAZY: tl.constexpr):
    """One tile's scores [keys, heads] into the online softmax: (p, m, l, acc_a, acc_b), l and the
    accumulators [columns, heads] rescaled to the new running max. ``LAZY`` > 0: the running max
    moves only when the tile's exceeds it by more than LAZY (log2 units; p <= 2^LAZY), so the
    accumulators' rescale (D x G_PAD products a tile) is skipped on most tiles, one uniform
    branch for the program."""
    if LAZY:
        m_t = tl.max(s, 0)
        if tl.max(m_t - m_i, 0) > LAZY:
            m_new = tl.maximum(m_i, m_t)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc_a = acc_a * alpha[None, :]
            acc_b = acc_b * alpha[None, :]
            m_i = m_new
    else:
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc_a = acc_a * alpha[None, :]
        acc_b = acc_b * alpha[None, :]
        m_i = m_new
    p = tl.exp2(s - m_i[None, :])
    return p, m_i, l_i + tl.sum(p, 0), acc_a, acc_b


@triton.jit(do_not_specialize=["stride_bt"])  # the table's width varies per step: one variant
def fast_decode_kernel(Q, C8, C16, C32, BT, NC, QSL, ACC, ML, OUT,
                       stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, page_bytes,
                       k_vals, k_scales, v_vals, v_scales, sm_scale, softcap, window, ring,
                       KVH: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                       BS: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
                       K_BITS: tl.constexpr, K_GRP: tl.constexpr, V_BITS: tl.constexpr, V_GRP: tl.constexpr,
                       ALIGN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_RING: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr,
                       KEYS_ON_M: tl.constexpr, V_WORDS: tl.constexpr, PREFETCH: tl.constexpr,
                       LAZY: tl.constexpr = 0, ROT_Q: tl.constexpr = False, ROT_O: tl.constexpr = False,
                       LOG2D: tl.constexpr = 7, QK_SPLIT: tl.constexpr = 0, L_DEFER: tl.constexpr = False,
                       ONE_PAGE: tl.constexpr = False, V_OPQ: tl.constexpr = 2, K_WORDS: tl.constexpr = 0,
                       ORDER=None, HAS_ORDER: tl.constexpr = False, HEAD_MAJOR: tl.constexpr = False):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    if HAS_ORDER:  # longest first (order.py): the (sequence, KV head) grid in ORDER's sequence order,
        lin = b + tl.num_programs(0) * kvh  # every KV head of a sequence before the next one's
        b = tl.load(ORDER + lin // tl.num_programs(1))
        kvh = lin % tl.num_programs(1)
    split = tl.program_id(2)
    qrow = tl.load(QSL + b)
    if tl.load(QSL + b + 1) - qrow != 1:  # a prefill row of a mixed batch
        return
    seq_len = tl.load(NC + b).to(tl.int32) + 1
    kstart = 0
    if HAS_WINDOW:
        kstart = tl.maximum(seq_len - window, 0)
    n = seq_len - kstart
    per_split = tl.cdiv(tl.cdiv(n, S), BLOCK_N) * BLOCK_N
    lo = kstart + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    DT = Q.dtype.element_ty
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    HALF: tl.constexpr = D // 2
    WHOLE: tl.constexpr = V_WORDS == 1 or V_WORDS == 2  # one V accumulator of D columns (else halves)
    VW: tl.constexpr = D if WHOLE else HALF  # columns per V accumulator
    # V_WORDS 5 feeds the dots straight from the asm: an opaque mov there would pin the words' load
    # layout and bring back the transpose through shared memory (the same SASS as V_WORDS 4)
    PV_OPQ: tl.constexpr = 0 if V_WORDS == 5 else V_OPQ
    BT_ROW = BT + b * stride_bt

    g = tl.arange(0, G_PAD)
    gmask = g < G
    heads = kvh * G + g
    ka_c, kb_c = _half_cols(K_BITS, D)
    if V_WORDS == 2:
        va_c = _words_cols(D)
        vb_c = va_c
    elif WHOLE:
        va_c = tl.arange(0, D)
        vb_c = va_c
    else:
        va_c, vb_c = _half_cols(V_BITS, D)
    qp = Q + qrow * stride_qt + heads[:, None] * stride_qh
    if ROT_Q:  # K stored rotated (kv_int.hadamard): the query rotated here, in fp32, then cast as _rotate's
        qn = tl.load(qp + tl.arange(0, D)[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        qn = _fwht(qn, G_PAD, D, LOG2D).to(DT)
        if K_BITS == 4:  # even and odd columns
            qa, qb = tl.split(tl.reshape(qn, (G_PAD, HALF, 2)))
        else:  # first and second half
            qa, qb = tl.split(tl.permute(tl.reshape(qn, (G_PAD, 2, HALF)), (0, 2, 1)))
    else:
        qa = tl.load(qp + ka_c[None, :], mask=gmask[:, None], other=0.0)  # the query's columns of K's halves
        qb = tl.load(qp + kb_c[None, :], mask=gmask[:, None], other=0.0)
    if K_WORDS:  # the query's columns 8j + m for nibble position m, [D/8, heads] (_qk_nibbles)
        if ROT_Q:
            qw = qn
        else:
            qw = tl.load(qp + tl.arange(0, D)[None, :], mask=gmask[:, None], other=0.0)
        q0, q1, q2, q3, q4, q5, q6, q7 = _split8(qw, G_PAD, D)
        q0 = tl.trans(q0)
        q1 = tl.trans(q1)
        q2 = tl.trans(q2)
        q3 = tl.trans(q3)
        q4 = tl.trans(q4)
        q5 = tl.trans(q5)
        q6 = tl.trans(q6)
        q7 = tl.trans(q7)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    if L_DEFER:  # per-element partial sums of p (keys on M, not LAZY): summed over the keys once, after the loop
        l_acc = tl.zeros([BLOCK_N, G_PAD], tl.float32)
    if V_WORDS >= 4:  # one accumulator [D/8, heads] per nibble position (_pv_nibbles)
        a0 = tl.zeros([D // 8, G_PAD], tl.float32)
        a1 = tl.zeros([D // 8, G_PAD], tl.float32)
        a2 = tl.zeros([D // 8, G_PAD], tl.float32)
        a3 = tl.zeros([D // 8, G_PAD], tl.float32)
        a4 = tl.zeros([D // 8, G_PAD], tl.float32)
        a5 = tl.zeros([D // 8, G_PAD], tl.float32)
        a6 = tl.zeros([D // 8, G_PAD], tl.float32)
        a7 = tl.zeros([D // 8, G_PAD], tl.float32)
    if KEYS_ON_M == 2:  # accumulators [columns, heads]
        acc_a = tl.zeros([VW, G_PAD], tl.float32)
        acc_b = tl.zeros([VW, G_PAD], tl.float32)
    else:
        acc_a = tl.zeros([G_PAD, VW], tl.float32)
        acc_b = tl.zeros([G_PAD, VW], tl.float32)
    if KEYS_ON_M:  # scores [keys, heads]
        qaT = tl.trans(qa)
        qbT = tl.trans(qb)
        if PREFETCH == 2:
            # int4 K and V: the next tile's packed words load into registers at
            # the top of this tile's iteration, and the block table a tile earlier still, so no
            # load waits on another and a whole iteration of work covers each load's latency
            # (Triton's two-stage ring issues the next tile's copies after this tile's work and
            # waits for them first thing in the next iteration). Run with num_stages=1.
            ar = tl.arange(0, BLOCK_N)
            pos = lo + ar
            base0 = _pages(BT_ROW, pos, hi, ring, BS, HAS_RING) * page_bytes
            row0 = page_row(pos % BS, kvh, KVH, BS, HEAD_MAJOR)
            kx, kc = _int4_words_raw(C32, C8, base0, k_vals, k_scales, row0, pos < hi, D, ALIGN)
            vw, vc = _int4_words_raw(C32, C8, base0, v_vals, v_scales, row0, pos < hi, D, ALIGN)
            blk_n = _pages(BT_ROW, pos + BLOCK_N, hi, ring, BS, HAS_RING)
            for start in range(lo, hi, BLOCK_N):
                nmask = start + ar < hi
                ckx, ckc, cvw, cvc = kx, kc, vw, vc
                nxt = start + BLOCK_N + ar
                row1 = page_row(nxt % BS, kvh, KVH, BS, HEAD_MAJOR)
                kx, kc = _int4_words_raw(C32, C8, blk_n * page_bytes, k_vals, k_scales, row1, nxt < hi, D, ALIGN)
                vw, vc = _int4_words_raw(C32, C8, blk_n * page_bytes, v_vals, v_scales, row1, nxt < hi, D, ALIGN)
                blk_n = _pages(BT_ROW, nxt + BLOCK_N, hi, ring, BS, HAS_RING)
                ka, kb = _widen_word_halves(ckx, ckc, D, BLOCK_N, DT, ASM)
                s = tl.dot(kb, qbT, acc=tl.dot(ka, qaT, input_precision=PREC), input_precision=PREC)
                s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
                s = tl.where(nmask[:, None], s, float("-inf"))
                p, m_i, l_i, acc_a, acc_b = _rescaled(s, m_i, l_i, acc_a, acc_b, LAZY)
                va, vb = _widen_word_halves(cvw, cvc, D, BLOCK_N, DT, ASM)
                pd = p.to(DT)
                acc_a = tl.dot(tl.trans(va), pd, acc=acc_a, input_precision=PREC)
                acc_b = tl.dot(tl.trans(vb), pd, acc=acc_b, input_precision=PREC)
        if PREFETCH == 1:  # int4 V in halves: the next tile's bytes load while this one is widened
            nm0, base0, row0 = _keys(BT_ROW, lo, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N, HAS_RING, HEAD_MAJOR)
            vx, vc = _int4_raw(C8, base0, v_vals, v_scales, row0, nm0, D, ALIGN)
        if PREFETCH != 2:
            if ONE_PAGE == 2:
                e0, e1 = _page_entries(BT_ROW, lo, hi, ring, BS, BLOCK_N, HAS_RING)
            for start in range(lo, hi, BLOCK_N):
                if ONE_PAGE == 2:  # this tile's entries were loaded a tile ago; the next tile's now
                    n0, n1 = _page_entries(BT_ROW, start + BLOCK_N, hi, ring, BS, BLOCK_N, HAS_RING)
                    nmask, base, row = _keys_entries(e0, e1, start, hi, page_bytes, kvh, KVH, BS, BLOCK_N, HEAD_MAJOR)
                    e0 = n0
                    e1 = n1
                elif ONE_PAGE:
                    nmask, base, row = _keys_one_page(BT_ROW, start, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N,
                                                      HAS_RING, HEAD_MAJOR)
                else:
                    nmask, base, row = _keys(BT_ROW, start, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N, HAS_RING,
                                             HEAD_MAJOR)
                if K_WORDS:
                    s = _qk_nibbles(C32, C8, base, k_vals, k_scales, row, nmask, q0, q1, q2, q3, q4, q5, q6, q7, D,
                                    BLOCK_N, ALIGN, DT, ASM, PREC, K_WORDS)
                    s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
                else:
                    ka, kb = _halves(C8, C16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT,
                                     ASM, C32)
                if K_WORDS:
                    pass
                elif QK_SPLIT and not HAS_SOFTCAP:
                    # two independent MMA chains of depth D/2 (one per half), each scaled, then summed
                    # (a plain sum of two dots is folded back into one chain by Triton's dot + add rewrite)
                    c2 = sm_scale * 1.4426950408889634
                    s = tl.dot(ka, qaT, input_precision=PREC) * c2 + tl.dot(kb, qbT, input_precision=PREC) * c2
                else:  # one chain of depth D
                    s = tl.dot(kb, qbT, acc=tl.dot(ka, qaT, input_precision=PREC), input_precision=PREC)
                    s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
                s = tl.where(nmask[:, None], s, float("-inf"))
                if LAZY and V_WORDS >= 4:  # (as _rescaled, over the eight accumulators)
                    m_t = tl.max(s, 0)
                    if tl.max(m_t - m_i, 0) > LAZY:
                        m_new = tl.maximum(m_i, m_t)
                        alpha = tl.exp2(m_i - m_new)
                        if L_DEFER:
                            l_acc = l_acc * alpha[None, :]
                        else:
                            l_i = l_i * alpha
                        a0 = a0 * alpha[None, :]
                        a1 = a1 * alpha[None, :]
                        a2 = a2 * alpha[None, :]
                        a3 = a3 * alpha[None, :]
                        a4 = a4 * alpha[None, :]
                        a5 = a5 * alpha[None, :]
                        a6 = a6 * alpha[None, :]
                        a7 = a7 * alpha[None, :]
                        m_i = m_new
                    p = tl.exp2(s - m_i[None, :])
                    if L_DEFER:
                        l_acc = l_acc + p
                    else:
                        l_i = l_i + tl.sum(p, 0)
                    a0, a1, a2, a3, a4, a5, a6, a7 = _pv_nibbles(
                        C32, C8, base, v_vals, v_scales, row, nmask, p.to(DT), m_i, a0, a1, a2, a3, a4, a5, a6,
                        a7, D, BLOCK_N, ALIGN, DT, ASM, PREC, PV_OPQ, False, V_WORDS == 5)
                elif LAZY:
                    p, m_i, l_i, acc_a, acc_b = _rescaled(s, m_i, l_i, acc_a, acc_b, LAZY)
                    va, vb, v = _v_tile(C32, C8, C16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N,
                                        ALIGN, DT, ASM, V_WORDS)
                    pd = p.to(DT)
                    acc_a = tl.dot(tl.trans(va), pd, acc=acc_a, input_precision=PREC)
                    acc_b = tl.dot(tl.trans(vb), pd, acc=acc_b, input_precision=PREC)
                else:
                    m_new = tl.maximum(m_i, tl.max(s, 0))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[None, :])
                    if L_DEFER:  # no cross-lane sum in the loop
                        l_acc = l_acc * alpha[None, :] + p
                    else:
                        l_i = l_i * alpha + tl.sum(p, 0)
                    if PREFETCH:
                        nm1, base1, row1 = _keys(BT_ROW, start + BLOCK_N, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N,
                                                 HAS_RING, HEAD_MAJOR)
                        nx, nc = _int4_raw(C8, base1, v_vals, v_scales, row1, nm1, D, ALIGN)
                        va, vb = _int4_halves(vx, vc, D, BLOCK_N, DT, ASM)
                        v = va
                        vx = nx
                        vc = nc
                    elif V_WORDS < 4:
                        va, vb, v = _v_tile(C32, C8, C16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N,
                                            ALIGN, DT, ASM, V_WORDS)
                    if V_WORDS >= 4:
                        a0, a1, a2, a3, a4, a5, a6, a7 = _pv_nibbles(
                            C32, C8, base, v_vals, v_scales, row, nmask, p.to(DT), alpha, a0, a1, a2, a3, a4, a5, a6,
                            a7, D, BLOCK_N, ALIGN, DT, ASM, PREC, PV_OPQ, True, V_WORDS == 5)
                    else:
                        acc_a, acc_b = _pv_acc(acc_a, acc_b, va, vb, v, p.to(DT), alpha, KEYS_ON_M, WHOLE, PREC)
                    m_i = m_new
    else:  # scores [heads, keys]
        for start in range(lo, hi, BLOCK_N):
            nmask, base, row = _keys(BT_ROW, start, hi, ring, page_bytes, kvh, KVH, BS, BLOCK_N, HAS_RING, HEAD_MAJOR)
            ka, kb = _halves(C8, C16, base, k_vals, k_scales, row, nmask, K_BITS, K_GRP, D, BLOCK_N, ALIGN, DT, ASM,
                             C32)
            s = tl.dot(qb, tl.trans(kb), acc=tl.dot(qa, tl.trans(ka), input_precision=PREC), input_precision=PREC)
            s = _scores(s, sm_scale, softcap, HAS_SOFTCAP)
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            va, vb, v = _v_tile(C32, C8, C16, base, v_vals, v_scales, row, nmask, V_BITS, V_GRP, D, BLOCK_N,
                                ALIGN, DT, ASM, V_WORDS)
            acc_a, acc_b = _pv_acc(acc_a, acc_b, va, vb, v, p.to(DT), alpha, KEYS_ON_M, WHOLE, PREC)
            m_i = m_new
    if L_DEFER:
        l_i = tl.sum(l_acc, 0)
    if V_WORDS >= 4:  # the nibble positions' accumulators -> [heads, D] in natural column order
        on = _natural8(tl.trans(a0), tl.trans(a1), tl.trans(a2), tl.trans(a3), tl.trans(a4), tl.trans(a5),
                       tl.trans(a6), tl.trans(a7), G_PAD, D)
        if S == 1:
            on = on / l_i[:, None]
            if ROT_O:
                on = _fwht(on, G_PAD, D, LOG2D)
            tl.store(OUT + qrow * stride_ot + heads[:, None] * stride_oh + tl.arange(0, D)[None, :],
                     on.to(OUT.dtype.element_ty), mask=gmask[:, None])
        else:
            rowc = (b * KVH * G + heads) * S + split
            tl.store(ACC + rowc[:, None] * D + tl.arange(0, D)[None, :], on, mask=gmask[:, None])
            tl.store(ML + rowc * 2, m_i, mask=gmask)
            tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)
        return
    if KEYS_ON_M == 2:
        out_a = tl.trans(acc_a)
        out_b = tl.trans(acc_b)
    else:
        out_a = acc_a
        out_b = acc_b
    if S == 1 and ROT_O:  # V stored rotated: the output rotated back here, in fp32 (halves, not WHOLE)
        if V_BITS == 4:  # even and odd columns
            on = tl.reshape(tl.join(out_a / l_i[:, None], out_b / l_i[:, None]), (G_PAD, D))
        else:  # first and second half
            on = tl.reshape(tl.permute(tl.join(out_a / l_i[:, None], out_b / l_i[:, None]), (0, 2, 1)), (G_PAD, D))
        on = _fwht(on, G_PAD, D, LOG2D)
        tl.store(OUT + qrow * stride_ot + heads[:, None] * stride_oh + tl.arange(0, D)[None, :],
                 on.to(OUT.dtype.element_ty), mask=gmask[:, None])
    elif S == 1:
        ob = OUT + qrow * stride_ot + heads[:, None] * stride_oh
        tl.store(ob + va_c[None, :], (out_a / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
        if not WHOLE:
            tl.store(ob + vb_c[None, :], (out_b / l_i[:, None]).to(OUT.dtype.element_ty), mask=gmask[:, None])
    else:  # partial state for decode._combine_kernel, rows (b * H + head) * S + split
        rowc = (b * KVH * G + heads) * S + split
        tl.store(ACC + rowc[:, None] * D + va_c[None, :], out_a, mask=gmask[:, None])
        if not WHOLE:
            tl.store(ACC + rowc[:, None] * D + vb_c[None, :], out_b, mask=gmask[:, None])
        tl.store(ML + rowc * 2, m_i, mask=gmask)
        tl.store(ML + rowc * 2 + 1, l_i, mask=gmask)
