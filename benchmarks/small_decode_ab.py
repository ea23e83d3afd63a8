"""Batch-1 decode A/B of the decode-path fusion switches (issue 20), one engine per shape, one
process: each variant sets the switches, recaptures the CUDA graphs and times greedy decode.
Needs a CUDA GPU.

    PYTHONPATH=. python3 benchmarks/small_decode_ab.py --shape qwen3-0.6b --json ab.jsonl --profile

Variants (qkv/attention/triton/gemv.py, fused.py, pdl.py, qk_decode.py): ``baseline`` = before
the fusions (Triton GEMV for Llama-8B's shapes only, norms and q/k norm + RoPE as their own
kernels); ``down`` adds Qwen3-0.6B's down projection (SiLU fused); ``gemv`` every Qwen3-0.6B
projection; ``norm`` adds the norms folded into the qkv and gate/up GEMVs; ``qk`` adds q/k norm
+ RoPE in one kernel; ``prev`` also writes K/V in that kernel (the default before PDL);
``split8`` runs that decode attention with 8 splits (one launch, no combine); ``cublas``: no
Triton GEMV. Over ``prev``: ``pdl``/``pdl2`` launch the step's Triton kernels with programmatic
dependent launch (pdl.py's modes 1 and 2), ``merge`` lets the decode kernel merge all its
splits (no combine launch), ``pdl_merge``/``pdl2_merge`` do both; ``attend`` runs q/k norm,
RoPE, the KV write, decode attention and its merge in one launch (qk_attend.py),
``pdl_attend``/``pdl2_attend`` with PDL; ``fullk``: the GEMVs' whole-row tiles (PDL's) without
PDL. ``s7`` (session 7's default) is ``pdl2_merge`` with Llama-8B's
qkv and gate/up on the Triton GEMV and the Triton argmax; ``s9`` adds, for hidden sizes past
the norm prologue's (Llama-8B), the residual add + next norm in the o_proj / down GEMVs
(tail_norm.py) and SiLU-and-mul in the gate/up GEMV (gate_up_silu.py); ``s10`` (``default``, the
shipped one) Llama's RoPE + KV write in one launch with the in-kernel merge (= ``d_rk``); ``k1024`` is ``default`` with
PDL's GEMVs on the 1024-wide chunks (only the first before the wait), ``bn8`` with 8 rows a
program for N > 2048 (4 otherwise); the Llama-8B variants are listed above their table below.
``--timeline``/``--gemv-sweep``: step_timeline.py. Records, one JSON
line each: the copy rate, per variant decode tok/s (512-token prompt, prefill excluded, median of runs), the step's
p50 wall, the bare graph replay time (device time of a step; wall - replay = host time), and
with ``--profile`` the per-kernel profile of the best variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib

import torch

import step_timeline
from qkv.attention.triton import fused
from qkv.attention.triton import gemv as gemv_mod
from qkv.attention.triton import pdl
from qkv.attention.triton import qk_decode
from qkv.attention.triton import decode as decode_mod
from qkv.attention.triton import gate_up_silu, tail_norm
from qkv.engine import sampler
from qkv.engine.request import SamplingParams
from qkv.tools.bench_rates import measure
from qkv.tools.shapes import random_engine

OLD = "4096x4096,4096x14336,128256x4096"  # the shapes enabled before issue 20
VARIANTS = {
    "baseline": dict(gemv=OLD, norm=False, qk=False, kv=False),
    "down": dict(gemv=OLD + ",1024x3072", norm=False, qk=False, kv=False),
    "gemv": dict(gemv="default", norm=False, qk=False, kv=False),
    "norm": dict(gemv="default", norm=True, qk=False, kv=False),
    "qk": dict(gemv="default", norm=True, qk=True, kv=False),
    "prev": dict(gemv="default", norm=True, qk=True, kv=True),  # the default before PDL and the merge
    # the default of session 6 (before the Llama RoPE + KV write launch and the stream kernels)
    "main": dict(gemv=OLD + ",4096x1024,1024x2048,6144x1024,1024x3072,151936x1024", norm=True, qk=True, kv=True,
                 pdl=2, merge=True, torch_argmax=True),
    # session 7: Llama-8B's qkv and gate/up on the Triton GEMV, greedy tokens by the Triton argmax
    "s7": dict(gemv="default", norm=True, qk=True, kv=True, pdl=2, merge=True),
    # session 9: the residual add and next norm in the o_proj / down GEMVs' last program (tail_norm.py),
    # SiLU-and-mul in the gate/up GEMV (gate_up_silu.py)
    "s9": dict(gemv="default", norm=True, qk=True, kv=True, pdl=2, merge=True, tail=True, gus=True),
    # session 10: and Llama's RoPE + KV write in one launch with the decode kernel merging its splits
    "s10": dict(gemv="default", norm=True, qk=True, kv=True, pdl=2, merge=True, tail=True, gus=True, rope_kv=True,
                tiles="4096x4096:4:1024:4"),  # (session 11: o_proj's tile 4 x 2048 with 8 warps by default)
    "default": dict(gemv="default", norm=True, qk=True, kv=True, pdl=2, merge=True, tail=True, gus=True,
                    rope_kv=True),
    "split8": dict(gemv="default", norm=True, qk=True, kv=True, splits=8),
    "cublas": dict(gemv="off", norm=False, qk=False, kv=False),
}
# Over ``prev``: programmatic dependent launch (pdl.py, mode 1 or 2), the decode kernel
# merging all its splits itself (``merge``), both, the one-launch attention (``attend``).
_D = VARIANTS["prev"]
VARIANTS.update({
    "pdl": dict(_D, pdl=1), "pdl2": dict(_D, pdl=2), "merge": dict(_D, merge=True),
    "pdl_merge": dict(_D, pdl=1, merge=True), "pdl2_merge": dict(_D, pdl=2, merge=True),
    "attend": dict(_D, attend=True), "pdl_attend": dict(_D, pdl=1, attend=True),
    "pdl2_attend": dict(_D, pdl=2, attend=True), "fullk": dict(_D, full_k=True),
    "k1024": dict(VARIANTS["default"], pdl_full_k=False), "bn8": dict(VARIANTS["default"], pdl_block_n=8),
})
# Llama-8B (sessions 7 and 9), over ``s7`` (session 7's default) or ``s9`` (the ``d_`` ones): ``rk`` Llama's
# RoPE + KV write in one launch with the decode kernel merging its splits; ``ef`` weight loads
# evict-first; ``k2`` every 8B GEMV in 2048-wide chunks with 8 warps; ``torch`` torch's argmax;
# ``att`` RoPE, KV write, decode and merge in one launch (qk_attend.py without norms);
# ``ropekv``/``wide`` over ``main`` (session 7's round 1).
_K2 = "6144x4096:4:2048:8,28672x4096:4:2048:8,4096x4096:4:2048:8,4096x14336:4:2048:8"
_T8 = "6144x4096:8:512:4,28672x4096:8:512:4,4096x4096:8:512:4,4096x14336:8:512:4"
_M = VARIANTS["main"]
_7 = VARIANTS["s7"]
_D = VARIANTS["s9"]
VARIANTS.update({
    "ropekv": dict(_M, rope_kv=True), "wide": dict(_M, gemv="+6144x4096,28672x4096"),
    "wide_torch": dict(_7, torch_argmax=True), "wide_rk": dict(_7, rope_kv=True), "wide_ef": dict(_7, evict=True),
    "wide_k2": dict(_7, tiles=_K2), "wide_t8": dict(_7, tiles=_T8), "wide_bn2": dict(_7, pdl_block_n=2),
    "rk_ef": dict(_7, rope_kv=True, evict=True), "rk_ef_k2": dict(_7, rope_kv=True, evict=True, tiles=_K2),
    "tail": dict(_D, gus=False), "d_rk": dict(_D, rope_kv=True), "d_rk_ef": dict(_D, rope_kv=True, evict=True),
    "d_rk_ef_k2": dict(_D, rope_kv=True, evict=True, tiles=_K2), "d_ef": dict(_D, evict=True),
    "d_k2": dict(_D, tiles=_K2), "d_att": dict(_D, rope_kv=True, attend=True),
    "d_att_ef": dict(_D, rope_kv=True, attend=True, evict=True),
})
# Session 10's variants over ``d_rk`` (the L2 prefetches, chunked tail norms, row sums per
# chunk) all measured slower (benchmarks.md) and their switches left the code in session 11.
# Over ``s10`` (the default since session 10, = ``d_rk``): ``s16``/``s8``/``s4`` the decode kernel's
# splits at batch 1 (32 in a graph otherwise: 9 of them hold keys at 576 tokens); ``o48``/``o24``/``o2``
# o_proj's tile alone (4 rows x 4096 with 8 warps, 4 x 2048 with 8, 2 x 4096 with 4: more of its
# weight loaded before the PDL wait).
_S = VARIANTS["s10"]
VARIANTS.update({
    "d_s16": dict(_S, splits=16), "d_s8": dict(_S, splits=8), "d_s4": dict(_S, splits=4),
    "d_o48": dict(_S, tiles="4096x4096:4:4096:8"), "d_o24": dict(_S, tiles="4096x4096:4:2048:8"),
    "d_o2": dict(_S, tiles="4096x4096:2:4096:4"),
    # session 11: the two best of session 10's round 2 together
    "d_s16_o24": dict(_S, splits=16, tiles="4096x4096:4:2048:8"),
    "d_s8_o24": dict(_S, splits=8, tiles="4096x4096:4:2048:8"),
})
VARIANTS["s16"] = dict(VARIANTS["default"], splits=16)  # today's default with 16 splits
VARIANTS["noskip"] = dict(VARIANTS["default"], chunk_skip=False)  # the merge's chunks all issued (before session 11)


def use(variant: str, eng) -> None:
    v = VARIANTS[variant]
    gemv_mod.configure(v["gemv"], fuse_norm=v["norm"])
    fused.FUSE_QK_NORM_ROPE = v["qk"]
    fused.FUSE_KV_WRITE = v["kv"]
    qk_decode.SPLITS = v.get("splits")
    decode_mod.MERGE_CHUNK_SKIP = v.get("chunk_skip", True)
    qk_decode.MERGE = v.get("merge", False)
    qk_decode.FUSE_ATTEND = v.get("attend", False)
    gemv_mod.FULL_K = v.get("full_k", False)
    gemv_mod.PDL_FULL_K = v.get("pdl_full_k", True)
    gemv_mod.PDL_BLOCK_N = v.get("pdl_block_n", 4)
    gemv_mod.NORM_MAX_K = v.get("norm_max_k", 2048)
    gemv_mod.TILES.clear()
    gemv_mod.TILES.update(gemv_mod.parse_tiles(v.get("tiles")))
    gemv_mod.EVICT_FIRST = v.get("evict", False)
    qk_decode.FUSE_ROPE_KV = v.get("rope_kv", False)
    tail_norm.ON = v.get("tail", False)
    gate_up_silu.ON = v.get("gus", False)
    sampler.FAST_ARGMAX = not v.get("torch_argmax", False)
    pdl.configure(v.get("pdl", 0))
    eng.runner.graphs.capture()


def bytes_per_step(eng, context: int) -> int:
    """Bytes a batch-1 decode step reads: every weight but the input embedding (one row of it;
    a tied lm_head is read as lm_head) and the K/V of ``context`` tokens."""
    m = eng.model
    emb = m.embedding_weight()
    tied = getattr(m, "lm_head", None) is not None and m.lm_head.weight is emb
    n = sum(p.numel() * p.element_size() for p in m.parameters() if tied or p is not emb)
    cfg = eng.config
    return n + 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * emb.element_size()


def read_rate(dev, gib: float = 2.0, reps: int = 10) -> float:
    """Bytes/s of reading a ``gib`` GiB bf16 tensor (a sum: reads only), best of ``reps``."""
    x = torch.ones(int(gib * 2**30 / 2), dtype=torch.bfloat16, device=dev)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del x
    return gib * 2**30 / best


def driver() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def decode_b1(eng, prompt_len: int, new: int, runs: int, rng: torch.Generator) -> dict:
    vocab = eng.config.vocab_size
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    out = []
    for _ in range(runs):
        ids = torch.randint(100, vocab - 100, (prompt_len,), generator=rng).tolist()
        (req,) = eng.add_request(ids, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()  # the prefill (and the first token)
        t1 = time.perf_counter()
        steps = []
        while eng.has_unfinished():
            s = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - s)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        n = len(req.output_token_ids)
        out.append(dict(tok_s=(n - 1) / (total - (t1 - t0)), step_p50_ms=statistics.median(steps) * 1e3,
                        tokens=req.output_token_ids))
    best = sorted(out, key=lambda r: r["tok_s"])[len(out) // 2]
    return dict(tok_s=best["tok_s"], step_p50_ms=best["step_p50_ms"], all_tok_s=[r["tok_s"] for r in out],
                tokens=out[0]["tokens"][:32])


def replay_ms(eng, reps: int = 50) -> float:
    g = eng.runner.graphs.graphs[1]
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def profile(eng, steps: int = 20, top: int = 20) -> dict:
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    eng.add_request(list(range(100, 612)), params)
    eng.step()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    while eng.has_unfinished():
        eng.step()
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(getattr(ev, "device_time_total", 0.0))
    total = sum(sum(v) for v in kernels.values()) / steps
    rows = sorted(((sum(v) / steps, len(v) / steps, k) for k, v in kernels.items()), reverse=True)
    return dict(kernel_ms=total / 1e3, kernels_per_step=sum(r[1] for r in rows),
                top=[dict(us=round(us, 2), calls=c, name=n[:120]) for us, c, n in rows[:top]])


def graph_us(fn, reps: int = 10) -> float:
    """Microseconds per call of ``fn`` (a list of launches) replayed in a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        n = fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps / n * 1e6


def tile_sweep(record, copies: int = 28) -> None:
    """Each Qwen3-0.6B projection: cuBLAS against the Triton GEMV per tile, ``copies`` weights
    in turn (as many as layers, past the L2), in a CUDA graph: us per GEMV and TB/s of weight."""
    for (N, K) in sorted(gemv_mod.QWEN3_06B_SHAPES):
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies if N < 100000 else 2)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)

        def run(f):
            for w in ws:
                f(w)
            return len(ws)

        row = {"cublas": graph_us(lambda: run(lambda w: torch.nn.functional.linear(x, w)))}
        for bn, warps in ((1, 4), (2, 4), (4, 4), (8, 4), (4, 8), (8, 8)):
            try:
                row[f"n{bn}w{warps}"] = graph_us(lambda: run(lambda w: gemv_mod.gemv(x, w, block_n=bn, num_warps=warps)))
            except Exception as e:  # noqa: BLE001  (a tile that does not compile: recorded, not fatal)
                row[f"n{bn}w{warps}"] = repr(e)[:80]
        best = min((k for k in row if isinstance(row[k], float)), key=row.get)
        record(kind="gemv_tiles", N=N, K=K, us=row, best=best, tile_now=gemv_mod.tile(N, K),
               best_TBps=N * K * 2 / (row[best] * 1e-6) / 1e12)
        del ws


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--variants", default="baseline,default,split8,qk,norm,gemv,down,cublas")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="variants interleaved this many times (each recaptured "
                   "every round): an order or placement effect shows as spread between rounds, not as a gap")
    p.add_argument("--profile", action="store_true", help="per-kernel profile of the fastest variant")
    p.add_argument("--profile-variants", default="", help="also profile these variants (comma-separated)")
    p.add_argument("--count", action="store_true", help="kernels and kernel ms a step of every variant")
    p.add_argument("--copy-rate", action="store_true", help="measure the copy rate first")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true", help="records only into --json; stdout gets the summary lines")
    p.add_argument("--timeline", default="", help="kernel-by-kernel increments of a graph replay of these variants")
    p.add_argument("--gemv-sweep", action="store_true", help="after the variants: each 8B GEMV shape alone per tile, "
                   "and the step's projections alone (step_timeline.py)")
    p.add_argument("--tiles", action="store_true", help="only the GEMV tile sweep of the Qwen3-0.6B shapes")
    args = p.parse_args()

    def record(**r):
        if not args.quiet:
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")

    dev = torch.device("cuda")
    if args.tiles:
        tile_sweep(record)
        return
    if args.copy_rate:
        rates = measure(dev)
        rates["read_Bps"] = read_rate(dev)
        import triton
        record(kind="rates", device=torch.cuda.get_device_name(dev), torch=torch.__version__,
               triton=triton.__version__, driver=driver(), **rates)
    t = time.perf_counter()
    max_len = max(2048, args.prompt_len + args.new + 64)  # long prompts: the pool grows with them
    eng = random_engine(args.shape, max_num_seqs=1, max_model_len=max_len, num_kv_blocks=max(256, max_len // 8))
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())  # tied: counted once
    step_bytes = bytes_per_step(eng, args.prompt_len + args.new // 2)
    record(kind="engine", shape=args.shape, build_s=time.perf_counter() - t, weight_bytes=weight_bytes,
           step_bytes=step_bytes, async_scheduling=eng.async_scheduling)
    if args.copy_rate:
        floor = rates["copy_Bps"] / step_bytes
        print(f"## {args.shape}: {step_bytes / 1e9:.3f} GB read a step (weights but the embedding, KV at "
              f"{args.prompt_len + args.new // 2} tokens); copy {rates['copy_Bps'] / 1e12:.3f} TB/s -> floor "
              f"{floor:.1f} tok/s ({1e3 / floor:.3f} ms); read-only {rates.get('read_Bps', 0) / 1e12:.3f} TB/s",
              flush=True)
    floor = rates["copy_Bps"] / step_bytes if args.copy_rate else None
    todo = [v for v in args.profile_variants.split(",") if v]
    results, ref_tokens, rounds = {}, None, {}
    order = [(rnd, name) for rnd in range(args.rounds) for name in args.variants.split(",")]
    for rnd, name in order:
        t = time.perf_counter()
        try:
            use(name, eng)
            cap = time.perf_counter() - t
            r = decode_b1(eng, args.prompt_len, args.new, args.runs, torch.Generator().manual_seed(0))
            r["replay_ms"] = replay_ms(eng)
            if args.count:
                prof = profile(eng, steps=10, top=0)
                r.update(kernels_per_step=prof["kernels_per_step"], kernel_ms=prof["kernel_ms"])
        except Exception as e:  # noqa: BLE001  (one variant failing: recorded, the others still run)
            record(kind="error", shape=args.shape, variant=name, error=repr(e)[:400])
            print(f"## {args.shape} {name:>10}: FAILED {repr(e)[:200]}", flush=True)
            continue
        same = None if ref_tokens is None else r["tokens"] == ref_tokens
        ref_tokens = ref_tokens or r["tokens"]
        results[name] = r
        rounds.setdefault(name, []).append(r)
        record(kind="decode_b1", shape=args.shape, variant=name, switches=VARIANTS[name], capture_s=cap,
               same_tokens_as_first=same, round=rnd, **r)
        share = f"{r['tok_s'] / floor:6.1%} " if floor else ""
        count = f"kernels {r['kernels_per_step']:.0f} ({r['kernel_ms']:.3f} ms) " if "kernels_per_step" in r else ""
        print(f"## {name:>10}: {r['tok_s']:7.1f} tok/s {share}step {r['step_p50_ms']:.3f} replay "
              f"{r['replay_ms']:.3f} ms {count}tok#{zlib.crc32(str(r['tokens']).encode()):08x}", flush=True)
        if rnd < args.rounds - 1:
            continue  # timelines and profiles once, in the last round
        if name in args.timeline.split(","):
            try:
                step_timeline.timeline(eng, record, copy_Bps=rates["copy_Bps"] if args.copy_rate else None, label=name)
            except Exception as e:  # noqa: BLE001  (a diagnostic failing: the A/B goes on)
                print(f"## timeline {name}: FAILED {repr(e)[:200]}", flush=True)
        if name in todo:  # profiled now: a timeout later cuts no profile already taken
            show_profile(name, eng, args.shape, record)
            todo.remove(name)
    if args.rounds > 1:  # the medians over rounds, each round's figure a median of its runs
        for name, rs in rounds.items():
            tok = statistics.median(r["tok_s"] for r in rs)
            rep = statistics.median(r["replay_ms"] for r in rs)
            share = f"{tok / floor:6.1%} " if floor else ""
            record(kind="decode_b1_rounds", shape=args.shape, variant=name, tok_s=tok, replay_ms=rep,
                   round_tok_s=[r["tok_s"] for r in rs], round_replay_ms=[r["replay_ms"] for r in rs])
            print(f"## {name:>10}: median of {len(rs)} rounds {tok:7.1f} tok/s {share}replay {rep:.3f} ms "
                  f"(rounds {', '.join(format(r['tok_s'], '.1f') for r in rs)}; replays "
                  f"{', '.join(format(r['replay_ms'], '.3f') for r in rs)})", flush=True)
    if args.gemv_sweep and args.copy_rate:
        use("default", eng)
        for fn in (step_timeline.gemv_chain, step_timeline.gemv_sweep):
            try:
                fn(*((eng,) if fn is step_timeline.gemv_chain else ()), record, rates["copy_Bps"])
            except Exception as e:  # noqa: BLE001
                print(f"## {fn.__name__}: FAILED {repr(e)[:200]}", flush=True)
    if args.profile and results:
        best = max(results, key=lambda k: results[k]["tok_s"])
        use(best, eng)
        show_profile(best, eng, args.shape, record)


def show_profile(name: str, eng, shape: str, record, rows: int = 8) -> None:
    try:
        prof = profile(eng)
    except Exception as e:  # noqa: BLE001
        print(f"## profile {name}: FAILED {repr(e)[:200]}", flush=True)
        return
    record(kind="profile", shape=shape, variant=name, **prof)
    print(f"## profile {name}: {prof['kernel_ms']:.3f} ms of kernels, {prof['kernels_per_step']:.0f} a step", flush=True)
    for row in prof["top"][:rows]:
        print(f"##   {row['us']:8.1f} us {row['calls']:5.0f}x  {row['name'][:70]}", flush=True)


if __name__ == "__main__":
    main()
