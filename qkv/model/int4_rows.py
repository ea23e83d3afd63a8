"""A few rows times an int4 weight without unpacking it: model/csrc/int4_rows.c.

A batched decode step multiplies a few rows of activations by every int4 layer. ATen's
``_weight_int4pack_mm_for_cpu`` ran those at ~35 GMAC/s on this project's 2-core AVX-512
machine (half of a SmolLM2 16-row step: docs/benchmarks.md, issue 19); unpacking the
weight to bf16 for oneDNN's GEMM (``int4.unpack``) costs as much as the product at so few
rows. The C kernel unpacks each group of codes into registers' layout in L1 and multiplies
with AVX-512 BF16's vdpbf16ps, the codes entering as the exact bf16 number 128 + q; the
weight is never rounded (as in ATen's kernel), only the float32 summation order differs, and
the output is rounded once to bf16 (tests/test_int4_rows.py).

Needs avx512_bf16 (checked in /proc/cpuinfo before building: the source does not compile
without it); without it, with no compiler or with ``QKV_NATIVE=0``, ``product`` returns None
and the caller runs ATen's kernel.

Inside the compiled batched decode step (engine/cpu_aoti.py) the product is the operator
``qkv::int4_rows`` (``op()``), one node of the exported graph that the package calls back into,
as model/int8_gemv.py's ``qkv::int8_gemv``; ``Int4Linear`` traces it only inside ``as_op()``
(that export), so the one-sequence package and ``--compile`` keep ATen's traced kernel.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

GROUP, TILE_ROWS = 32, 64  # model/int4.py's group and packing tile

# Rows for which the kernel runs (from 2: batch-1 decode is the AOTI package's, and ATen's
# kernel is a matrix-vector product there; up to int4.DENSE_ROWS, where the bf16 GEMM takes
# over). Measured at SmolLM2's shapes: docs/benchmarks.md, session 9.
MIN_ROWS = 2
_tracing: list[bool] = [False]  # inside ``as_op()``: Int4Linear traces the operator

ARGTYPES = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])


def _kernel():
    from qkv.model import native

    if not _has_bf16_dot():  # no build attempted: it would fail, in every process
        return None
    return native.function("int4_rows", "qkv_int4_rows", ARGTYPES)


_bf16_dot: list[bool] = []


def _has_bf16_dot() -> bool:
    """Whether this CPU has AVX-512 BF16 (vdpbf16ps), read once from /proc/cpuinfo."""
    if not _bf16_dot:
        from qkv.model import native

        _bf16_dot.append("avx512_bf16" in native._cpu_id().split())
    return _bf16_dot[0]


def product(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor | None:
    """``x`` [M, K] bf16 times the weight of ``int4.pack``'s (packed, scales_zeros), [M, N]
    bf16; None where the kernel does not apply (the caller runs ATen's)."""
    m, k = x.shape
    n = scales_zeros.shape[1]
    if (m < MIN_ROWS or n % TILE_ROWS or k % GROUP or x.dtype != torch.bfloat16 or x.stride(1) != 1
            or packed.dtype != torch.uint8 or packed.shape != (n, k // 2) or not packed.is_contiguous()
            or scales_zeros.dtype != torch.bfloat16 or not scales_zeros.is_contiguous()
            or scales_zeros.shape[0] * GROUP != k or torch.compiler.is_compiling()):
        return None
    fn = _kernel()
    if fn is None:
        return None
    threads = max(1, min(torch.get_num_threads(), n // TILE_ROWS))
    base = (m * (k // GROUP) + 15) // 16 * 16
    scratch = torch.empty(base + threads * (1024 + m * TILE_ROWS))  # 64-byte aligned (c10's CPU allocator)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    fn(x.data_ptr(), m, x.stride(0), packed.data_ptr(), scales_zeros.data_ptr(), k, n, y.data_ptr(), n,
       scratch.data_ptr(), threads)
    return y


def _call(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The operator's CPU kernel: ``product``, or ATen's kernel where it does not apply (a
    strided x from the graph is made contiguous first)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    y = product(x, packed, scales_zeros)
    if y is None:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)
    return y


def op():
    """``product`` as the torch operator ``qkv::int4_rows`` (x bf16 [M, K], packed, scales_zeros)
    -> bf16 [M, N], or None where the kernel is not there. Defined once a process, before a
    package that calls it is loaded (engine/cpu_aoti.py)."""
    from qkv.model import native

    return native.operator("int4_rows(Tensor x, Tensor packed, Tensor scales_zeros) -> Tensor", _call,
                           lambda x, packed, scales_zeros: x.new_empty(x.shape[0], scales_zeros.shape[1]),
                           lambda: _kernel() is not None)


def traced() -> bool:
    """Whether ``Int4Linear`` should put ``op()`` in the graph being traced (inside ``as_op``)."""
    return _tracing[0] and torch.compiler.is_compiling()


@contextlib.contextmanager
def as_op():
    """Trace the few-row products as ``qkv::int4_rows`` (the batched step's export) where the
    kernel is there."""
    _tracing[0] = op() is not None
    try:
        yield
    finally:
        _tracing[0] = False
