"""Weight-only int8 quantization for the CPU decode path.

On a CPU, batch-1 decode is bound by memory bandwidth: each token reads every weight once.
SmolLM2 is 540 MB per token in fp32 and 270 MB in bf16; int8 weights with one scale per
output channel read 135 MB. Activations stay in the model's dtype, so only the weights are
rounded (activation quantization, as in FBGEMM's dynamic int8, cost SmolLM2 3.5x in
perplexity). The matmul of one to ``GEMV_ROWS`` rows (a decode step) is a C kernel
(model/int8_gemv.py: x as two int8 planes, VNNI dot products, ~2x torch's
``_weight_int8pack_mm`` from memory), torch's kernel where it is not built.
`qkv perplexity --quantization int8` measures what the rounding costs.

``quantize`` also applies the other CPU weight formats: "int4" (model/int4.py; the lm_head
int8) and "bf16" (nothing to swap: the engine casts the model). Which one "auto" picks:
model/cpu_format.py. "fp8" (model/fp8.py) is the GPU's: e4m3 weights and activations through
``torch._scaled_mm``; on the CPU an emulation of the same rounding, for measuring it.

Memory: a weight is rounded in blocks of rows (``rows_per_chunk``), each block widened to
float32, scaled and written into the int8 result, so no float32 copy of a whole matrix is
ever held (SmolLM2's tied 49,152 x 576 lm_head was 113 MB of float32 per temporary). Every
step is per row, so the result is the whole-matrix rounding bit for bit
(tests/test_quant_chunked.py). On the CPU load path (model/materialize.py) each linear's
weight is rounded as it is read from the file and its float copy dropped at once, so the
float model is never whole in memory; ``quantize`` then swaps in the layers.

Several rows at once (``INT_MM_ROWS`` or more: a batched decode step's lm_head): torch's
``_weight_int8pack_mm`` costs each row almost as much as one whole call (SmolLM2's lm_head,
49,152 x 576: 2.9 ms for one row, 16-20 ms for 16), so there the activations are split per row
into two int8 planes, ``x ~= s * (hi + lo / 254)`` with ``s = max|x_row| / 127``, and both go
through one ``torch._int_mm`` (int8 x int8 -> int32, VNNI; 16 rows 5-7 ms) against the same
int8 weight, no second copy. The two planes carry ~15 bits of each row's range, finer than
the bf16 activations' own 8-bit mantissa for the row's large elements; the output agrees with
the int8 kernel to its bf16 rounding (tests/test_cpu_batched_mm.py). From ``DENSE_ROWS``
rows (a prefill) ``_int_mm`` scales worse than oneDNN's bf16 GEMM (Gemma 3's 4,096 x 640 at
1,024 rows: planes 50 ms, the int8 kernel 41, bf16 32), so there the int8 weight is widened
to bf16 for the step (exactly: |q| <= 127) and the product, rounded to bf16, is scaled.
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("int4", "int8", "bf16", "fp8")  # fp8: model/fp8.py (the GPU; emulated on the CPU)

# Rows from which Int8Linear goes through int8_rows_mm (measured, SmolLM2's lm_head, 2 threads:
# the int8 kernel 3.9 ms at 4 rows, 8.9 at 8; int8_rows_mm ~5 at 4 and 8).
INT_MM_ROWS = 8
DENSE_ROWS = 256  # from here: the weight widened to bf16 and oneDNN's GEMM (module docstring)
# Rows up to which the lm_head goes through the C kernel (model/int8_gemv.py), above through
# oneDNN (Gemma 3's 262,144 x 640, 2 threads: C 7.0 / 6.8 / 8.8 / 15.2 ms at 1 / 2 / 4 / 8 rows,
# oneDNN 10.6 / 8.9 / 11.3 / 13.9).
GEMV_ROWS = 4

# float32 scratch of one block of rows: small next to any weight worth quantizing, large
# enough that the per-block Python costs nothing (SmolLM2's lm_head: 28 blocks).
CHUNK_BYTES = 4 << 20


def rows_per_chunk(in_features: int, multiple: int = 1) -> int:
    """Rows of a [N, in_features] weight rounded per block: CHUNK_BYTES of float32, at least
    ``multiple`` and a multiple of it."""
    rows = CHUNK_BYTES // (4 * max(in_features, 1))
    return max(multiple, rows // multiple * multiple)


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 [N, K], scale [N] in w's dtype), ``scale[o] = max|w[o, :]| / 127``
    rounded in float32, block of rows by block of rows (``w`` is not modified)."""
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scale = torch.empty(n, dtype=torch.float32)
    step = rows_per_chunk(k)
    for r in range(0, n, step):
        c = w[r : r + step].to(torch.float32, copy=True)  # a copy: the in-place ops below
        lo, hi = c.aminmax(dim=1)  # max|w| without an |w| copy: the same value, exactly
        s = (torch.maximum(hi, lo.neg_()) / 127).clamp_(min=1e-12)
        q[r : r + step] = c.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[r : r + step] = s
    return q, scale.to(w.dtype)


def int8_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) split per row into two int8 planes, ``x ~= s * (hi + lo / 254)``
    with ``s = max|x_row| / 127``: ([hi; lo] [2M, K] float32 holding integers in [-127, 127], s [M, 1])."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30).div_(127)
    hi = torch.round(xf / s)
    lo = torch.round((xf - hi * s).mul_(254).div_(s))  # the remainder, |.| <= s / 2: in [-127, 127]
    return torch.cat([hi, lo]), s


def join_planes(acc: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The [2M, N] products of ``int8_planes``' rows -> x's [M, N] product in float32."""
    m = s.shape[0]
    return acc[m:].float().div_(254).add_(acc[:m]).mul_(s)


def int8_rows_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale)^T`` in float32 for x [M, K] (any float dtype), q [N, K] int8, scale [N]:
    x as ``int8_planes`` (module docstring), one ``torch._int_mm`` of 2M rows."""
    planes, s = int8_planes(x)
    acc = torch._int_mm(planes.to(torch.int8), q.t())  # [2M, N] int32
    return join_planes(acc, s).mul_(scale.float())


class Int8Linear(nn.Module):
    """``y = x @ (w_int8 * scale)^T + b``, with ``scale[o] = max|w[o, :]| / 127``."""

    def __init__(self, linear: nn.Linear | None = None, *, parts: tuple | None = None, bias=None,
                  onednn: bool = False):
        """From ``linear`` (its weight rounded now), or from ``parts``, ``quantize_int8``'s
        result, and ``bias`` (a tensor or None). ``onednn``: multiply through oneDNN's int8 GEMM
        where torch has it (model/int8_onednn.py; the lm_head), and up to ``GEMV_ROWS`` rows through
        the C kernel (model/int8_gemv.py) where it builds: the weight is packed for oneDNN at its
        first call and ``weight_int8`` then left on the meta device (shape only: no second copy)
        unless the C kernel reads it; the output is float32 whatever x's dtype."""
        super().__init__()
        from qkv.model import int8_gemv, int8_onednn

        self.onednn = onednn and int8_onednn.available()
        self._packed = None  # (packed weight, float32 scale, zero points) once packed
        self.lm_head = onednn
        if linear is not None:
            parts, bias = quantize_int8(linear.weight.detach()), linear.bias
        q, scale = parts
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        # Up to GEMV_ROWS rows go through the C kernel (model/int8_gemv.py) where it builds: it
        # needs each row's sum (not saved: made again from the codes). None: torch's kernels.
        self.register_buffer("rowsum", None, persistent=False)
        if not q.is_meta and q.device.type == "cpu" and int8_gemv.supports(q) and int8_gemv.function():
            self.rowsum = int8_gemv.rowsum(q)
        self._scale32 = None  # the scale in float32, for the kernel's eager calls
        if scale.dtype == torch.float32:  # float32 x goes through the kernel in bf16 (forward)
            self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.rowsum is not None and x2.shape[0] <= GEMV_ROWS:
            if self.lm_head:
                y = self._gemv(x2)  # float32 from x in full (two int8 planes), as oneDNN's below
            else:
                # x and the product in bf16, as torch's int8 kernel and a prefill's bf16 GEMM round
                # them (engine/dtype.py's rule for Gemma 3): without, Gemma 3's decode perplexity
                # moved -1.36% from float32's, -0.59% with (docs/benchmarks.md, session 9).
                y = self._gemv(x2.to(torch.bfloat16)).to(x.dtype)
        elif self.onednn:
            from qkv.model import int8_onednn

            if self._packed is None:
                self._packed = (int8_onednn.pack(self.weight_int8), self.scale.float(),
                                torch.zeros(self.out_features, dtype=torch.int64))
                if self.rowsum is None:  # the plain copy only stays for the C kernel's few-row steps
                    self.weight_int8 = self.weight_int8.to("meta")
            # float32, not x's dtype: its one caller (compute_logits) wants float32 logits, and
            # rounding them to bf16 on the way would lose what the GEMM kept.
            y = int8_onednn.mm(x2, *self._packed)
        elif x2.shape[0] >= DENSE_ROWS:
            y = torch.mm(x2.to(torch.bfloat16), self.weight_int8.to(torch.bfloat16).t()).mul_(self.scale).to(x.dtype)
        elif x2.shape[0] >= INT_MM_ROWS:
            y = int8_rows_mm(x2, self.weight_int8, self.scale).to(x.dtype)
        elif x2.dtype == torch.float32:
            # The kernel's float32 path widens and multiplies without bf16's dot products: ~16x
            # slower (a 1,536 x 640 weight, one row: 0.66 against 0.041 ms). x rounded to bf16
            # as the dense path above does it (Gemma 3 computes in float32: engine/dtype.py).
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scale_bf16).float()
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale.to(x.dtype))
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """The C kernel's product: float32 for the lm_head (which never runs compiled), else
        in x's dtype (rounded in the kernel's wrapper, eagerly and in the compiled step alike)."""
        from qkv.model import int8_gemv

        # The layers' scale as torch's int8 kernel takes it from a float32 model (bf16, forward):
        # the same products as before the C kernel, bit for bit up to float32 summation order.
        scale = self.scale if self.lm_head or not hasattr(self, "scale_bf16") else self.scale_bf16
        if torch.compiler.is_compiling():  # one graph node the compiled step calls back (int8_gemv.op)
            return int8_gemv.op()(x2, self.weight_int8, scale.float(), self.rowsum)  # in x's dtype
        if self._scale32 is None:
            self._scale32 = scale.float()
        return int8_gemv.mm(x2, self.weight_int8, self._scale32, self.rowsum,
                            out_dtype=torch.float32 if self.lm_head else x2.dtype)


def check(method: str, device: torch.device) -> None:
    """ValueError for an unknown method or a device other than the CPU."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} (have: {', '.join(METHODS)})")
    if device.type != "cpu" and method != "fp8":
        raise ValueError(f"quantization={method!r} is the CPU decode path; on a GPU use bfloat16 or fp8")


def uses_int4(method: str, name: str, linear: nn.Linear) -> bool:
    """Whether ``method`` puts the linear ``name`` (its attribute name) in int4."""
    from qkv.model.int4 import supports

    return method == "int4" and name != "lm_head" and supports(linear)


def quantize_weight(method: str, name: str, linear: nn.Linear, w: torch.Tensor) -> tuple:
    """The rounded form of weight ``w`` of ``linear`` (attribute ``name``) under ``method``:
    what ``quantize`` builds the layer from (model/materialize.py calls it as it reads)."""
    if uses_int4(method, name, linear):
        from qkv.model.int4 import pack

        return ("int4", *pack(w))
    return ("int8", *quantize_int8(w))


# Attribute of an nn.Linear whose weight was rounded as it was read (its parameter left on
# meta): quantize_weight's result. A plain attribute, so ``Module.to`` does not cast it.
ROUNDED = "_qkv_rounded"


def quantize(model: nn.Module, method: str, device: torch.device) -> nn.Module:
    """Replace every nn.Linear of ``model`` in place (a tied lm_head gets its own int8 copy).
    "int4": int4 where the shape allows (model/int4.py), int8 for the lm_head and the rest.
    A linear whose weight was already rounded on load (``ROUNDED``) is built from that."""
    check(method, device)
    if method == "bf16":
        return model
    if method == "fp8":
        from qkv.model import fp8

        fp8.check(model.config, device)
        return fp8.quantize(model)
    from qkv.model.int4 import Int4Linear

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                kind, *parts = child.__dict__.pop(ROUNDED, None) or quantize_weight(
                    method, child_name, child, child.weight.detach())
                if kind == "int4":
                    setattr(module, child_name, Int4Linear(parts=tuple(parts), bias=child.bias))
                else:  # the lm_head runs outside the compiled decode step: oneDNN's int8 GEMM there
                    setattr(module, child_name, Int8Linear(parts=tuple(parts), bias=child.bias,
                                                           onednn=child_name == "lm_head"))
    return model
