"""Int8 products of a few rows in C (model/csrc/int8_gemv.c): ``x @ (q * scale)^T`` in float32.

A one-sequence decode step multiplies one row by each int8 weight, reading every weight once:
its speed is how fast the weights stream from memory. For Gemma 3 270M the lm_head (262,144 x
640 int8, 168 MB) went through oneDNN's int8 GEMM (model/int8_onednn.py) at ~14 GB/s (11-13
ms) and the 72 layer products (100 MB) through torch's ``_weight_int8pack_mm`` at ~9 GB/s,
where this machine streams ~30 GB/s with 2 threads. The C kernel reads the plain int8 rows,
one after the other, with AVX-512 VNNI dot products and software prefetch: the lm_head ~5.5
ms and the layers ~4.8 ms in a decode step (docs/benchmarks.md, session 9). Without the
prefetch it ran at oneDNN's speed: the hardware prefetcher alone did not keep one core's
stream going.

The arithmetic is oneDNN's path's: x split per row into two int8 planes (quant.py's
``int8_planes``), exact integer dot products, ``s * (hi + lo / 254) * scale``; its results
agree with ``int8_rows_mm`` to float32 rounding (tests/test_int8_gemv.py). The kernel needs
each weight row's sum (``rowsum``: the planes enter VNNI offset by 128), one int32 per row,
made once. ``Int8Linear`` (quant.py) calls it for up to ``GEMV_ROWS`` rows, eagerly through
ctypes and inside the compiled decode step as the operator ``op()``.

Optional like every native kernel (model/native.py): None from ``function()`` and the
callers keep torch's kernels.
"""

from __future__ import annotations

import ctypes

import torch

MAX_ROWS = 64  # the kernel's bound on rows of x (its stack array of plane scales)


def function():
    """The C entry point, or None (no compiler, QKV_NATIVE=0)."""
    from qkv.model import native

    args = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    return native.function("int8_gemv", "qkv_int8_gemv", args, restype=ctypes.c_int)


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel takes this weight: int8 [N, K], N a multiple of 4, contiguous."""
    return q.dtype == torch.int8 and q.dim() == 2 and q.shape[0] % 4 == 0 and q.is_contiguous()


def rowsum(q: torch.Tensor) -> torch.Tensor:
    """Each weight row's sum, int32 [N] (exact: |sum| <= 127 * K)."""
    return q.sum(dim=1, dtype=torch.int32)


def mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, sums: torch.Tensor, fn=None,
       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ (q * scale)^T`` [M, N] in ``out_dtype`` (computed in float32, rounded once) for x
    [M, K] (M <= MAX_ROWS, any float dtype);
    q a weight ``supports`` takes (checked once by the caller: this runs 73 times a Gemma
    decode step), ``scale`` float32 [N], ``sums`` = ``rowsum(q)``; ``fn``: ``function()``'s result."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    m, k = x.shape
    if m > MAX_ROWS or k != q.shape[1]:
        raise ValueError(f"int8_gemv takes up to {MAX_ROWS} rows of the weight's width {q.shape[1]}, got {m} x {k}")
    n = q.shape[0]
    y = torch.empty(m, n)
    if (fn or function())(x.data_ptr(), m, q.data_ptr(), scale.data_ptr(), sums.data_ptr(), y.data_ptr(), n, k,
                          torch.get_num_threads()):
        raise MemoryError("int8_gemv: no memory for the activation planes")
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def op():
    """``mm`` as the torch operator ``qkv::int8_gemv`` (x, q, scale, sums) -> x's dtype, or None
    where the kernel is not there: what the compiled decode step calls (engine/cpu_aoti.py), so
    the exported graph holds one node the package calls back into (AOTInductor's proxy executor;
    ~10 us a call, measured against 3 for ctypes alone). Defined once a process, before a package
    that uses it is loaded."""
    from qkv.model import native

    fn = function()
    # The result in x's dtype, rounded here: inside a compiled graph a bf16 rounding of a float32
    # result can be fused away (inductor computes bf16 casts in float32), and then the package's
    # tokens were not eager's (tests/test_cpu_aoti_gemma3.py).
    return native.operator("int8_gemv(Tensor x, Tensor q, Tensor scale, Tensor sums) -> Tensor",
                           lambda x, q, scale, sums: mm(x, q, scale, sums, fn, x.dtype),
                           lambda x, q, scale, sums: x.new_empty(x.shape[0], q.shape[0]),
                           lambda: fn is not None)
