"""The MLA decode kernel over bf16, int8 and int4 latent pages at DeepSeek-V2-Lite's shape (CUDA).

    PYTHONPATH=. python3 benchmarks/mla_packed_bench.py [--out results.jsonl]
    PYTHONPATH=. python3 benchmarks/mla_packed_bench.py --sweep 1 --workers 12 --out results.jsonl

For each (batch, context) and cache format: microseconds per launch (CUDA-graph replay), the
share of the copy rate measured in the same process over the bytes the kernel must read (the
latent pages, scales included), and the output's relative error against an fp32 torch
computation over the same stored rows. ``--sweep N`` times the packed kernel's tilings and
variants (``mla_packed.VARIANT``) of sweep N beside the bf16 kernel's default, compiling them
first in ``--workers`` processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qkv.attention.triton.mla import mla_decode  # noqa: E402
from qkv.attention.triton.mla_packed import write_latent  # noqa: E402
from qkv.kvcache import kv_pages  # noqa: E402
from qkv.kvcache.kv_int import resolve  # noqa: E402
from qkv.kvcache.spec import MLA  # noqa: E402

H, R, P, BS = 16, 512, 64, 16
SHAPES = ((64, 8192), (1, 8192), (128, 640))
DEV = torch.device("cuda")


def data(B: int, ctx: int, fmt: str, ref: bool = True):
    """(call(**kw) -> output, the fp32 reference output or None, bytes the kernel must read)."""
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    nb = B * (ctx // BS + 1)
    rows = torch.randn(nb * BS, R + P, device=dev, generator=g, dtype=torch.bfloat16)
    table = torch.randperm(nb, device=dev, generator=g).view(B, -1).to(torch.int32)
    nc = torch.full((B,), ctx - 1, device=dev, dtype=torch.int64)
    ql = torch.randn(B, H, R, device=dev, generator=g, dtype=torch.bfloat16)
    qr = torch.randn(B, H, P, device=dev, generator=g, dtype=torch.bfloat16)
    scale = (128 + P) ** -0.5
    slots = torch.arange(nb * BS, device=dev)
    if fmt == "bf16":
        cache = rows.view(nb, BS, R + P).clone()
        stored = rows.float() if ref else None
        nbytes = B * ctx * (R + P) * 2
    else:
        spec = MLA(R, P, 1, packed=resolve(fmt, None, None, torch.bfloat16)[1])
        cache = kv_pages.new_cache(spec, nb, BS, torch.uint8, dev)
        write_latent(cache, rows, R, slots)
        stored = kv_pages.read(cache, 0, slots, torch.float32)[:, 0] if ref else None
        nbytes = B * ctx * spec.bytes_per_token
    del rows
    out = None
    if ref:  # fp32 oracle over the stored rows
        keys = stored.view(nb, BS, R + P)[table.long()].view(B, -1, R + P)[:, :ctx]
        s = (torch.einsum("bhr,bnr->bhn", ql.float(), keys[..., :R])
             + torch.einsum("bhp,bnp->bhn", qr.float(), keys[..., R:]))
        out = torch.einsum("bhn,bnr->bhr", (s * scale).softmax(-1), keys[..., :R])
        del keys, s, stored
    return (lambda **kw: mla_decode(ql, qr, cache, table, nc, scale, **kw)), out, nbytes


def time_one(call, ref, nbytes: int, copy_rate: float, kw: dict) -> dict:
    try:
        out = call(**kw)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(**kw)
        us = triton.testing.do_bench(graph.replay, warmup=10, rep=40) * 1e3
        return dict(us=round(us, 1), copy_share=round(nbytes / (us * 1e-6) / copy_rate, 4), rel_err=err)
    except Exception as e:  # a variant that does not compile (registers, shared memory) or fails
        return dict(error=f"{type(e).__name__}: {str(e)[:200]}")


def grid(sweep: int) -> list[tuple[int, int, str, dict]]:
    """(batch, context, format, mla_decode keywords) of sweep ``sweep``."""
    out = []

    def add(B, ctx, fmt, bn, nw, ns=1, S=None, **variant):
        kw = dict(block_n=bn, num_warps=nw, num_stages=ns, variant=dict(prefetch=1, rows_on_m=1, f16=0, chunks=1) | variant)
        out.append((B, ctx, fmt, kw | ({"splits": S} if S else {})))

    if sweep == 1:
        for fmt in ("int4", "int8"):
            for bn, nw, pf in itertools.product((16, 32), (4, 8), (1, 0)):
                add(64, 8192, fmt, bn, nw, prefetch=pf)
            for bn in (16, 32):
                add(64, 8192, fmt, bn, 4, prefetch=2)
                add(64, 8192, fmt, bn, 4, rows_on_m=0)
            for pf in (1, 0):
                add(64, 8192, fmt, 16, 4, ns=3, prefetch=pf)
            for S in (8, 16):
                add(64, 8192, fmt, 16, 4, S=S)
            add(64, 8192, fmt, 32, 4, S=8, prefetch=2)
            add(64, 8192, fmt, 64, 8)
            if fmt == "int8":
                for bn, pf in itertools.product((16, 32), (1, 2)):
                    add(64, 8192, fmt, bn, 4, prefetch=pf, f16=1)
            for B, ctx in SHAPES[1:]:
                for bn in (16, 32):
                    add(B, ctx, fmt, bn, 4)
                add(B, ctx, fmt, 16, 4, prefetch=2)
                for S in ((32, 128) if B == 1 else (2,)):
                    add(B, ctx, fmt, 16, 4, S=S)
                if fmt == "int8":
                    add(B, ctx, fmt, 16, 4, f16=1)
    if sweep == 2:  # after sweep 1: 32-row tiles on 4 warps, one stage; chunked latent dots
        for fmt in ("int4", "int8"):
            for bn, pf, rm, ch in itertools.product((32, 64), (1, 2), (1, 0), (1, 2, 4)):
                if bn == 32 or pf == 1:
                    add(64, 8192, fmt, bn, 4, prefetch=pf, rows_on_m=rm, chunks=ch, f16=int(fmt == "int8"))
            for bn, ch in ((64, 1), (64, 4), (32, 4)):  # 8 warps, heads on M: no warp repeats an MMA
                add(64, 8192, fmt, bn, 8, rows_on_m=0, chunks=ch, f16=int(fmt == "int8"))
            if fmt == "int8":
                for rm, ch in itertools.product((1, 0), (1, 4)):
                    add(64, 8192, fmt, 32, 4, rows_on_m=rm, chunks=ch)
            for B, ctx in SHAPES[1:]:
                for bn, rm, ch in itertools.product((16, 32), (1, 0), (1, 4)):
                    add(B, ctx, fmt, bn, 4, rows_on_m=rm, chunks=ch, f16=int(fmt == "int8"))
                add(B, ctx, fmt, 32, 4, S=2 if B > 1 else 32, rows_on_m=0, chunks=4, f16=int(fmt == "int8"))
                if fmt == "int8":
                    add(B, ctx, fmt, 32, 4, rows_on_m=0, chunks=4)
    return out


def label(kw: dict) -> str:
    v = kw.get("variant", {})
    return (f"S{kw.get('splits', '-')} n{kw['block_n']} w{kw['num_warps']} st{kw['num_stages']} "
            f"pf{v.get('prefetch')} rm{v.get('rows_on_m')} h{v.get('f16')} c{v.get('chunks', 1)}")


def _compile(jobs: list) -> None:
    """Compile (one launch at a tiny size, same constexprs) so the timing process hits the cache."""
    cache = {}
    for B, ctx, fmt, kw in jobs:
        key = (min(B, 128), fmt)
        if key not in cache:
            cache[key] = data(key[0], 256, fmt, ref=False)[0]
        try:
            cache[key](**kw)
        except Exception:  # reported by the timing process
            pass
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: variants left after it are skipped")
    ap.add_argument("--top", type=int, default=0, help="print only the N fastest variants of each shape (all to stderr)")
    args = ap.parse_args()

    def emit(r):
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    from qkv.tools.bench_rates import measure

    if not args.sweep:
        rate = measure(torch.device("cuda"))["copy_Bps"]
        print(json.dumps({"copy_GBps": rate / 1e9}), flush=True)
        for B, ctx in SHAPES:
            for fmt in ("bf16", "int8", "int4"):
                call, ref, nbytes = data(B, ctx, fmt)
                r = dict(batch=B, ctx=ctx, format=fmt, bytes=nbytes, **time_one(call, ref, nbytes, rate, {}))
                print(json.dumps(r), flush=True)
                emit(r)
        return
    import time

    t0 = time.time()
    jobs = grid(args.sweep)
    if args.workers > 1:  # 128-row batches compile the one-split kernels (S=1 writes the output)
        import multiprocessing as mp

        chunks = [jobs[i::args.workers] for i in range(args.workers)]
        with mp.get_context("spawn").Pool(args.workers) as pool:
            pool.map(_compile, chunks)
    rate = measure(torch.device("cuda"))["copy_Bps"]
    print(f"copy {rate / 1e9:.0f} GB/s; {len(jobs)} variants, compiled in {time.time() - t0:.0f} s", flush=True)
    timed = set()
    for (B, ctx, fmt), group in itertools.groupby(jobs, key=lambda j: j[:3]):
        if (B, ctx) not in timed:  # the bf16 kernel's default, the peer
            timed.add((B, ctx))
            base = time_one(*data(B, ctx, "bf16")[:2], B * ctx * (R + P) * 2, rate, {})
            print(f"{B}x{ctx} bf16 default: {base.get('us')} us {100 * base.get('copy_share', 0):.1f}%", flush=True)
            emit(dict(batch=B, ctx=ctx, format="bf16", **base))
            torch.cuda.empty_cache()
        call, ref, nbytes = data(B, ctx, fmt)
        lines = []
        for *_, kw in group:
            if time.time() - t0 > args.budget:
                lines.append((2e9, f"{B}x{ctx} {fmt} {label(kw)}: skipped (budget)"))
                continue
            r = time_one(call, ref, nbytes, rate, kw)
            tail = (f"{r['us']} us {100 * r['copy_share']:.1f}% err {r['rel_err']:.1e}" if "us" in r
                    else r["error"][:160])
            lines.append((r.get("us", 1e9), f"{B}x{ctx} {fmt} {label(kw)}: {tail}"))
            print(lines[-1][1], file=sys.stderr if args.top else sys.stdout, flush=True)
            emit(dict(batch=B, ctx=ctx, format=fmt, bytes=nbytes, **{k: v for k, v in kw.items() if k != "variant"},
                      **kw.get("variant", {}), **r))
        for _, line in sorted(lines)[:args.top]:  # the fastest, and the failures' count
            print(line, flush=True)
        for code, what in ((1e9, "failed (see the log)"), (2e9, "skipped (budget)")):
            if args.top and any(u == code for u, _ in lines):
                print(f"  {sum(u == code for u, _ in lines)} {what}", flush=True)
        del call, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
