"""Widening packed int4/int8 tiles in registers (``kvcache/kv_pages.py``'s planes), for the
fast decode kernel (``packed_fast``), the packed prefill (``packed_prefill``) and the MLA latent
kernel (``mla_packed``): the PTX (``ASM``) that turns packed bytes or 32-bit words and their
scales into bf16/fp16 operands, and the Triton loads that feed it.

- int4 nibbles become floats by magic numbers: (nibble | 0x4300) read as bf16 is 128 + nibble
  (0x6400: 1024 + nibble in fp16), and paired 16-bit fmas take the offset off and apply the
  group's scale, exactly; int8 bytes go under an fp32 exponent by a byte permute. No element
  passes through the (quarter-rate) int->float unit, and the values equal the reference's.
- A tile comes as two halves (``_halves``: even/odd columns for int4, first/second half for
  int8), as natural columns from words (``_int4_words``), or as eight tiles, one per nibble
  position of the words (``_widen_words8``; ``KEYS_FAST``: keys the fast dimension), so no register
  shuffle interleaves the widened values; the kernels permute the query's and the output's
  columns to match.

Without ``ASM`` (Triton's interpreter, which runs no PTX) the same values come from Triton ops,
so the tests check the kernels' structure on the CPU too. ``tests/test_packed_fast_asm.py`` runs
the PTX in an emulator, bit for bit against the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
        o0, o1, o2, o3 = _bytes_ops(w, sw, DT)
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
    w, c = _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D, ALIGN)
    s = (c.to(tl.int32) << 7).to(tl.int16).to(tl.float16, bitcast=True)
    if ASM:
        sw = _per_word(s.to(DT), NG, BLOCK_N, False)
        if DT == tl.bfloat16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.bfloat16,) * 8, is_pure=True,
                pack=2)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_ops(w, _per_word(s.to(tl.float32), NG, BLOCK_N, False), DT)
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


# int4 by words in bf16, one fma per value pair (also mla_packed's I4F_ASM): pack=2 over words
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
def _int4_words_raw(C32, C8, base, vals_at, scales_at, row, nmask, D: tl.constexpr, ALIGN: tl.constexpr,
                    KEYS_FAST: tl.constexpr = False):
    """An int4 plane's packed words [BLOCK_N, D/8] and e5m3 codes [BLOCK_N, D/16] (masked keys:
    zeros). KEYS_FAST: [D/8, BLOCK_N] and [D/16, BLOCK_N], the keys the fast dimension, so a
    pack=2 asm block widens the same word of two keys (the PV dots' A operand pairs keys)."""
    W: tl.constexpr = D // 8
    NG: tl.constexpr = D // 16
    voff = tl.multiple_of((base + vals_at) // 4 + row * W, ALIGN)
    if KEYS_FAST:
        w = tl.load(C32 + voff[None, :] + tl.arange(0, W)[:, None], mask=nmask[None, :], other=0)
    else:
        w = tl.load(C32 + voff[:, None] + tl.arange(0, W)[None, :], mask=nmask[:, None], other=0)
    soff = tl.multiple_of(base + scales_at + row * NG, 8)
    if KEYS_FAST:
        c = tl.load(C8 + soff[None, :] + tl.arange(0, NG)[:, None], mask=nmask[None, :], other=0)
    else:
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
def _per_word(s, NG: tl.constexpr, BLOCK_N: tl.constexpr, KEYS_FAST: tl.constexpr):
    """A group's value [BLOCK_N, NG] (KEYS_FAST: [NG, BLOCK_N]) for each of its two words."""
    if KEYS_FAST:
        return tl.reshape(tl.broadcast_to(s[:, None, :], (NG, 2, BLOCK_N)), (2 * NG, BLOCK_N))
    else:
        return tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, 2)), (BLOCK_N, 2 * NG))


@triton.jit
def _bytes_ops(w, sw, DT: tl.constexpr):
    """The four int8 bytes of words ``w`` (sign-extended) times fp32 scales ``sw`` by Triton ops
    (the interpreter, which runs no PTX): the asm's values."""
    o0 = (((w << 24) >> 24).to(tl.float32) * sw).to(DT)
    o1 = (((w << 16) >> 24).to(tl.float32) * sw).to(DT)
    o2 = (((w << 8) >> 24).to(tl.float32) * sw).to(DT)
    o3 = ((w >> 24).to(tl.float32) * sw).to(DT)
    return o0, o1, o2, o3


@triton.jit
def _nibbles_ops(w, sw, DT: tl.constexpr):
    """The eight nibble positions of words ``w`` times fp32 scales ``sw`` by Triton ops (the
    interpreter, which runs no PTX): the asm's values."""
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
def _widen_words8(w, c, D: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr,
                  KEYS_FAST: tl.constexpr = False):
    """Words and codes (as ``_int4_words_raw``) -> eight [BLOCK_N, D/8] tiles (KEYS_FAST:
    [D/8, BLOCK_N]), tile m holding nibble m of every word (column 8j + m of word j), dequantized
    to DT. The asm is elementwise: KEYS_FAST changes only which two values share a register
    (two keys' instead of two words')."""
    NG: tl.constexpr = D // 16
    s = (c.to(tl.int32) << 7).to(tl.int16).to(tl.float16, bitcast=True)
    if ASM:
        if DT == tl.bfloat16:
            s1, s2 = _fused_scales(c)
            sw = _per_word(s1, NG, BLOCK_N, KEYS_FAST)
            sn = _per_word(s2, NG, BLOCK_N, KEYS_FAST)
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4WF_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w, sw, sn], dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=2)
        else:
            sw = _per_word(s.to(DT), NG, BLOCK_N, KEYS_FAST)
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                I4W_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r", [w, sw], dtype=(tl.float16,) * 8, is_pure=True,
                pack=2)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = _nibbles_ops(w, _per_word(s.to(tl.float32), NG, BLOCK_N, KEYS_FAST), DT)
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
