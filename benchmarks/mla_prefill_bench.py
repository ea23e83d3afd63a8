"""MLA prefill on the GPU: up-projected (the Triton path) vs absorbed vs the reference, per step.

    PYTHONPATH=. python benchmarks/mla_prefill_bench.py [--out DIR] [--cache bf16,fp8]
    PYTHONPATH=.:/work/triton-site TRITON_INTERPRET=1 python benchmarks/mla_prefill_bench.py --dry-run  # CPU check

DeepSeek-V2-Lite's heads (16, latent 512 + 64, 128 | 128), bf16 activations, one layer. For
each step shape it times, on the same pages:
  - ``up``: ``mla_step.mla_extend`` (write, up-project the keys, causal flash attention);
  - ``absorbed``: every query as a decode over its causal prefix (``mla.mla_decode`` with one
    pseudo-sequence per query row: the absorbed kernel run as an absorbed prefill would run it,
    W_UK folded into the queries, W_UV into the outputs);
  - ``reference``: ``mla_reference`` (fp32, quadratic scores), where it fits.
Appends JSON records to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os

import time

import torch

H, R, P, DN, DV, BS = 16, 512, 64, 128, 128, 16
DEV = "cuda"
# (cached prefix, new tokens) per sequence
SHAPES = {"16x512 prompts": ([0] * 16, [512] * 16), "1x2048 prompt": ([0], [2048]),
          "2048 chunk after 6144": ([6144], [2048])}


def make(computed, qlens, cache_dtype, gen):
    from qkv.attention.batch import AttentionBatch

    dev = DEV
    tables, slots, nb = [], [], 0
    for c, q in zip(computed, qlens):
        n = -(-(c + q) // BS)
        tables.append(list(range(nb, nb + n)))
        slots += [tables[-1][p // BS] * BS + p % BS for p in range(c, c + q)]
        nb += n
    width = max(map(len, tables))
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
    qsl = [0]
    for q in qlens:
        qsl.append(qsl[-1] + q)
    batch = AttentionBatch(query_start_loc=t(qsl), num_computed=t(computed), query_lens=t(qlens),
                           max_query_len=max(qlens), max_seq_len=max(c + q for c, q in zip(computed, qlens)),
                           block_size=BS, block_tables=[t([x + [0] * (width - len(x)) for x in tables])],
                           slot_mappings=[t(slots)], ring_blocks=[None])
    batch.scratch["host_lens"] = (list(qlens), list(computed))
    cache = (torch.randn(nb, BS, R + P, device=dev) * 0.5).to(cache_dtype)
    return batch, cache


def timed(fn, iters=10) -> float:
    fn()
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[iters // 2]


def main() -> None:
    from qkv.attention.mla_reference import mla_paged_attention as reference
    from qkv.attention.triton.mla import mla_decode
    from qkv.attention.triton.mla_step import mla_extend

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cache", default="bf16,fp8")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    args = ap.parse_args()
    global DEV, H, R, P, DN, DV, SHAPES
    if args.dry_run:
        DEV, H, R, P, DN, DV = "cpu", 2, 32, 16, 16, 16
        SHAPES = {"2x24": ([0, 0], [24, 24]), "chunk": ([40], [24])}
    gen = torch.Generator(device=DEV).manual_seed(0)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    scale = (DN + P) ** -0.5
    w = torch.randn(H, DN + DV, R, device=DEV, dtype=dt, generator=gen) / R ** 0.5
    w_uk, w_uv = w[:, :DN], w[:, DN:]
    recs = []
    for cname in args.cache.split(","):
        cdt = torch.float8_e4m3fn if cname == "fp8" else dt
        for label, (computed, qlens) in SHAPES.items():
            batch, cache = make(computed, qlens, cdt, gen)
            T = sum(qlens)
            rnd = lambda *s: torch.randn(*s, device=DEV, dtype=dt, generator=gen)  # noqa: E731
            qn, qp, ckv, kpe = rnd(T, H, DN), rnd(T, H, P), rnd(T, R), rnd(T, P)
            up = lambda: mla_extend(qn, qp, ckv, kpe, cache, batch, 0, scale, w_uk, w_uv)  # noqa: E731
            # Absorbed: query row t of sequence b is a decode at position computed[b] + i.
            seq = torch.repeat_interleave(torch.arange(len(qlens), device=DEV), torch.tensor(qlens, device=DEV))
            pos = torch.cat([torch.arange(c, c + q, device=DEV) for c, q in zip(computed, qlens)])
            tables = batch.block_tables[0][seq]

            def absorbed():
                q_lat = torch.einsum("thd,hdr->thr", qn, w_uk)
                o = mla_decode(q_lat, qp, cache, tables, pos, scale)
                return torch.einsum("thr,hvr->thv", o, w_uv)

            ms_up, ms_abs = timed(up), timed(absorbed)
            err = ((up().float() - absorbed().float()).norm() / absorbed().float().norm()).item()
            pairs = sum(q * c + q * (q + 1) / 2 for c, q in zip(computed, qlens))
            keys = sum(c + q for c, q in zip(computed, qlens))
            fl_up = 2 * H * pairs * (DN + P + DV) + 2 * keys * R * H * (DN + DV)
            fl_abs = 2 * H * pairs * (2 * R + P) + 2 * T * H * R * (DN + DV)
            rec = dict(name="mla_prefill", cache=cname, step=label, tokens=T, up_ms=ms_up, absorbed_ms=ms_abs,
                       up_tflops=fl_up / ms_up / 1e9, absorbed_tflops=fl_abs / ms_abs / 1e9,
                       up_gflop=fl_up / 1e9, absorbed_gflop=fl_abs / 1e9, up_vs_absorbed_rel_err=err)
            if T <= 8192 and max(qlens) <= 2048:
                rec["reference_ms"] = timed(lambda: reference(qn, qp, ckv, kpe, cache, batch, 0, scale, w_uk, w_uv,
                                                              True), iters=3)
            print(json.dumps(rec), flush=True)
            recs.append(rec)
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
