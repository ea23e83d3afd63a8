"""The int8 lm_head through oneDNN's int8 GEMM (VNNI): ``x @ (q * scale)^T`` in float32.

torch's ``_weight_int8pack_mm`` widens the int8 weight to the activations' dtype and multiplies
in floating point: on this 2-core machine Gemma 3's lm_head (262,144 x 640, 168 MB of int8)
takes 18-21 ms a token that way, ~8 GB/s where the memory gives ~30, and it is most of
Gemma's decode step. oneDNN's int8 x int8 GEMM (``onednn::qlinear_pointwise``, what
inductor's x86 int8 path calls) reads the same codes with integer dot products: 11-12 ms
for one row, 36 against 59 ms for 16, 1.05 against 1.49 s for 512 (docs/benchmarks.md).

The activations are not rounded to 8 bits (as dynamic int8 quantization would: SmolLM2 3.5x
perplexity): each row is split into two int8 planes, ``x ~= s * (hi + lo / 254)`` with
``s = max|x_row| / 127`` (quant.py's ``int8_planes``), both planes go through one GEMM with
a unit activation scale, and the row's ``s`` multiplies the float32 result. Against the exact
product of the int8 weight the result is ~100x closer than ``_weight_int8pack_mm``'s bf16
output (2.5e-5 against 4.5e-3 of the largest logit, Gemma's shape, random weights).

Used for the lm_head only (``Int8Linear(onednn=True)``, set by ``quant.quantize``): it runs
outside the compiled decode step (engine/cpu_aoti.py), and the layers' small matrices are
faster in ``_weight_int8pack_mm`` (a 1,536 x 640 projection 0.039 ms, oneDNN 0.05-0.06).
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether this torch has oneDNN's int8 linear on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> oneDNN's blocked copy of it (an opaque mkldnn tensor of the same bytes)."""
    return torch.ops.onednn.qlinear_prepack(q, None)


_ONE, _ZERO_POINT = torch.tensor(1.0), torch.tensor(128)  # the planes' scale and uint8 offset


def mm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale)^T`` in float32 for x [M, K] (any float dtype); ``packed``: ``pack(q)``,
    ``scale`` [N] float32, ``zero_points`` [N] int64 zeros (the weight's, symmetric)."""
    from qkv.model.quant import int8_planes, join_planes

    planes, s = int8_planes(x)
    planes = planes.add_(128).to(torch.uint8)  # uint8 with zero point 128
    acc = torch.ops.onednn.qlinear_pointwise.tensor(planes, _ONE, _ZERO_POINT, packed, scale, zero_points, None,
                                                    1.0, 0, torch.float32, "none", [], "")
    return join_planes(acc, s)
