"""The MLA decode kernel over bf16, int8 and int4 latent pages at DeepSeek-V2-Lite's shape (CUDA).

    PYTHONPATH=. python3 benchmarks/mla_packed_bench.py [--out results.jsonl]

For each (batch, context) and cache format: microseconds per launch (CUDA-graph replay), the
share of the copy rate measured in the same process over the bytes the kernel must read (the
latent pages, scales included), and the output's relative error against an fp32 torch
computation over the same stored rows.
"""

from __future__ import annotations

import argparse
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
from qkv.tools.bench_rates import measure  # noqa: E402

H, R, P, BS = 16, 512, 64, 16


def one(B: int, ctx: int, fmt: str, copy_rate: float) -> dict:
    dev = torch.device("cuda")
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
        stored = rows.float()
        nbytes = B * ctx * (R + P) * 2
        fn = lambda: mla_decode(ql, qr, cache, table, nc, scale)  # noqa: E731
    else:
        spec = MLA(R, P, 1, packed=resolve(fmt, None, None, torch.bfloat16)[1])
        cache = kv_pages.new_cache(spec, nb, BS, torch.uint8, dev)
        write_latent(cache, rows, R, slots)
        stored = kv_pages.read(cache, 0, slots, torch.float32)[:, 0]
        nbytes = B * ctx * spec.bytes_per_token
        fn = lambda: mla_decode(ql, qr, cache, table, nc, scale)  # noqa: E731
    out = fn()
    # fp32 oracle over the stored rows
    keys = stored.view(nb, BS, R + P)[table.long()].view(B, -1, R + P)[:, :ctx]
    s = (torch.einsum("bhr,bnr->bhn", ql.float(), keys[..., :R]) + torch.einsum("bhp,bnp->bhn", qr.float(), keys[..., R:]))
    ref = torch.einsum("bhn,bnr->bhr", (s * scale).softmax(-1), keys[..., :R])
    err = ((out.float() - ref).norm() / ref.norm()).item()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    us = triton.testing.do_bench(graph.replay, warmup=25, rep=200) * 1e3
    return dict(batch=B, ctx=ctx, format=fmt, us=round(us, 1), bytes=nbytes,
                copy_share=round(nbytes / (us * 1e-6) / copy_rate, 4), rel_err=err)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rate = measure(torch.device("cuda"))["copy_Bps"]
    print(json.dumps({"copy_GBps": rate / 1e9}), flush=True)
    for B, ctx in ((64, 8192), (1, 8192), (128, 640)):
        for fmt in ("bf16", "int8", "int4"):
            r = one(B, ctx, fmt, rate)
            print(json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
