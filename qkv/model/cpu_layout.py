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

A linear whose module sets ``keep_row_major`` stays as it is: Whisper's decoder ``fc2``
(2048 -> 512), where the row-major GEMV is the faster one (2026-12-03, quiet, cold weights,
six matrices in turn: 300 us against 440 at 2 threads, 340 against 550 at 1). Not a rule for
every matrix wider in than out: 8192 -> 2048 was faster column-major at both thread counts.
"""

from __future__ import annotations

import torch
from torch import nn


def _relayable(m) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.Linear) and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2
            and w.is_contiguous())



def fuse_column_major(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Linears that read the same input as one GEMV: their float32 CPU weights relaid into one
    column-major ``[in, sum of outs]`` storage, each linear's weight a view of it (same values
    and Parameter objects, no copy kept). Returns (that ``W^T``, the concatenated bias, zeros
    where a linear has none) for ``torch.addmm(bias, x, W^T)``; None (nothing changed) unless
    every linear is a contiguous float32 CPU ``nn.Linear`` of the same input width. Whisper
    base's self-attention q/k/v: 229 us for the fused 3 MB GEMV against 3 x 125 us (2026-12-03,
    cold weights, 2 threads), and two ops fewer."""
    if not all(_relayable(m) for m in linears) or len({m.in_features for m in linears}) != 1:
        return None
    wt = _fresh((linears[0].in_features, sum(m.out_features for m in linears)))  # [in, sum of outs]
    torch.cat([m.weight.detach().t() for m in linears], dim=1, out=wt)
    bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                      for m in linears])
    col = 0
    for m in linears:
        m.weight.data = wt[:, col:col + m.out_features].t()
        col += m.out_features
    return wt, bias


def column_major_fp32(model: nn.Module) -> int:
    """Relay every float32 CPU ``nn.Linear`` weight column-major in place, but those marked
    ``keep_row_major``; returns how many.
    Same values, same shape and Parameter objects (ties stay tied); only the strides change.
    Modules with a ``fuse_cpu()`` method fuse their projections first (``fuse_column_major``)."""
    for m in model.modules():
        if hasattr(m, "fuse_cpu"):
            m.fuse_cpu()
    n = 0
    for m in model.modules():
        if _relayable(m) and not getattr(m, "keep_row_major", False):
            w = m.weight.data
            m.weight.data = _fresh((w.shape[1], w.shape[0])).copy_(w.t()).t()
            n += 1
        elif _relayable(m) and not getattr(m, "_on_fresh_pages", False):  # kept row-major: moved once
            m.weight.data = _fresh(tuple(m.weight.shape)).copy_(m.weight.data)
            m._on_fresh_pages = True
    return n


def _fresh(shape: tuple[int, int]) -> torch.Tensor:
    """New float32 storage for a relaid matrix, on 2 MB pages where the system gives them
    (kvcache/zero_pages.py): a decode step streams every weight once."""
    from qkv.kvcache.zero_pages import huge_zeros

    return huge_zeros(shape, torch.float32)
