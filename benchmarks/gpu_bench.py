"""GPU measurements for issue 6, all in one process: ceilings, kernels, engine end to end.

    PYTHONPATH=. python benchmarks/gpu_bench.py --out $OUT [--sections ceil,kernels,engine,...]

Prints a table at the end and appends JSON records to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

RESULTS = []


def record(name, **kw):
    kw["name"] = name
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def bench_graph(fn, iters=50):
    """Median ms of fn replayed through a CUDA graph (launch gaps removed)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def ceilings():
    from qkv.tools.bench_rates import measure  # the rates `qkv bench` holds its rooflines against

    rates = measure(torch.device("cuda"))
    bw, flops = rates["copy_Bps"], rates["matmul_flops"]  # bytes/s (read + write), FLOP/s
    w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    ms3 = bench_graph(lambda: torch.nn.functional.linear(v, w))
    record("ceilings", copy_TBps=bw / 1e12, bf16_TFLOPs=flops / 1e12, gemv_4096_us=ms3 * 1e3,
           gemv_4096_frac=(4096 * 4096 * 2 / (ms3 / 1e3)) / bw)
    return bw, flops


def kernels(bw, which=("decode", "gemv", "mla")):
    from qkv.attention.triton.decode import paged_decode
    from qkv.attention.triton.mla import mla_decode

    bs = 16
    cases = [(B, ctx, torch.bfloat16) for B, ctx in ((1, 8192), (8, 8192), (32, 8192), (1, 32768), (64, 2048))]
    cases += [(B, ctx, torch.float8_e4m3fn) for B, ctx in ((1, 8192), (8, 8192), (32, 8192), (256, 1024))]
    for B, ctx, cdt in (cases if "decode" in which else ()):
        H, KVH, D = 32, 8, 128
        nblk = B * ctx // bs
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda").to(cdt)
        table = torch.randperm(nblk, device="cuda").view(B, ctx // bs)
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
        nbytes = cache.numel() * cache.element_size()
        best = None
        for block_n, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3), (64, 8, 3)):
            try:
                ms = bench_graph(lambda: paged_decode(q, cache, table, nc, 0.088, max_seq_len=ctx, block_n=block_n,
                                                      num_warps=warps, num_stages=stages))
            except Exception as e:  # a config that does not compile is skipped
                print("config failed", block_n, warps, stages, repr(e)[:200])
                continue
            frac = nbytes / (ms / 1e3) / bw
            if best is None or frac > best[0]:
                best = (frac, ms, block_n, warps, stages)
        record("decode_kernel", B=B, ctx=ctx, kv_dtype=str(cdt).split(".")[-1], us=best[1] * 1e3, bw_frac=best[0], GBps=nbytes / best[1] / 1e6,
               config=best[2:])
        del cache
    # bf16 cache: the keys-on-M layout (built for fp8) against the default, batch 1-32 at 8k
    for B, ctx in (((1, 8192), (8, 8192), (32, 8192), (64, 2048)) if "layout" in which else ()):
        H, KVH, D = 32, 8, 128
        nblk = B * ctx // bs
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda")
        table = torch.randperm(nblk, device="cuda").view(B, ctx // bs)
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
        ref = paged_decode(q, cache, table, nc, 0.088, max_seq_len=ctx)
        row = {}
        for kom in (False, True):
            for block_n, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (32, 4, 3)):
                key = f"{'keysM' if kom else 'default'}/N{block_n}/w{warps}/s{stages}"
                try:
                    fn = lambda: paged_decode(q, cache, table, nc, 0.088, max_seq_len=ctx, block_n=block_n,  # noqa: E731
                                              num_warps=warps, num_stages=stages, keys_on_m=kom)
                    err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
                    row[key] = round(cache.numel() * 2 / (bench_graph(fn) / 1e3) / bw, 3) if err < 2e-2 else "wrong"
                except Exception as e:
                    row[key] = f"failed {type(e).__name__}"
        best = max((k for k in row if isinstance(row[k], float)), key=row.get)
        record("decode_layout_bf16", B=B, ctx=ctx, best=best, bw_frac=row)
        del cache
    # fp8 cache: stage and tile sweep of the keys-on-M kernel
    for B, ctx in (((32, 8192), (256, 1024)) if "layout" in which else ()):
        H, KVH, D = 32, 8, 128
        nblk = B * ctx // bs
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda").to(torch.float8_e4m3fn)
        table = torch.randperm(nblk, device="cuda").view(B, ctx // bs)
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
        row = {}
        for block_n, warps, stages in ((128, 4, 2), (128, 4, 3), (128, 4, 4), (256, 4, 2), (128, 2, 2), (64, 2, 3)):
            try:
                ms = bench_graph(lambda: paged_decode(q, cache, table, nc, 0.088, max_seq_len=ctx, block_n=block_n,
                                                      num_warps=warps, num_stages=stages))
                row[f"N{block_n}/w{warps}/s{stages}"] = round(cache.numel() / (ms / 1e3) / bw, 3)
            except Exception as e:
                row[f"N{block_n}/w{warps}/s{stages}"] = f"failed {type(e).__name__}"
        best = max((k for k in row if isinstance(row[k], float)), key=row.get)
        record("decode_layout_fp8", B=B, ctx=ctx, best=best, bw_frac=row)
        del cache
    # fp8 cache: which tile shape and dot dtype (bf16 or fp16: e4m3 widens to fp16 in one cvt)
    for B, ctx in (((1, 8192), (32, 8192), (256, 1024)) if "fp8sweep" in which else ()):
        H, KVH, D = 32, 8, 128
        nblk = B * ctx // bs
        cache = torch.randn(2, nblk, bs, KVH, D, dtype=torch.bfloat16, device="cuda").to(torch.float8_e4m3fn)
        table = torch.randperm(nblk, device="cuda").view(B, ctx // bs)
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
        nbytes = cache.numel()
        row = {}
        for dd in (torch.bfloat16, torch.float16):
            for block_n, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2), (256, 8, 3), (128, 4, 4)):
                try:
                    ms = bench_graph(lambda: paged_decode(q, cache, table, nc, 0.088, max_seq_len=ctx, block_n=block_n,
                                                          num_warps=warps, num_stages=stages, dot_dtype=dd))
                except Exception as e:
                    print("fp8 config failed", block_n, warps, stages, repr(e)[:200])
                    continue
                row[f"{str(dd)[6:]}/N{block_n}/w{warps}/s{stages}"] = round(nbytes / (ms / 1e3) / bw, 3)
        best = max(row, key=row.get)
        record("decode_fp8_sweep", B=B, ctx=ctx, bw_frac=row, best=best)
        del cache
    from qkv.attention.triton.gemv import gemv

    for N, K in (((4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (128256, 4096)) if "gemv" in which else ()):
        ws = [torch.randn(N, K, dtype=torch.bfloat16, device="cuda") for _ in range(max(1, 600_000_000 // (N * K * 2)))]
        x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        it = [0]

        def nxt():
            it[0] = (it[0] + 1) % len(ws)
            return ws[it[0]]
        cub = bench_graph(lambda: [torch.nn.functional.linear(x, w) for w in ws]) / len(ws)
        best = None
        for bn, bk, warps, stages in ((16, 512, 4, 3), (8, 512, 4, 3), (16, 256, 4, 4), (32, 256, 8, 3), (8, 1024, 8, 2),
                                      (4, 1024, 4, 3)):
            try:
                ms = bench_graph(lambda: [gemv(x, w, bn, bk, warps, stages) for w in ws]) / len(ws)
            except Exception as e:
                print("gemv config failed", bn, bk, repr(e)[:200])
                continue
            if best is None or ms < best[0]:
                best = (ms, bn, bk, warps, stages)
        ref = torch.nn.functional.linear(x, ws[0]).float()
        err = ((gemv(x, ws[0], *best[1:]).float() - ref).norm() / ref.norm()).item()
        record("gemv", N=N, K=K, cublas_us=cub * 1e3, cublas_frac=N * K * 2 / (cub / 1e3) / bw,
               triton_us=best[0] * 1e3, triton_frac=N * K * 2 / (best[0] / 1e3) / bw, config=best[1:], rel_err=err)
        del ws
    for B, ctx in (((1, 8192), (8, 8192), (32, 4096), (64, 8192)) if "mla" in which else ()):
        H, R, P = 16, 512, 64
        nblk = B * ctx // bs
        cache = torch.randn(nblk, bs, R + P, dtype=torch.bfloat16, device="cuda")
        table = torch.randperm(nblk, device="cuda").view(B, ctx // bs)
        nc = torch.full((B,), ctx - 1, dtype=torch.int64, device="cuda")
        ql = torch.randn(B, H, R, dtype=torch.bfloat16, device="cuda")
        qr = torch.randn(B, H, P, dtype=torch.bfloat16, device="cuda")
        nbytes = cache.numel() * 2
        best = None
        for block_n, warps, stages in ((32, 8, 2), (32, 4, 2), (64, 8, 2), (16, 4, 3), (32, 8, 3)):
            try:
                ms = bench_graph(lambda: mla_decode(ql, qr, cache, table, nc, 0.07, block_n=block_n,
                                                    num_warps=warps, num_stages=stages))
            except Exception as e:
                print("mla config failed", block_n, warps, stages, repr(e)[:200])
                continue
            frac = nbytes / (ms / 1e3) / bw
            if best is None or frac > best[0]:
                best = (frac, ms, block_n, warps, stages)
        record("mla_decode_kernel", B=B, ctx=ctx, us=best[1] * 1e3, bw_frac=best[0], config=best[2:])
        del cache
    torch.cuda.empty_cache()


def splits_sweep(bw):
    """Decode/MLA kernel time against the number of splits at batch 1 (latency-bound regime)."""
    from qkv.attention.triton.decode import paged_decode
    from qkv.attention.triton.mla import mla_decode

    bs = 16
    for ctx in (512, 2048, 8192):
        nblk = ctx // bs
        cache = torch.randn(2, nblk, bs, 8, 128, dtype=torch.bfloat16, device="cuda")
        table = torch.randperm(nblk, device="cuda").view(1, -1)
        nc = torch.full((1,), ctx - 1, dtype=torch.int64, device="cuda")
        q = torch.randn(1, 32, 128, dtype=torch.bfloat16, device="cuda")
        row = {}
        for S in (4, 8, 16, 32, 64, 128):
            for bn in (32, 64):
                ms = bench_graph(lambda: paged_decode(q, cache, table, nc, 0.088, splits=S, block_n=bn))
                row[f"S{S}/N{bn}"] = round(ms * 1e3, 2)
        best = min(row, key=row.get)
        record("decode_splits_b1", ctx=ctx, us=row, best=best, bw_frac=cache.numel() * 2 / (row[best] / 1e6) / bw)
        mcache = torch.randn(nblk, bs, 576, dtype=torch.bfloat16, device="cuda")
        ql = torch.randn(1, 16, 512, dtype=torch.bfloat16, device="cuda")
        qr = torch.randn(1, 16, 64, dtype=torch.bfloat16, device="cuda")
        row = {}
        for S in (8, 32, 64, 128):
            for bn in (16, 32):
                ms = bench_graph(lambda: mla_decode(ql, qr, mcache, table, nc, 0.07, splits=S, block_n=bn, num_warps=4))
                row[f"S{S}/N{bn}"] = round(ms * 1e3, 2)
        best = min(row, key=row.get)
        record("mla_splits_b1", ctx=ctx, us=row, best=best, bw_frac=mcache.numel() * 2 / (row[best] / 1e6) / bw)


def moe_kernels(bw, shape="deepseek-v2-lite"):
    """The fused MoE (qkv/attention/triton/moe.py) at a shape's widths, by token count: time of
    one layer's routed experts (sort + two grouped GEMMs + top-k sum, replayed in a graph),
    the bytes of the distinct experts chosen, and a few tile configurations side by side."""
    from qkv.attention.triton import moe
    from qkv.tools.shapes import SHAPES

    ex = SHAPES[shape]["extra"]
    E, k, inter, H = ex["n_routed_experts"], ex["num_experts_per_tok"], ex["moe_intermediate_size"], \
        SHAPES[shape]["hidden_size"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = [torch.randn(E, 2 * inter, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(3)]
    w2 = [torch.randn(E, H, inter, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(3)]
    per_expert = 3 * inter * H * 2
    configs = {"default": None,
               "m16n32k128": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
               "m16n32k256": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
               "m16n64k128w8": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=4),
               "m16n64k64s5": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=5),
               "m32n128k64": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
               "m16n64k256": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3),
               "m16n128k128": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
               "m32n64k64": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
               "m64n64k64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
               "m64n128k64": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
               "m128n128k64": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
               "m128n128k64s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
               "m64n128k64w4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
               "m128n64k64": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)}
    for T in (1, 4, 16, 64, 128, 256, 2048, 8192):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(T)])
        w = torch.rand(T, k, device="cuda")
        distinct = int(idx.unique().numel())
        nbytes = distinct * per_expert + T * H * 2 * 2
        row = {}
        for name, cfg in configs.items():
            if cfg is not None and ((T * k > 4096 and cfg["BLOCK_M"] < 64) or (T <= 16 and cfg["BLOCK_M"] > 32)):
                continue
            try:  # three weight copies (3 x 1.1 GB) in turn, far past the 60 MB L2
                ms = bench_graph(lambda: [moe.fused_moe(x, w13[j], w2[j], w, idx, config=cfg) for j in range(3)]) / 3
                row[name] = round(ms * 1e3, 1)
            except Exception as e:  # a tile that does not compile here (shared memory)
                row[name] = repr(e)[:60]
        best = min((v for v in row.values() if isinstance(v, float)), default=float("nan"))
        record("moe_kernel", shape=shape, tokens=T, experts_read=distinct, us=row, best_us=best,
               bw_frac=nbytes / (best / 1e6) / bw, flops_TF=2 * T * k * per_expert / 2 / (best / 1e6) / 1e12)
    del w13, w2
    torch.cuda.empty_cache()


def host_overhead(eng, prompt, greedy):
    """Step wall time against the bare graph replay, at batch 1 and 256."""
    for B in (1, 256):
        reqs = []
        for _ in range(B):
            reqs += eng.add_request(prompt(512), greedy(64))
        while any(r.num_computed_tokens < 512 for r in reqs):
            eng.step()
        steps = []
        for _ in range(20):
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
        size = next(s for s in eng.runner.graphs.sizes if s >= B)
        g = eng.runner.graphs.graphs[size]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()
        replay = (time.perf_counter() - t) / 20
        while eng.has_unfinished():
            eng.step()
        step = sorted(steps)[10]
        record("host_overhead", batch=B, step_ms=step * 1e3, replay_ms=replay * 1e3, host_ms=(step - replay) * 1e3)


def engine_bench(bw, flops, args):
    from qkv.engine.request import SamplingParams
    from qkv.tools.shapes import random_engine

    t0 = time.perf_counter()
    eng = random_engine(args.shape, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=4096, enforce_eager=args.eager, gpu_memory_utilization=0.9,
                        kv_dtype=args.kv_dtype, quantization=None if args.quantization == "none" else args.quantization,
                        **({} if args.async_scheduling is None else
                                                   dict(async_scheduling=args.async_scheduling == "on")))
    t_build = time.perf_counter() - t0
    V = eng.config.vocab_size
    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(10, V) for _ in range(n)]  # noqa: E731
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    eng.add_request(prompt(8), greedy(1))
    while eng.has_unfinished():
        eng.step()
    torch.cuda.synchronize()
    record("startup", shape=args.shape, build_s=t_build, first_token_s=time.perf_counter() - t0, eager=args.eager)

    params = sum(p.numel() * p.element_size() for n, p in eng.model.named_parameters() if "embed_tokens" not in n)
    fp8_weights = [b for n, b in eng.model.named_buffers() if n.endswith("weight_fp8")]  # --quantization fp8
    params += sum(b.numel() for b in fp8_weights)
    n_weights = sum(p.numel() for n, p in eng.model.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
    n_weights += sum(b.numel() for b in fp8_weights)
    parts = set(args.parts.split(","))
    if "host" in parts:
        host_overhead(eng, prompt, greedy)
    if args.host_only:
        return
    kv_tok = sum(s.bytes_per_token for s in eng.specs)

    # 2k prefill: one step of 2048 tokens.
    for n in ((2048, 512) if "prefill" in parts else ()):
        times = []
        for _ in range(5):
            eng.kv.enable_prefix_caching = False
            eng.add_request(prompt(n), greedy(1))
            torch.cuda.synchronize()
            t = time.perf_counter()
            eng.step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            while eng.has_unfinished():
                eng.step()
        ms = sorted(times)[len(times) // 2] * 1e3
        fl = 2 * n_weights * n  # 2 FLOPs per weight per token
        record("prefill", tokens=n, ms=ms, flops_frac=fl / (ms / 1e3) / flops)
    eng.kv.enable_prefix_caching = True

    # Batch-1 decode latency: 8- and 512-token prompts, 200 new tokens (prefill included, like gpt-fast).
    def decode_b1(tag):
        for plen in (8, 512):
            runs = []
            for _ in range(3):
                eng.add_request(prompt(plen), greedy(200))
                torch.cuda.synchronize()
                t = time.perf_counter()
                eng.step()
                t1 = time.perf_counter()
                steps = []
                while eng.has_unfinished():
                    s = time.perf_counter()
                    eng.step()
                    steps.append(time.perf_counter() - s)
                total = time.perf_counter() - t
                runs.append((200 / total, 199 / (total - (t1 - t)), sorted(steps)))
            best = sorted(runs)[1]
            st = best[2]
            step_ms = st[len(st) // 2] * 1e3
            bytes_step = params + kv_tok * (plen + 100)
            record("decode_b1", variant=tag, prompt=plen, tok_s_incl_prefill=best[0], tok_s_decode=best[1],
                   step_p50_ms=step_ms, step_p99_ms=st[int(len(st) * 0.99)] * 1e3,
                   bw_frac=bytes_step / (step_ms / 1e3) / bw, roofline_tok_s=bw / bytes_step)

    from qkv.attention.triton import gemv as gemv_mod

    if "b1" not in parts:
        decode_b1 = lambda tag: None  # noqa: E731
    decode_b1("default (Triton GEMV for " + ",".join(f"{n}x{k}" for n, k in sorted(gemv_mod.ENABLED_SHAPES)) + ")")
    if "b1" in parts and "gemv_ab" in parts:
        saved = set(gemv_mod.ENABLED_SHAPES)
        gemv_mod.ENABLED_SHAPES.clear()
        eng.runner.graphs.capture()
        decode_b1("cuBLAS only")
        gemv_mod.ENABLED_SHAPES.update(saved)
        eng.runner.graphs.capture()
    if args.eager_too:
        graphs, eng.runner.graphs = eng.runner.graphs, None
        decode_b1("eager (no CUDA graphs)")
        eng.runner.graphs = graphs

    # Decode throughput against batch size (steady state: 512-token prompts, 128 new tokens).
    for B in ((1, 4, 16, 64, 128, 256) if "sweep" in parts else ()):
        reqs = []
        for _ in range(B):
            reqs += eng.add_request(prompt(512), greedy(128))
        eng.step()  # the prefills (B * 512 <= 8192 tokens per step: up to 16 at once)
        while any(r.num_computed_tokens < 512 for r in reqs):
            eng.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        n0 = sum(len(r.output_token_ids) for r in reqs)
        while eng.has_unfinished():
            eng.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        n = sum(len(r.output_token_ids) for r in reqs) - n0
        ctx = 512 + 64
        bytes_step = params + kv_tok * ctx * B
        record("decode_sweep", batch=B, tok_s=n / dt, roofline_tok_s=B * bw / bytes_step)

    def kernel_table(fn, top_n=25):
        """GPU time per kernel name of ``fn()``: (total us, the ``top_n`` longest as
        (name, launches, us))."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        agg = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = e.name[:70]
                c, tt = agg.get(k, (0, 0.0))
                agg[k] = (c + 1, tt + e.device_time)
        top = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top_n]
        return sum(v[1] for v in agg.values()), [(k, c, round(t, 1)) for k, (c, t) in top]

    # Per-kernel profile of one eager batch-1 decode step (same kernels as the graph).
    try:
        if "profile" not in parts:
            raise RuntimeError("profile skipped")
        graphs, eng.runner.graphs = eng.runner.graphs, None
        eng.add_request(prompt(512), greedy(8))
        eng.step()
        eng.step()
        total_us, top = kernel_table(eng.step, 15)
        while eng.has_unfinished():
            eng.step()
        eng.runner.graphs = graphs
        record("decode_b1_profile", total_gpu_us=total_us, top=top)
    except Exception as e:
        print("profile failed", repr(e))

    # Per-kernel GPU time of the two step kinds of the 256 x 512/256 run: one 8192-token
    # prefill step (16 prompts of 512) and one batch-256 decode step at ~600 tokens of context.
    if "profile_big" in parts:
        graphs, eng.runner.graphs = eng.runner.graphs, None  # eager: the same kernels, one by one
        reqs = []
        for _ in range(args.tput_requests):
            reqs += eng.add_request(prompt(512), greedy(96))
        for _ in range(3):  # two warm prefill steps, then profile the third
            eng.step()
        total, top = kernel_table(eng.step)
        record("prefill_step_profile", tokens=8192, total_gpu_us=total, top=top)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
            eng.step()
        for _ in range(80):
            eng.step()
        total, top = kernel_table(eng.step)
        record("decode_big_profile", batch=args.tput_requests, context=512 + 80, total_gpu_us=total, top=top)
        while eng.has_unfinished():
            eng.step()
        eng.runner.graphs = graphs

    # A mixed step of the 1000 in / 1000 out run: max_num_seqs - 8 sequences decoding at
    # ~1,050 tokens of context, and 8 new 1000-token prompts admitted in the same step (the
    # run's steady state: finished sequences replaced by new prompts, chunked to the budget).
    if "profile_mixed" in parts:
        n_dec = args.max_num_seqs - 8
        reqs = []
        for _ in range(n_dec):
            reqs += eng.add_request(prompt(1000), greedy(200))
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in reqs):
            eng.step()
        for _ in range(50):
            eng.step()
        for i in range(3):  # two timed mixed steps (graphs as the engine runs them), one profiled
            new = []
            for _ in range(8):
                new += eng.add_request(prompt(1000), greedy(4))
            torch.cuda.synchronize()
            t = time.perf_counter()
            if i < 2:
                eng.step()
                torch.cuda.synchronize()
                record("mixed_step", decodes=n_dec, prompt_tokens=8000, ms=(time.perf_counter() - t) * 1e3)
            else:
                total, top = kernel_table(eng.step, 30)
                record("mixed_step_profile", decodes=n_dec, prompt_tokens=8000, total_gpu_us=total, top=top)
            while not all(r.finished for r in new):  # free their slots for the next round
                eng.step()
        t = time.perf_counter()
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
        record("decode_step_beside", decodes=n_dec, ms=(time.perf_counter() - t) * 1e2)
        total, top = kernel_table(eng.step, 15)
        record("decode_step_profile", decodes=n_dec, total_gpu_us=total, top=top)
        while eng.has_unfinished():
            eng.step()

    # Throughput: 256 requests of 512 in / 256 out.
    def throughput(n_req, plen, olen, label, prefix=None):
        reqs = []
        t = time.perf_counter()
        for _ in range(n_req):
            p = (prefix or []) + prompt(plen)
            reqs += eng.add_request(p, greedy(olen))
        split = {"prefill": [0, 0.0], "decode": [0, 0.0]}  # steps with prompt tokens vs pure decode
        ttft = {}
        # The loop's own work is O(this step's outputs + prompts not yet computed), as a user's
        # loop (qkv bench's): walking all 768 requests twice a step and slicing each one's
        # output list (``output_token_ids`` copies it) cost ~1.2 ms of host time a step.
        unprefilled = list(reqs)
        trace = []  # steps with prompt tokens: (ms, prompt tokens computed, outputs returned)

        while eng.has_unfinished():
            # A step counts as "prefill" when prompt tokens were computed in it, not merely
            # while some request still waits (with async scheduling the count lags by a step).
            before = sum(r.num_computed_tokens for r in unprefilled)
            s0 = time.perf_counter()
            outs = eng.step()
            after = sum(min(r.num_computed_tokens, r.num_prompt_tokens) for r in unprefilled)
            kind = "prefill" if after > before else "decode"
            unprefilled = [r for r in unprefilled if r.num_computed_tokens < r.num_prompt_tokens]
            split[kind][0] += 1
            now = time.perf_counter()
            split[kind][1] += now - s0
            if kind == "prefill":
                trace.append((round((now - s0) * 1e3, 1), after - before, len(outs)))
            for o in outs:
                if o.request_id not in ttft:
                    ttft[o.request_id] = now - t
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out = sum(len(r.output_token_ids) for r in reqs)
        record("throughput", workload=label, kv_dtype=args.kv_dtype, weights=args.quantization, max_num_seqs=args.max_num_seqs,
               budget=args.max_num_batched_tokens, requests=n_req, out_tok_s=out / dt, total_tok_s=(out + n_req * (plen + len(prefix or []))) / dt,
               seconds=dt, preemptions=eng.scheduler.num_preemptions,
               ttft_mean_s=sum(ttft.values()) / len(ttft), ttft_p99_s=sorted(ttft.values())[int(0.99 * (len(ttft) - 1))],
               steps={k: (n, round(sec, 3)) for k, (n, sec) in split.items()}, prompt_steps=trace)
        return out / dt

    if "tput" in parts or args.long:  # warm-up: JIT-compile every kernel variant mixed steps use
        throughput(64, 512, 64, "warm-up")
    if "tput" in parts:
        n = args.tput_requests
        throughput(n, 512, 256, f"{n}x512in/256out")
    if args.long:
        throughput(args.long_requests, 1000, 1000, f"{args.long_requests}x1000in/1000out")
    # Shared prefix: 256 requests = 2000-token shared prefix + 32 own tokens, 32 out.
    if "prefix" not in parts:
        return
    shared = prompt(2000)
    eng.kv.enable_prefix_caching = False
    off = throughput(256, 32, 32, "prefix-cache-off", shared)
    eng.kv.enable_prefix_caching = True
    on = throughput(256, 32, 32, "prefix-cache-on", shared)
    record("prefix_speedup", ratio=on / off)


def set_packed_defaults(knobs: dict) -> None:
    """Override module defaults (knobs.py; an A/B of a kernel variant in the engine), each recorded."""
    from knobs import set_defaults

    set_defaults(knobs, "--packed-set")
    for key, value in knobs.items():
        record("packed_default", knob=key, value=str(value))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sections", default="ceil,kernels,engine")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--host-only", action="store_true", help="engine section: only the host-overhead breakdown")
    ap.add_argument("--parts", default="prefill,b1,gemv_ab,sweep,profile,tput,prefix",
                    help="engine parts: prefill,b1,gemv_ab (b1 again with cuBLAS only),sweep,profile,tput,prefix,host")
    ap.add_argument("--eager-too", action="store_true", help="also time batch-1 decode without CUDA graphs")
    ap.add_argument("--kv-dtype", default="auto", help="engine KV cache dtype: auto | fp8")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8"],
                    help="engine weights: none (bf16) | fp8 (e4m3 weights and activations, qkv/model/fp8.py)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--long-requests", type=int, default=512, help="requests of the 1000 in / 1000 out run")
    ap.add_argument("--tput-requests", type=int, default=256, help="requests of the 512 in / 256 out run")
    ap.add_argument("--async-scheduling", choices=["on", "off"], default=None, help="default: the engine's")
    ap.add_argument("--kernels", default="decode,gemv,mla", help="kernels section: decode,gemv,mla")
    ap.add_argument("--packed-set", default=None,
                    help='JSON: packed-decode defaults for this run, e.g. {"L_DEFER": {"4": true}} (a dict default is updated by bits)')
    args = ap.parse_args()
    if args.packed_set:
        set_packed_defaults(json.loads(args.packed_set))
    secs = args.sections.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    bw, flops = 3.0e12, 785e12
    try:
        if "ceil" in secs:
            bw, flops = ceilings()
        if "kernels" in secs:
            kernels(bw, args.kernels.split(","))
        if "moe" in secs:
            moe_kernels(bw)
        if "splits" in secs:
            splits_sweep(bw)
        if "engine" in secs:
            engine_bench(bw, flops, args)
    finally:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.jsonl"), "a") as f:
            for r in RESULTS:
                f.write(json.dumps(r) + "\n")
    print("\n=== summary ===")
    for r in RESULTS:
        print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
