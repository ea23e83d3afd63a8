"""Column-major float32 weights for CPU decode.

A decode step multiplies one row of activations by every weight matrix: it is a GEMV, bound
by how fast the matrix streams from memory. On the CPU, torch hands a row-major ``[out, in]``
float32 weight (nn.Linear's layout) to a GEMV that runs on one thread; the same product over
the column-major layout (``x @ W^T`` with ``W^T`` contiguous) runs as a GEMM over both
threads. Measured on the 2-core development machine (docs/benchmarks.md, 2026-12-03): Whisper
base's 51,865 x 512 output projection 11.6 -> 4.7 ms, one decode step of its decoder (84 MB of
layers plus the output projection) 21.9 -> 13.3 ms.

The cost: logits or activations of several rows at once (batched decode) run ~10-15% slower
on this layout at 8 rows for matrices of this size (more for a 262k vocabulary), and large
prompts are unaffected (the GEMM takes either layout). The weights are relaid in place: no
copy is kept, and a tied embedding reads its rows through the same strided storage.
bf16 and the int8/int4 formats keep their own kernels and layouts (model/quant.py).
"""

from __future__ import annotations

import torch
from torch import nn


def column_major_fp32(model: nn.Module) -> int:
    """Relay every float32 CPU ``nn.Linear`` weight column-major in place; returns how many.
    Same values, same shape and Parameter objects (ties stay tied); only the strides change."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            w = m.weight
            if w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous():
                w.data = w.data.t().contiguous().t()
                n += 1
    return n
