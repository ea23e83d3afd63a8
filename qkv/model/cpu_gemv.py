"""One-row float32 products on the CPU through numpy's BLAS (OpenBLAS in numpy's wheels).

A one-sequence decode step multiplies one row of activations by each weight matrix (a GEMV).
torch's float32 CPU matmul goes to MKL, which on this project's AMD EPYC machine runs a
GEMV at ~5 GFLOP/s whether the matrix is in DRAM or L3 (Whisper base's 512 x 512: ~100 us
either way, against 37 us for a plain sum over the same 1 MB) and does not split it over a
second thread. numpy's OpenBLAS splits it over its own threads (measured 2026-12-03, quiet,
cold weights, per matrix, MKL at 1 thread -> OpenBLAS at 2: 512 x 512 111 -> 72 us, 512 ->
1536 229 -> 124, 512 -> 2048 223 -> 130, 2048 -> 512 261 -> 174, 512 -> 51,865 5.0 -> 3.6 ms;
at one thread OpenBLAS is no faster than MKL). ``addmm`` calls it on views of the same
storage (no copy): the numpy arrays share the tensors' memory.

Opt in per model (``cpu_blas_gemv``, set by Whisper); ``use_blas_gemv`` swaps the model's
float32 CPU linears to ``BlasLinear``. Anything but a single float32 CPU row (prompts,
batches, autograd) goes to torch as before, and so does every product when numpy's BLAS
cannot be given a thread count (``blas_threads``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_threads = [0]  # BLAS threads set by blas_threads(); 0: not set, this path off


def blas_threads(n: int) -> bool:
    """Give numpy's OpenBLAS ``n`` threads (the engine's thread count; process-wide, as
    ``torch.set_num_threads``); False, and the BLAS path stays off, where numpy's BLAS is not
    an OpenBLAS threadpoolctl can set. The count is fixed, not adapted to the load: OpenBLAS's
    GEMV on one thread and on two is not bitwise equal, so the tokens would depend on it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    libs = ThreadpoolController().select(internal_api="openblas")
    if not libs.lib_controllers:
        return False
    for c in libs.lib_controllers:
        c.set_num_threads(n)
    _threads[0] = n
    return True


def enabled() -> bool:
    """Whether numpy's BLAS has been given the engine's thread count (``blas_threads``): the
    CPU cross attention's per-head GEMVs use it then (attention/cross.py), at any count."""
    return _threads[0] > 0


def _one_row(x: torch.Tensor) -> bool:
    return (_threads[0] > 1 and x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.float32
            and x.device.type == "cpu" and not x.requires_grad)


def addmm(bias: torch.Tensor | None, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``bias + x @ wt`` (``torch.addmm``; bias may be None) with a one-row float32 CPU ``x``
    through numpy's BLAS, anything else through torch."""
    if not _one_row(x):
        return x @ wt if bias is None else torch.addmm(bias, x, wt)
    return _gemv(x, wt.detach().numpy(), None if bias is None else bias.detach().numpy())


def _gemv(x: torch.Tensor, wt: np.ndarray, bias: np.ndarray | None) -> torch.Tensor:
    out = torch.empty(1, wt.shape[1])
    o = out.numpy()
    np.matmul(x.detach().numpy(), wt, out=o)
    if bias is not None:
        np.add(o, bias, out=o)  # numpy's dispatch: a few us less than torch's per call
    return out


class BlasLinear(nn.Linear):
    """``nn.Linear`` whose one-row float32 CPU products go through numpy's BLAS (``addmm``),
    on numpy views of its weight and bias made once (remade if the weight is replaced)."""

    _blas: tuple | None = None  # (the storages' data_ptrs, W^T as numpy, bias as numpy or None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _one_row(x):
            return F.linear(x, self.weight, self.bias)
        w, b = self.weight, self.bias
        key = (w.data_ptr(), 0 if b is None else b.data_ptr())
        blas = self._blas
        if blas is None or blas[0] != key:
            blas = self._blas = (key, w.detach().t().numpy(), None if b is None else b.detach().numpy())
        return _gemv(x, blas[1], blas[2])


def use_blas_gemv(model: nn.Module) -> int:
    """Every float32 CPU ``nn.Linear`` of ``model`` becomes a ``BlasLinear`` (same module, same
    Parameters); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu":
            m.__class__ = BlasLinear
            n += 1
    return n
