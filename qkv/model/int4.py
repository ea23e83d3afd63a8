"""Weight-only int4 for the CPU decode path: torch's own packed-int4 kernel, groups of 32.

Batch-1 decode on a CPU reads every weight once per token, so its speed is the weights'
bytes: 4 bits plus a bf16 scale and zero per 32 weights is 5 bits a weight, against 8.5
for int8 with per-row scales (model/quant.py) and 16 for bf16. The matmul is
``torch.ops.aten._weight_int4pack_mm_for_cpu`` (ATen's AVX-512/AVX2 kernel) on weights
packed by ``_convert_weight_to_int4pack_for_cpu``; activations are bf16.

The rounding is asymmetric per group of 32 along the input dimension, ``w ≈ q * scale + min``
with q in 0..15: the layout of GGUF's Q4_1 and of Q4_K's sub-blocks, so weights that came
from such a file are recovered up to the bf16 rounding of scale and min.

A GGUF tensor stored as Q4_1 (SmolLM2's layers) is not dequantized and re-rounded:
``pack_q4_1`` keeps the file's 4-bit codes and rounds only its float16 scale and min to bf16
(perplexity 14.9493 against 14.9459 re-rounded and 14.9370 in float32: docs/benchmarks.md),
and start-up skips a float copy and a rounding pass of every layer.

``pack`` works in blocks of rows (a multiple of the kernel's 64-row tiles; model/quant.py's
``rows_per_chunk``), so no float32 or int32 copy of a whole matrix is held; the blocks are
packed and concatenated, equal to packing the whole matrix bit for bit
(tests/test_quant_chunked.py).

Many rows at once (a prefill of ``DENSE_ROWS`` tokens or more): the int4 kernel's cost grows
with the rows (about 60 GMAC/s on this project's 2-core AVX-512 machine, against ~120 for
oneDNN's bf16 GEMM, which uses avx512_bf16), so there the layer's weight is unpacked to bf16
for the step (``unpack``, 1-4 ms a SmolLM2 matrix, no copy kept) and multiplied by
``torch.mm``: SmolLM2's layer at 2,048 rows ~120 -> ~45 ms (docs/benchmarks.md). The weight
then is ``(q - 8) * scale + zero`` rounded once to bf16 where the kernel keeps it in float32:
the two paths agree to bf16 rounding, not bit for bit (tests/test_int4.py).

Fewer rows (2 to ``DENSE_ROWS - 1``: batched decode steps) go through model/int4_rows.py's C
kernel where the CPU has AVX-512 BF16 (SmolLM2's 16-row step's products 27.5 -> 16.9 ms on 2
cores), else ATen's kernel; the two agree to float32 summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.model import int4_rows
from qkv.model.quant import rows_per_chunk

GROUP = 32

# Rows from which a product goes through unpack + bf16 GEMM instead of the int4 kernel:
# measured break-even 128-256 rows at SmolLM2's shapes (the unpack is paid once a step).
DENSE_ROWS = 256


def supports(linear: nn.Linear) -> bool:
    """Whether the kernel takes this layer's shape (the input dimension a multiple of GROUP)."""
    return linear.in_features % GROUP == 0


# Rows the packing interleaves together (ATen's _convert_weight_to_int4pack_for_cpu): blocks
# of whole tiles pack as the whole matrix does.
TILE_ROWS = 64


@torch.no_grad()
def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed int4 weight, scales_and_zeros [K/32, N, 2] bf16) for the kernel,
    which computes ``(q - 8) * scale + zero``; zero is therefore ``min + 8 * scale``. Block of
    rows by block of rows; ``w`` is not modified."""
    n, k = w.shape
    step = rows_per_chunk(k, TILE_ROWS)
    if step >= n:
        return _pack(w)
    packed = scales_zeros = None
    for r in range(0, n, step):
        p, sz = _pack(w[r : r + step])
        if packed is None:  # the kernel's packed layout: [N, K/2] uint8 on this torch
            packed = torch.empty((n, *p.shape[1:]), dtype=p.dtype)
            scales_zeros = torch.empty((sz.shape[0], n, 2), dtype=sz.dtype)
        packed[r : r + step] = p
        scales_zeros[:, r : r + step] = sz
    return packed, scales_zeros


@torch.no_grad()
def pack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 blocks (loading/gguf_dequant.py's ``read_q4_1``: codes uint8 [N, K], d and m
    [N, K/32]; ``w = codes * d + m``) -> ``pack``'s result, keeping the file's codes: only d
    and m are rounded (float16 to bf16, the kernel's scale and min), where re-rounding the
    dequantized weight would also move codes by one; and no float copy of the weight."""
    n, k = codes.shape
    step = rows_per_chunk(k, TILE_ROWS)
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales_zeros = torch.empty(k // GROUP, n, 2, dtype=torch.bfloat16)
    for r in range(0, n, step):
        scale = d[r : r + step].to(torch.bfloat16).float()
        lo = m[r : r + step].to(torch.bfloat16).float()
        zero = lo + 8 * scale  # as _pack: the kernel computes (q - 8) * scale + zero
        scales_zeros[:, r : r + step] = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)
        q = codes[r : r + step].to(torch.int32)
        packed[r : r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, scales_zeros


def _pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    # Round with the scale and min the kernel will actually see (bf16), so the levels line up.
    scale, lo = scale.to(torch.bfloat16).float(), lo.to(torch.bfloat16).float()
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def unpack(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor | None:
    """``pack``'s result -> the weight transposed, [K, N] bf16: ``(q - 8) * scale + zero`` in
    float32, rounded once. None where N is not a multiple of TILE_ROWS (a layout this does not
    read). The packed layout (ATen's, this torch): per tile of 64 rows, [K, 32] bytes, byte
    (k, j) holding row j's code in its low nibble and row j + 32's in its high one.

    One pass of C (model/csrc/int4_unpack.c, built by model/native.py) where it compiled:
    equal to ``unpack_torch`` bit for bit (tests/test_int4_native.py) and 6-8x faster
    (SmolLM2's gate/up at one thread 2.5 -> 0.37 ms: torch's five passes over the weight were
    ~18% of a 512-token prefill, docs/benchmarks.md); else, and while tracing, ``unpack_torch``."""
    k, n = scales_zeros.shape[0] * GROUP, scales_zeros.shape[1]
    if n % TILE_ROWS or packed.shape != (n, k // 2):
        return None
    native_ok = packed.dtype == torch.uint8 and scales_zeros.dtype == torch.bfloat16
    if native_ok and packed.is_contiguous() and scales_zeros.is_contiguous() and not torch.compiler.is_compiling():
        fn = _native_unpack()
        if fn is not None:
            out = torch.empty(k, n, dtype=torch.bfloat16)
            threads = max(1, min(torch.get_num_threads(), k // GROUP))
            scratch = torch.empty(threads, 2, n)  # a thread's group's scale and zero - 8 * scale
            fn(packed.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(), k, n, scratch.data_ptr(), threads)
            return out
    return unpack_torch(packed, scales_zeros)


def _native_unpack():
    """The C unpack's function, or None (no compiler, QKV_NATIVE=0: model/native.py)."""
    import ctypes

    from qkv.model import native

    args = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int]
    return native.function("int4_unpack", "qkv_int4_unpack", args)


def unpack_torch(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor | None:
    """``unpack`` in torch ops (the reference the C kernel is held to)."""
    k, n = scales_zeros.shape[0] * GROUP, scales_zeros.shape[1]
    if n % TILE_ROWS or packed.shape != (n, k // 2):
        return None
    p = packed.view(n // TILE_ROWS, k, TILE_ROWS // 2)
    q = torch.stack((p & 15, p >> 4), dim=2).view(n // TILE_ROWS, k, TILE_ROWS).permute(1, 0, 2)
    sz = scales_zeros.float()
    scale, shifted = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]  # q * scale + (zero - 8 * scale)
    # The codes widened to float32 in the copy that transposes them, then one in-place addcmul
    # and one rounding: every op on one dtype (a mixed-dtype op runs unvectorized on the CPU).
    # Bit for bit the same values as widen, subtract, multiply, add, round; the 120 unpacks of a
    # 512-token SmolLM2 prefill 188 -> 142 and 126 -> 97 ms (2 threads, in the engine, two runs).
    w = torch.empty(k, n // TILE_ROWS, TILE_ROWS).copy_(q).view(k // GROUP, GROUP, n)
    return torch.addcmul(shifted[:, None], w, scale[:, None], out=w).view(k, n).to(torch.bfloat16)


class Int4Linear(nn.Module):
    """``y = x @ dequant(w_int4)^T + b``; x is computed in bf16 (cast in and out if it is not)."""

    def __init__(self, linear: nn.Linear | None = None, *, parts: tuple | None = None, bias=None):
        """From ``linear`` (its weight packed now), or from ``parts``, ``pack``'s result, and
        ``bias`` (a tensor or None)."""
        super().__init__()
        if linear is not None:
            if not supports(linear):
                raise ValueError(f"int4 weights need in_features divisible by {GROUP}, got {linear.in_features}")
            parts, bias = pack(linear.weight.detach()), linear.bias
        packed, scales_zeros = parts
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16))
        self.out_features, self.in_features = scales_zeros.shape[1], scales_zeros.shape[0] * GROUP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])  # the engine's [T, K]: no reshapes, ops cost
        if dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        wt = unpack(self.weight_int4, self.scales_zeros) if x2.shape[0] >= DENSE_ROWS else None
        if wt is not None:
            y = torch.mm(x2, wt)
        elif int4_rows.traced():  # the batched step's export: the C kernel as a graph node
            y = int4_rows.op()(x2, self.weight_int4, self.scales_zeros)
        else:  # a few rows: the C kernel (model/int4_rows.py) where it applies, else ATen's
            y = int4_rows.product(x2, self.weight_int4, self.scales_zeros)
            if y is None:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, GROUP, self.scales_zeros)
        if self.bias is not None:
            y += self.bias
        if x.dim() != 2:
            y = y.view(*shape[:-1], self.out_features)
        return y if dtype == torch.bfloat16 else y.to(dtype)
