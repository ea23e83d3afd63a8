"""Where a batch-1 decode step's time goes, kernel by kernel, and what each GEMV shape reaches
alone (issue 20; used by small_decode_ab.py's ``--timeline`` and ``--gemv-sweep``). Needs a GPU.

``timeline``: a few bare replays of the decode graph under the profiler (CUPTI: kernel start
and end times; grids from the exported trace). With programmatic dependent launch kernels
overlap, so a kernel's own duration says little; what it adds to the step is its **increment**,
its end minus the previous kernel's end (every kernel ends after the one before it: each waits
for it). Per role (a kernel name and grid at one place in the layer), averaged over the middle
layers: increment, bytes it must read (weights; K/V for attention) and bytes / increment
against the copy rate.

``gemv_sweep``: each Llama-8B projection alone, ``copies`` weights (past the L2) chained in one
CUDA graph with PDL as in the step, per tile: us a GEMV and the share of the copy rate.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch

from qkv.attention.triton import gemv as gemv_mod
from qkv.attention.triton import pdl


def _roles(cfg) -> dict:
    """grid -> (role, bytes) for the GEMVs of a Llama-shaped model at BLOCK_N 1, 2, 4 or 8."""
    H, D, KVH, E, I, V = (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads, cfg.hidden_size, cfg.intermediate_size,
                          cfg.vocab_size)
    shapes = {"qkv": ((H + 2 * KVH) * D, E), "o": (E, H * D), "gate_up": (2 * I, E), "lm_head": (V, E)}
    out = {}
    for role, (n, k) in shapes.items():
        for bn in (1, 2, 4, 8):
            out[n // bn] = (role, n * k * 2)
    return out


def timeline(eng, record, replays: int = 5, copy_Bps: float | None = None, label: str = "") -> None:
    cfg = eng.config
    g = eng.runner.graphs.graphs[1]
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    evs = [e for e in json.load(open(path))["traceEvents"]
           if e.get("ph") == "X" and e.get("cat") == "kernel"]
    evs.sort(key=lambda e: e["ts"])
    per = len(evs) // replays
    one = evs[per * (replays // 2): per * (replays // 2 + 1)]  # a middle replay
    rows, p, span, layer_us, head, tail = analyze(one, cfg, copy_Bps)
    record(kind="timeline", variant=label, kernels=len(one), span_us=span, layer_us=layer_us, per_layer=p, rows=rows,
           head_us=head, tail=tail)
    print(f"## timeline {label}: {len(one)} kernels, span {span:.0f} us (profiled replay), {p} a layer, "
          f"layer {layer_us:.1f} us; before layer 0 {head:.1f} us", flush=True)
    for r in rows:
        share = f"{r['share']:6.1%}" if r["share"] else "      "
        print(f"##   {r['role']:>9} {r['name'][:26]:26} grid {r['grid']:6} +{r['inc_us']:6.2f} us "
              f"(runs {r['dur_us']:6.2f}) {share}", flush=True)
    print("##   after the layers: " + ", ".join(f"{n[:18]}/{g} +{us:.1f}" for n, g, us in tail), flush=True)


def analyze(one: list[dict], cfg, copy_Bps: float | None):
    """One replay's kernel events (chrome-trace dicts, by start) -> per-role rows of the middle
    layers, kernels a layer, span, us a layer, us before the first layer, the kernels after the last."""
    names = [e["name"] for e in one]
    ends = [e["ts"] + e["dur"] for e in one]
    inc = [ends[0] - one[0]["ts"]] + [max(0.0, ends[i] - max(ends[:i])) for i in range(1, len(one))]
    span = max(ends) - one[0]["ts"]
    roles = _roles(cfg)
    kv_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * 2 * 576
    down_bytes = cfg.hidden_size * cfg.intermediate_size * 2
    anchors = [i for i, n in enumerate(names) if n.startswith("_decode_kernel")]
    p = anchors[1] - anchors[0] if len(anchors) > 1 else 0
    rows = []
    if p:
        mid = anchors[2:-2]
        for r in range(-2, p - 2):
            idx = [a + r for a in mid if 0 <= a + r < len(one)]
            e0 = one[idx[0]]
            grid = (e0.get("args") or {}).get("grid", [0])[0]
            name = e0["name"]
            role, nbytes = ("attention", kv_bytes) if name.startswith("_decode") else ("", 0)
            if "gemv" in name or "gate_up" in name:
                role, nbytes = ("down", down_bytes) if "silu_gemv" in name else roles.get(grid, ("?", 0))
                if role == "o" and any(r["role"] == "o" for r in rows):  # o_proj's shape again: the down GEMV
                    role, nbytes = "down", down_bytes
            us = sum(inc[i] for i in idx) / len(idx)
            dur = sum(one[i]["dur"] for i in idx) / len(idx)
            rows.append(dict(name=name[:40], grid=grid, role=role, inc_us=us, dur_us=dur, bytes=nbytes,
                             share=(nbytes / (us * 1e-6) / copy_Bps) if (copy_Bps and us > 0 and nbytes) else None))
    layer_us = sum(r["inc_us"] for r in rows)
    head = sum(inc[: anchors[0] - 2]) if anchors else 0.0
    tail_i = (anchors[-1] - 2 + p) if anchors else len(one)
    tail = [(one[i]["name"][:40], (one[i].get("args") or {}).get("grid", [0])[0], inc[i]) for i in range(tail_i, len(one))]
    return rows, p, span, layer_us, head, tail


def _graph_us(fn, reps: int = 10) -> float:
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


SWEEP_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
# (BLOCK_N, BLOCK_K, warps, evict-first): the default tile, 2048-wide chunks, 8-row and 2-row tiles
SWEEP_TILES = [(4, 1024, 4, False), (4, 1024, 4, True), (4, 2048, 8, False), (2, 2048, 4, False),
               (8, 1024, 8, False)]


def gemv_sweep(record, copy_Bps: float, total_bytes: float = 1.5e9) -> None:
    old_evict = gemv_mod.EVICT_FIRST
    for (N, K) in SWEEP_SHAPES:
        nbytes = N * K * 2
        copies = max(2, math.ceil(total_bytes / nbytes))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(1, 2 * K, device="cuda", dtype=torch.bfloat16)
        res = {}
        for bn, bk, warps, ev in SWEEP_TILES:
            gemv_mod.EVICT_FIRST = ev

            def run():
                for w in ws:
                    gemv_mod.gemv(x, w, block_n=bn, block_k=bk, num_warps=warps)
                return len(ws)

            key = f"n{bn}k{bk}w{warps}{'ef' if ev else ''}"
            try:
                res[key] = _graph_us(run)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile: recorded, not fatal)
                res[key] = repr(e)[:80]
        gemv_mod.EVICT_FIRST = old_evict
        if K > 8192:  # the down projection as the step runs it: SiLU(g) * u computed per chunk
            layers = []
            for w in ws:
                lay = torch.nn.Linear(K, N, bias=False, device="meta")
                lay.weight = torch.nn.Parameter(w, requires_grad=False)
                layers.append(lay)

            def run_silu():
                for lay in layers:
                    gemv_mod.silu_mul_linear(gu, lay)
                return len(layers)

            res["silu_default"] = _graph_us(run_silu)
        shares = {k: (nbytes / (v * 1e-6) / copy_Bps if isinstance(v, float) else None) for k, v in res.items()}
        record(kind="gemv_sweep", N=N, K=K, copies=copies, pdl=pdl.MODE, us=res, share=shares)
        best = min((k for k in res if isinstance(res[k], float)), key=res.get)
        line = " ".join(f"{k} {res[k]:.1f}us/{shares[k]:.1%}" if isinstance(res[k], float) else f"{k} ERR"
                        for k in res)
        print(f"## gemv {N}x{K} ({nbytes / 1e6:.1f} MB, x{copies}) best {best}: {line}", flush=True)
        del ws


def gemv_chain(eng, record, copy_Bps: float) -> None:
    """The step's projections alone (each layer's qkv, o, gate/up, down and lm_head, the
    default tiles, PDL): the time a step would take if the GEMVs were all it ran."""
    m = eng.model
    ws = []
    for layer in m.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        ws += [a.qkv_proj.weight, a.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight]
    ws.append(m.lm_head.weight)
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in {w.shape[1] for w in ws}}

    def run():
        for w in ws:
            gemv_mod.gemv(xs[w.shape[1]], w)
        return 1

    us = _graph_us(run, reps=5)
    nbytes = sum(w.numel() * 2 for w in ws)
    share = nbytes / (us * 1e-6) / copy_Bps
    record(kind="gemv_chain", us=us, bytes=nbytes, share=share)
    print(f"## gemv chain (the step's {len(ws)} projections alone, PDL): {us / 1e3:.3f} ms for "
          f"{nbytes / 1e9:.3f} GB = {share:.1%} of the copy rate", flush=True)
