"""Fused mixture-of-experts for DeepSeek-V2/V3: tokens sorted by expert on the device, then
one grouped-GEMM launch for gate/up (SiLU-and-mul fused) and one for down (routing weights
applied), reading only the experts that tokens chose; a third small launch sums each token's
k rows and adds the shared experts' output.

The design is the one of vLLM's and SGLang's ``fused_moe`` (read, not copied): the T*k
(token, slot) pairs are sorted by expert and each expert's run is padded to a multiple of
``BLOCK_M``, so that every M-block of the sorted list belongs to one expert; a GEMM program
reads its block's row ids and its expert's weight tile. Padding rows carry the id ``T*k``
and are neither read nor written.

Graph-safe: nothing is read on the host. The sorted list has a static length that depends
only on T*k (``padded_bound``); blocks past the real padded length exit at once, having read
the padded length from the device.

Gate/up and the activation are one launch rather than a GEMM plus a SiLU-and-mul kernel: a
program computes the gate and the up columns of the same ``BLOCK_N`` slice (two
accumulators), so the [T*k, 2I] pre-activation never goes to memory (one launch and one
write+read of 2I per pair saved; the FLOPs and weight bytes are the same).

Rounding follows the torch reference (``GatedMLP``): gate and up rounded to the dtype, silu
rounded, the product rounded; the down output rounded, times the routing weight rounded to
the dtype, rounded. The k slots are summed in fp32 and rounded once (the reference's
``index_add_`` rounds after each expert: the two differ by rounding only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block_m(pairs: int) -> int:
    return 16 if pairs <= 768 else 32 if pairs <= 4096 else 128


def padded_bound(pairs: int, num_experts: int, block_m: int) -> int:
    """Length of the sorted list: every non-empty expert pads at most ``block_m - 1`` rows,
    and at most min(E, pairs) experts are non-empty. Rounded up to whole blocks."""
    n = pairs + min(num_experts, pairs) * (block_m - 1)
    return triton.cdiv(n, block_m) * block_m


# ------------------------------------------------------------------ sort by expert (one program)
@triton.jit
def _align_kernel(IDX, SORTED, BLOCK_EXPERT, NUM_PADDED, n, bound, num_blocks,
                  E: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program: counts per expert, padded starts, the expert of each M-block, then each
    pair's slot = its expert's start + its rank among that expert's pairs (stable order; the
    rank within a chunk is a cumulative sum down the [CHUNK, E] one-hot matrix)."""
    e_ar = tl.arange(0, E_P2)
    c_ar = tl.arange(0, CHUNK)
    counts = tl.zeros([E_P2], tl.int32)
    for s in range(0, n, CHUNK):
        ids = tl.load(IDX + s + c_ar, mask=s + c_ar < n, other=E_P2)
        counts += tl.sum((ids[:, None] == e_ar[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(NUM_PADDED, tl.sum(padded, axis=0))
    for s in range(0, bound, CHUNK):
        tl.store(SORTED + s + c_ar, n, mask=s + c_ar < bound)
    for b0 in range(0, num_blocks, CHUNK):
        b = b0 + c_ar
        # experts whose padded run ends at or before this block's start = this block's expert
        e_of = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(BLOCK_EXPERT + b, tl.minimum(e_of, E - 1), mask=b < num_blocks)
    tl.debug_barrier()  # the sentinel fill above must land before the scatter below
    offs = ends - padded
    for s in range(0, n, CHUNK):
        i = s + c_ar
        ids = tl.load(IDX + i, mask=i < n, other=E_P2)
        onehot = (ids[:, None] == e_ar[None, :]).to(tl.int32)
        # slot = expert's running offset + pairs of that expert earlier in this chunk
        slot = tl.sum(onehot * (offs[None, :] + tl.cumsum(onehot, axis=0) - 1), axis=1)
        tl.store(SORTED + slot, i, mask=i < n)
        offs += tl.sum(onehot, axis=0)


def align_torch(idx: torch.Tensor, num_experts: int, block_m: int):
    """The sort in torch ops (no host sync either): used for large T*k, where one program
    would loop too long, and as the test oracle of ``_align_kernel`` (same stable order)."""
    flat = idx.reshape(-1).to(torch.int64)
    n, dev = flat.numel(), flat.device
    bound = padded_bound(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    first = counts.cumsum(0) - counts
    dest = (ends - padded)[e_sorted] + torch.arange(n, device=dev) - first[e_sorted]
    sorted_ids = torch.full((bound,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(0, bound, block_m, device=dev)
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


def align(idx: torch.Tensor, num_experts: int, block_m: int):
    """(sorted pair ids [bound] int32, padding = T*k; expert of each M-block [bound/BLOCK_M]
    int32; padded length [1] int32) for expert ids ``idx`` [T, k]."""
    n = idx.numel()
    if n > 4096:
        return align_torch(idx, num_experts, block_m)
    bound = padded_bound(n, num_experts, block_m)
    dev = idx.device
    sorted_ids = torch.empty(bound, dtype=torch.int32, device=dev)
    block_expert = torch.empty(bound // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    e_p2 = triton.next_power_of_2(num_experts)
    # small chunks for small batches (batch 1: 8 us with 256, 4 us with 64 on the H200, run 4)
    chunk = max(16, min(256, 16384 // e_p2, triton.next_power_of_2(n)))
    _align_kernel[(1,)](idx.reshape(-1).contiguous(), sorted_ids, block_expert, num_padded, n, bound,
                        bound // block_m, E=num_experts, E_P2=e_p2, BLOCK_M=block_m,
                        CHUNK=chunk, num_warps=4 if chunk <= 64 else 8)
    return sorted_ids, block_expert, num_padded


# ------------------------------------------------------------------ grouped GEMM
@triton.jit
def _moe_gemm_kernel(A, B, C, WT, SORTED, BLOCK_EXPERT, NUM_PADDED, n_valid, N, K,
                     stride_am, stride_be, stride_bn, stride_cm,
                     A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[pair, n] for the pairs of M-block ``program_id(0)``: A's row is pair // A_DIV, B is
    the block's expert's [N(, +N for up), K] weight. GATED: silu(x Wg^T) * (x Wu^T)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NUM_PADDED):
        return
    rows = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < n_valid
    e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptr = A + (rows // A_DIV).to(tl.int64)[:, None] * stride_am + k[None, :]
    b_ptr = B + e * stride_be + n[None, :] * stride_bn + k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + k < K
        a = tl.load(a_ptr, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if GATED:
            u = tl.load(b_ptr + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(a, u, acc_u)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    dt = C.dtype.element_ty
    if GATED:
        g = acc.to(dt).to(tl.float32)
        out = ((g * tl.sigmoid(g)).to(dt).to(tl.float32) * acc_u.to(dt).to(tl.float32)).to(dt)
    else:
        out = acc.to(dt)
        if MUL_WEIGHT:
            w = tl.load(WT + rows, mask=valid, other=0.0).to(dt).to(tl.float32)
            out = (out.to(tl.float32) * w[:, None]).to(dt)
    tl.store(C + rows.to(tl.int64)[:, None] * stride_cm + n[None, :], out, mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _sum_kernel(Y, S, OUT, H, TOP_K: tl.constexpr, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[t] = round(sum_j Y[t*k + j]) (+ S[t], then rounded again): the top-k sum of one
    token, plus the shared experts' output the way ``out + shared(x)`` adds it."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = h < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(Y + (t * TOP_K + j) * H + h, mask=ok, other=0.0).to(tl.float32)
    out = acc.to(OUT.dtype.element_ty)
    if HAS_S:
        out = (out.to(tl.float32) + tl.load(S + t * H + h, mask=ok, other=0.0).to(tl.float32)).to(out.dtype)
    tl.store(OUT + t * H + h, out, mask=ok)


def _config(pairs: int) -> dict:
    """Tile sizes by T*k, a host int fixed per captured graph. H200 sweep at the V2-Lite
    widths (run 3, gpu.md): BLOCK_M 16 up to 128 tokens, 32 at 256, 128 for prefill."""
    if pairs <= 768:  # decode up to batch 128: memory-bound, a few pairs per expert
        return dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    if pairs <= 4096:
        return dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _gemm(a, b, c, weights, sorted_ids, block_expert, num_padded, n_valid, N, K, a_div, gated, block_m, cfg):
    grid = (block_expert.numel(), triton.cdiv(N, cfg["BLOCK_N"]))
    wt = c if weights is None else weights  # any pointer when unused
    _moe_gemm_kernel[grid](a, b, c, wt, sorted_ids, block_expert, num_padded, n_valid, N, K, a.stride(0),
                           b.stride(0), b.stride(1), c.stride(0), A_DIV=a_div, GATED=gated,
                           MUL_WEIGHT=weights is not None, IEEE=a.dtype == torch.float32, BLOCK_M=block_m, **cfg)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              idx: torch.Tensor, shared: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = idx[t, j]
    (+ ``shared`` [T, H], added to the rounded sum as ``out + shared`` would be).

    x [T, H]; w13 [E, 2I, H] (gate rows then up rows, as ``GatedMLP.gate_up_proj``); w2
    [E, H, I]; weights [T, k] (any float dtype); idx [T, k] expert ids. Returns [T, H] in
    x's dtype. Weight matrices must have unit stride along their last dim. ``config``
    overrides the tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; for benchmarks)."""
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter, k = two_i // 2, idx.shape[1]
    pairs = T * k
    if pairs == 0:
        return torch.zeros_like(x) if shared is None else shared.clone()
    cfg = {**_config(pairs), "BLOCK_M": _block_m(pairs), **(config or {})}
    block_m = cfg.pop("BLOCK_M")
    sorted_ids, block_expert, num_padded = align(idx, E, block_m)
    x = x.contiguous()
    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    _gemm(x, w13, act, None, sorted_ids, block_expert, num_padded, pairs, inter, H, k, True, block_m, cfg)
    y = torch.empty(pairs, H, dtype=x.dtype, device=x.device)
    _gemm(act, w2, y, weights.reshape(-1).contiguous(), sorted_ids, block_expert, num_padded, pairs, H, inter,
          1, False, block_m, cfg)
    out = torch.empty_like(x)
    has_s = shared is not None
    s = shared.contiguous() if has_s else out
    _sum_kernel[(T, triton.cdiv(H, 1024))](y, s, out, H, TOP_K=k, HAS_S=has_s, BLOCK=1024, num_warps=4)
    return out
