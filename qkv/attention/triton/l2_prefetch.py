"""Bulk L2 prefetch of a weight the step reads next, issued while DRAM idles (issue 20).

At Llama-8B batch 1 a layer's attention (RoPE + KV write, decode, merge: ~10-13 us a layer on
the H200) reads ~2.4 MB of K/V, so DRAM sits nearly idle while the ``o_proj`` GEMV waits for
its input; then o_proj streams its 33.6 MB at 65% of the copy rate (its 1,024 programs do not
all fit on the SMs, so the second wave starts cold after the wait). With this switch the decode
kernel's programs (256 at batch 1, started early under programmatic dependent launch) each issue
``cp.async.bulk.prefetch.L2`` (sm_90: one instruction a thread, ``chunk`` bytes each) for a slice
of the o_proj weight before their PDL wait: the weight streams into L2 while attention runs and
o_proj reads it from there. A prefetch changes no value (no kernel of the step writes weights);
its effect is time only.

``tail_norm.PF_NW``: the program of a tail-norm GEMV that finishes an eighth before the last one
prefetches the norm weight the last program reads (an HBM miss otherwise, on the serial tail).

Switch (read at import; the module flags change it before graph capture): ``QKV_L2_PREFETCH`` =
``1`` (bulk) / ``lines`` (per-line prefetches) / ``0`` (the default). Measured on the H200 (session
10): o_proj stayed at 11.3 us (12.2 without) and the 33 MB of prefetches slowed the attention
kernels under them: 241.5 against 244.6 tok/s; with the lighter tail norms 236.4. Off under
Triton's interpreter (inline PTX) and below compute capability 9.0.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

_MODE = os.environ.get("QKV_L2_PREFETCH", "0").strip().lower()
ON = _MODE != "0"
# ``lines``: per-line ``prefetch.global.L2`` from every thread instead of the bulk instruction
# (which one SM's copy engine serves in turn: 33.6 MB is ~2,000 lines an SM over the grid).
LINES = _MODE == "lines"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CAPABLE: dict = {}


def supported(device) -> bool:
    """Whether kernels on ``device`` (a torch device or tensor) can issue the bulk prefetch."""
    if INTERPRET:
        return False
    import torch

    dev = getattr(device, "device", device)
    if dev.type != "cuda":
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    ok = _CAPABLE.get(idx)
    if ok is None:
        ok = _CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return ok


MAX_CHUNK = (1 << 20) - 16  # the instruction's size field (sm_90 SASS: 16-byte units, 16 bits)


def chunk_bytes(nbytes: int, threads: int) -> int:
    """Bytes per prefetch instruction so that ``threads`` instructions cover ``nbytes``: a
    multiple of 16 (the instruction's granule), at least 16, at most ``MAX_CHUNK`` (then only
    the first ``threads * MAX_CHUNK`` bytes are prefetched)."""
    per = -(-nbytes // max(threads, 1))
    return min(MAX_CHUNK, max(16, -(-per // 16) * 16))


def lines_per_thread(nbytes: int, threads: int) -> int:
    """128-byte lines each of ``threads`` threads prefetches to cover ``nbytes``."""
    return -(-(-(-nbytes // 128)) // max(threads, 1))


def region(t) -> tuple[int, int] | None:
    """(address, bytes) of tensor ``t`` when it can be prefetched in bulk (contiguous, its
    start and size 16-byte aligned), else None."""
    if t is None or not t.is_contiguous():
        return None
    n = t.numel() * t.element_size()
    if t.data_ptr() % 16 or n % 16 or n == 0:
        return None
    return t.data_ptr(), n


@triton.jit
def bulk(PTR, NBYTES, CHUNK, first, TPB: tl.constexpr):
    """Prefetch into L2 bytes ``[e * CHUNK, min((e + 1) * CHUNK, NBYTES))`` of ``PTR`` for
    ``e = first + 0 .. TPB - 1`` (one element a thread when ``TPB`` is the program's thread
    count). Elements past the end issue nothing."""
    e = first + tl.arange(0, TPB)
    off = e.to(tl.int64) * CHUNK
    size = tl.maximum(tl.minimum(NBYTES - off, CHUNK), 0).to(tl.int32)
    p = PTR.to(tl.pointer_type(tl.int8), bitcast=True) + off
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.gt.s32 p, $2, 0;\n\t@p cp.async.bulk.prefetch.L2.global [$1], $2;\n\t"
        "mov.u32 $0, 0;\n\t}", "=r,l,r", [p, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def lines(PTR, NBYTES, first, TPB: tl.constexpr):
    """Prefetch into L2 the 128-byte lines ``first + 0 .. TPB - 1`` of ``PTR`` that lie in its
    first ``NBYTES`` bytes (``prefetch.global.L2``, one line a thread: for a few KB, where the
    bulk instruction's uniform-register loop costs registers the kernel would rather keep)."""
    off = (first + tl.arange(0, TPB)).to(tl.int64) * 128
    p = PTR.to(tl.pointer_type(tl.int8), bitcast=True) + off
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.lt.s64 p, $2, $3;\n\t@p prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;\n\t}",
        "=r,l,l,l", [p, off, NBYTES.to(tl.int64) + off * 0], dtype=tl.int32, is_pure=False, pack=1)
