"""Batch-1 matrix-vector product y = x W^T for the decode hot path.

cuBLAS picks a kernel per shape; at M = 1 it reads the large projections near the copy
bandwidth but the square 4096 x 4096 ``o_proj`` at about half of it (profile of a Llama-8B
decode step on the H100), and Qwen3-0.6B's ``down_proj`` (1024 x 3072) at an eighth of it
(H200, docs/benchmarks.md). This kernel streams W once, BLOCK_N rows per program, 16-byte
loads along K; ``ENABLED_SHAPES`` lists the (N, K) where it replaces cuBLAS.

Fusions at batch 1 (each one launch instead of two or three):
- ``silu_mul_linear``: SiLU-and-mul applied to the input while loading it (the down projection);
- ``norm_linear``: (residual add +) RMSNorm as the prologue of the projection that reads the
  norm's output (qkv and gate/up): every program recomputes the norm of the K-wide row (K is
  small: one tile), program 0 stores the new residual stream.

Switch (read at import; ``configure`` changes it in a running process, before graph capture):
``QKV_TRITON_GEMV`` = ``default`` | ``off`` (cuBLAS everywhere) | ``all`` (every one-row product
of a bias-free layer) | a list ``4096x1024,1024x3072`` (replaces the default) | ``+LIST``
(added to it); ``QKV_TRITON_GEMV_NORM=0`` keeps the norms as their own kernels. With
programmatic dependent launch on (``QKV_PDL``, pdl.py) each program's weight tile is loaded
before it waits for the previous kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qkv.attention.triton import pdl

# (out_features, in_features) where the Triton GEMV replaces cuBLAS at M = 1.
# H100 (2026-11-22, benchmarks/gpu_bench.py): only the square o_proj of Llama-8B gained inside the
# model (cuBLAS 20.7 us, Triton 14.2 us); the larger projections were as fast or faster in cuBLAS.
# The down projection (4096 x 14336) runs fused with SiLU-and-mul (one launch instead of two).
# lm_head (128256 x 4096): 348 us against cuBLAS's 370-380 us.
# qkv (6144 x 4096) and gate/up (28672 x 4096) joined them with programmatic dependent launch
# (H200, 2026-12-03 session 7: 225.4 -> 237.0 tok/s for the step, cuBLAS's kernels launch
# without PDL).
LLAMA_8B_SHAPES = {(4096, 4096), (4096, 14336), (128256, 4096), (6144, 4096), (28672, 4096)}
# Qwen3-0.6B: qkv, o, gate/up, down, lm_head. cuBLAS reads down_proj at 0.54 TB/s and the others
# at 1.6-2.6 TB/s (H200 profile, 2026-12-03); here the norms and SiLU fold into them as well.
QWEN3_06B_SHAPES = {(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)}
DEFAULT_SHAPES = LLAMA_8B_SHAPES | QWEN3_06B_SHAPES

ENABLED_SHAPES: set[tuple[int, int]] = set(DEFAULT_SHAPES)
ALL_SHAPES = False  # "all": every shape, not only the listed ones
FUSE_NORM = True  # RMSNorm folded into the following projection (norm_linear)
NORM_MAX_K = int(os.environ.get("QKV_GEMV_NORM_MAX_K", "2048"))  # widest row the norm prologue holds
# Whole-row tiles (one chunk of up to 8K elements a program) without PDL too (QKV_GEMV_FULL_K=1).
FULL_K = os.environ.get("QKV_GEMV_FULL_K", "0") == "1"
PDL_FULL_K = os.environ.get("QKV_GEMV_PDL_FULL_K", "1") == "1"  # with PDL (0: only the first chunk before the wait)
PDL_BLOCK_N = int(os.environ.get("QKV_GEMV_PDL_BLOCK_N", "4"))  # rows a program of N > 2048 with PDL
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the prologue holds the whole row in one tile: small hidden sizes only


def parse_tiles(spec: str | None) -> dict[tuple[int, int], tuple[int, int, int]]:
    """``QKV_GEMV_TILES`` = ``NxK:BLOCK_N:BLOCK_K:WARPS,...`` -> {(N, K): tile}: per-shape tiles
    that replace ``tile``'s choice (sweeps; BLOCK_K 0 keeps the default chunk)."""
    out = {}
    for item in (spec or "").split(","):
        if item.strip():
            shape, bn, bk, w = item.strip().lower().split(":")
            n, k = (int(v) for v in shape.split("x"))
            out[(n, k)] = (int(bn), int(bk), int(w))
    return out


TILES = parse_tiles(os.environ.get("QKV_GEMV_TILES"))
# With PDL, shapes whose measured best tile differs from ``tile``'s rule. Llama-8B's o_proj
# (4096 x 4096, the tail-norm kernel at batch 1): 4 rows x 2048 with 8 warps loads twice the
# weight before the wait of the attention it follows; H200, batch-1 step 242.7 -> 247.3 tok/s
# (4 x 1024, 4 warps before; session 11, benchmarks.md). QKV_GEMV_TILES still wins over this.
PDL_TILES: dict[tuple[int, int], tuple[int, int, int]] = {(4096, 4096): (4, 2048, 8)}


# Weight loads with L2's evict-first policy (QKV_GEMV_EVICT_FIRST=1; see _w_chunk).
EVICT_FIRST = os.environ.get("QKV_GEMV_EVICT_FIRST", "0") == "1"


def parse(spec: str | None) -> tuple[set[tuple[int, int]], bool]:
    """``QKV_TRITON_GEMV``'s value -> (shapes, all shapes?). Raises ValueError on a bad entry."""
    spec = (spec or "default").strip().lower()
    if spec in ("default", ""):
        return set(DEFAULT_SHAPES), False
    if spec in ("off", "none", "0"):
        return set(), False
    if spec == "all":
        return set(), True
    base = set(DEFAULT_SHAPES) if spec.startswith("+") else set()
    for item in spec.lstrip("+").split(","):
        try:
            n, k = (int(v) for v in item.strip().split("x"))
        except ValueError:
            raise ValueError(f"QKV_TRITON_GEMV: {item!r} is not NxK (e.g. 1024x3072), 'default', 'off' "
                             f"or 'all'") from None
        base.add((n, k))
    return base, False


def configure(spec: str | None = None, fuse_norm: bool | None = None) -> None:
    """Set the enabled shapes (``QKV_TRITON_GEMV`` syntax) and the norm fusion. CUDA graphs
    keep the kernels they captured: recapture after changing this."""
    global ALL_SHAPES, FUSE_NORM
    shapes, ALL_SHAPES = parse(spec)
    ENABLED_SHAPES.clear()
    ENABLED_SHAPES.update(shapes)
    if fuse_norm is not None:
        FUSE_NORM = fuse_norm


configure(os.environ.get("QKV_TRITON_GEMV"), os.environ.get("QKV_TRITON_GEMV_NORM", "1") != "0")


def enabled(n: int, k: int) -> bool:
    return ALL_SHAPES or (n, k) in ENABLED_SHAPES


def tile(n: int, k: int, pdl_mode: int = 0) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an N x K weight. Narrow outputs take 2 rows per program
    (N = 1024 with 4 rows is 256 programs, under two per SM of an H200). With PDL a program's
    whole tile (up to 8K elements) is one chunk, all of it loaded before the wait."""
    fixed = TILES.get((n, k))
    if fixed is not None and not INTERPRET:
        return fixed[0], fixed[1] or min(1024, triton.next_power_of_2(k)), fixed[2]
    fixed = PDL_TILES.get((n, k)) if pdl_mode else None
    if fixed is not None and not INTERPRET:
        return fixed
    block_n = 2 if n <= 2048 else (PDL_BLOCK_N if pdl_mode else 4)
    if INTERPRET:  # each program runs in numpy on the CPU: few wide ones (same math, other tiling)
        block_n = 32
    block_k = min(1024, triton.next_power_of_2(k))
    if ((pdl_mode and PDL_FULL_K) or FULL_K) and block_n * triton.next_power_of_2(k) <= 8192:
        block_k = triton.next_power_of_2(k)
    return block_n, block_k, 4


# K is a kernel constant: one variant per weight shape (a handful per model), a loop of known
# trip count, and loops over it run under the interpreter (numpy 2.4 refuses a runtime bound).
# Each kernel loads its first weight chunk before ``pdl.sync``: with programmatic dependent
# launch (pdl.py) that load overlaps the previous kernel; the activation is read after it.
@triton.jit
def _w_chunk(W, n, k0, k, stride_w, N, K: tl.constexpr, EVEN: tl.constexpr, EVICT: tl.constexpr = False):
    # ``EVICT``: weights are read once a step, so their lines go first from L2 (what stays is
    # what the step reads again: activations, KV).
    if EVICT:
        if EVEN:
            return tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :], eviction_policy="evict_first")
        return tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :],
                       mask=(n < N)[:, None] & ((k0 + k) < K)[None, :], other=0.0, eviction_policy="evict_first")
    if EVEN:  # unmasked: full 16-byte vector loads
        return tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :])
    return tl.load(W + n[:, None] * stride_w + (k0 + k)[None, :], mask=(n < N)[:, None] & ((k0 + k) < K)[None, :],
                   other=0.0)


@triton.jit
def _v_chunk(X, k0, k, K: tl.constexpr, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(X + k0 + k)
    return tl.load(X + k0 + k, mask=(k0 + k) < K, other=0.0)


@triton.jit
def _gemv_kernel(X, W, Y, N, stride_w, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN: tl.constexpr, OUT_F32: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr = False):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    w = _w_chunk(W, n, 0, k, stride_w, N, K, EVEN, EVICT)
    pdl.sync(PDL)
    acc = w.to(tl.float32) * _v_chunk(X, 0, k, K, EVEN).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x = _v_chunk(X, k0, k, K, EVEN).to(tl.float32)
        acc += _w_chunk(W, n, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1).to(X.dtype.element_ty)
    if OUT_F32:  # the logits: rounded to the model's dtype first, as torch's ``linear(x).float()``
        y = y.to(tl.float32)
    tl.store(Y + n, y, mask=n < N)


@triton.jit
def _silu_x(GU, k0, k, K: tl.constexpr, EVEN: tl.constexpr):
    """silu(g) * u of chunk k0 of [g | u], rounded where torch rounds it (silu's output, then the product)."""
    g = _v_chunk(GU, k0, k, K, EVEN).to(tl.float32)
    u = _v_chunk(GU + K, k0, k, K, EVEN)
    a = (g * tl.sigmoid(g)).to(u.dtype).to(tl.float32)
    return (a * u.to(tl.float32)).to(u.dtype).to(tl.float32)


@triton.jit
def _silu_gemv_kernel(GU, W, Y, N, stride_w, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr = False):
    """y = (silu(g) * u) W^T with [g | u] = GU: the activation is applied while loading x."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    w = _w_chunk(W, n, 0, k, stride_w, N, K, EVEN, EVICT)
    pdl.sync(PDL)
    acc = w.to(tl.float32) * _silu_x(GU, 0, k, K, EVEN)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        x = _silu_x(GU, k0, k, K, EVEN)
        acc += _w_chunk(W, n, k0, k, stride_w, N, K, EVEN, EVICT).to(tl.float32) * x[None, :]
    tl.store(Y + n, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=n < N)


@triton.jit
def _norm_gemv_kernel(X, R, NW, W, Y, RO, N, K, stride_w, eps, HAS_RES: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr):
    """y = rmsnorm(r + x) W^T, ro = r + x (program 0 stores it); without a residual y =
    rmsnorm(x) W^T. The norm is ``fused._rms_norm_kernel``'s math (no offset), rounded alike."""
    pid = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    km = k < K
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    # The weight tile first: its memory latency overlaps the norm's (cached) loads and reduction
    # (and with PDL the previous kernel).
    if EVEN:  # unmasked: full 16-byte vector loads
        w = tl.load(W + n[:, None] * stride_w + k[None, :])
    else:
        w = tl.load(W + n[:, None] * stride_w + k[None, :], mask=(n < N)[:, None] & km[None, :], other=0.0)
    nw = tl.load(NW + k, mask=km, other=0.0).to(tl.float32)
    pdl.sync(PDL)
    x = tl.load(X + k, mask=km, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (tl.load(R + k, mask=km, other=0.0).to(tl.float32) + x).to(RO.dtype.element_ty)
        if pid == 0:
            tl.store(RO + k, s, mask=km)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / K + eps)
    h = ((x * rstd).to(Y.dtype.element_ty).to(tl.float32) * nw).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + n, tl.sum(w.to(tl.float32) * h[None, :], 1).to(Y.dtype.element_ty), mask=n < N)


def _fits(x: torch.Tensor, layer: torch.nn.Linear) -> bool:
    if not isinstance(layer, torch.nn.Linear):  # a quantized layer keeps its own kernel
        return False
    w = layer.weight
    return (x.dim() == 2 and x.shape[0] == 1 and layer.bias is None and x.is_contiguous() and w.stride(1) == 1
            and w.dtype == x.dtype and enabled(*w.shape))


def gemv(x: torch.Tensor, weight: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
         num_warps: int | None = None, num_stages: int = 3, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T -> [1, N] in x's dtype (``out_dtype=torch.float32``: the same
    values, stored widened). Tiles default to ``tile(N, K)``."""
    N, K = weight.shape
    mode, kw = pdl.launch(x.device)
    bn, bk, nw = tile(N, K, mode)
    block_n, block_k, num_warps = block_n or bn, block_k or bk, num_warps or nw
    y = torch.empty((1, N), dtype=out_dtype or x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, weight, y, N, weight.stride(0), K=K, BLOCK_N=block_n,
                                             BLOCK_K=block_k, EVEN=N % block_n == 0 and K % block_k == 0,
                                             OUT_F32=y.dtype == torch.float32 and x.dtype != torch.float32,
                                             PDL=mode, EVICT=EVICT_FIRST,
                                             num_warps=num_warps,
                                             num_stages=num_stages, **kw)
    return y


def linear(x: torch.Tensor, layer: torch.nn.Linear, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``layer(x)`` (``.to(out_dtype)``), through the GEMV kernel when x is one row and the
    shape is enabled."""
    if _fits(x, layer):
        return gemv(x, layer.weight, out_dtype=out_dtype)
    y = layer(x)
    return y if out_dtype is None else y.to(out_dtype)


def silu_mul_linear(gate_up: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor | None:
    """``layer(silu(gate) * up)`` for one row in one kernel when the shape is enabled, else None.
    A layer of its own kind with a ``silu_mul_linear`` (model/fp8.py's, any number of rows) runs that."""
    if not isinstance(layer, torch.nn.Linear):
        own = getattr(layer, "silu_mul_linear", None)
        return own(gate_up) if own is not None else None
    w = layer.weight
    N, K = w.shape
    if (gate_up.dim() != 2 or gate_up.shape[0] != 1 or gate_up.shape[1] != 2 * K or layer.bias is not None
            or not enabled(N, K) or not gate_up.is_contiguous() or w.stride(1) != 1 or w.dtype != gate_up.dtype):
        return None
    mode, kw = pdl.launch(gate_up.device)
    bn, bk, nw = tile(N, K, mode)
    y = torch.empty((1, N), dtype=gate_up.dtype, device=gate_up.device)
    _silu_gemv_kernel[(triton.cdiv(N, bn),)](gate_up, w, y, N, w.stride(0), K=K, BLOCK_N=bn, BLOCK_K=bk,
                                             EVEN=N % bn == 0 and K % bk == 0, PDL=mode,
                                             EVICT=EVICT_FIRST, num_warps=nw, num_stages=3, **kw)
    return y


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(layer(rms_norm(residual + x)), residual + x)`` (no residual: ``(layer(rms_norm(x)), x)``)
    in one kernel for one row of an enabled shape with K <= ``NORM_MAX_K``; else None."""
    if not FUSE_NORM or not _fits(x, layer):
        return None
    w = layer.weight
    N, K = w.shape
    if (K > NORM_MAX_K or x.shape[1] != K
            or (residual is not None and (residual.shape != x.shape or not residual.is_contiguous()
                                          or residual.dtype != x.dtype))):
        return None
    mode, kw = pdl.launch(x.device)
    bn = tile(N, K, mode)[0]
    warps = 8 if K > 2048 else 4  # the whole row in registers: wider rows, more threads
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    ro = torch.empty_like(x) if residual is not None else x
    _norm_gemv_kernel[(triton.cdiv(N, bn),)](x, residual if residual is not None else x, norm_weight, w, y, ro, N, K,
                                             w.stride(0), eps, HAS_RES=residual is not None, BLOCK_N=bn,
                                             BLOCK_K=triton.next_power_of_2(K),
                                             EVEN=N % bn == 0 and K == triton.next_power_of_2(K), PDL=mode,
                                             num_warps=warps, **kw)
    return y, ro
