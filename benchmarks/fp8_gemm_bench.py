"""Llama-3-8B's four projections in bf16 against fp8 (qkv/model/fp8.py), per row count.

    PYTHONPATH=. python benchmarks/fp8_gemm_bench.py [--rows 1,384,8192]

For each M: one layer's qkv, o, gate/up and down products timed through a CUDA graph
(``triton.testing.do_bench``, median): ``F.linear`` in bf16, ``torch._scaled_mm`` on e4m3
operands with row-wise scales (fast accumulation off and on), the activation rounding kernel
(triton/fp8_rows.py) alone, and Fp8Linear whole (rounding + product; at M = 1 the fp8 GEMV,
triton/fp8_gemv.py, and ``_scaled_mm`` for comparison). Prints one line per M:
microseconds a layer and TFLOP/s, against the bf16 matmul rate measured as `qkv bench` does, and
(M > 1) the relative error of o's and down's products with and without fast accumulation
against the float64 product of the same e4m3 operands (bf16 output rounding: ~1e-3).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from qkv.model import fp8

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,384,8192")
    args = ap.parse_args()
    from qkv.tools.bench_rates import measure

    bf16_rate = measure(torch.device("cuda"))["matmul_flops"]
    layers = {}
    for name, (n, k) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        layers[name] = (lin, fp8.Fp8Linear(lin))
    for m in (int(v) for v in args.rows.split(",")):
        row = {"M": m}
        flops = sum(2 * m * n * k for n, k in SHAPES.values())
        xs = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        qx = {name: fp8.quantize_rows(x) for name, x in xs.items()}
        variants = {
            "bf16": lambda: [F.linear(xs[s], layers[s][0].weight) for s in SHAPES],
            "fp8_mm": lambda: [torch._scaled_mm(qx[s][0], layers[s][1].weight_fp8.t(), scale_a=qx[s][1],
                                                scale_b=layers[s][1].scale, out_dtype=torch.bfloat16) for s in SHAPES],
            "fp8_mm_fast": lambda: [torch._scaled_mm(qx[s][0], layers[s][1].weight_fp8.t(), scale_a=qx[s][1],
                                                     scale_b=layers[s][1].scale, out_dtype=torch.bfloat16,
                                                     use_fast_accum=True) for s in SHAPES],
            "round_rows": lambda: [fp8.quantize_rows(xs[s]) for s in SHAPES],
            "fp8_linear": lambda: [layers[s][1](xs[s]) for s in SHAPES],  # M = 1: the fp8 GEMV
        }
        if m == 1:
            from qkv.attention.triton import fp8_gemv

            def through_scaled_mm():  # _scaled_mm at one row, for comparison
                fp8_gemv.ON = False
                out = [layers[s][1](xs[s]) for s in SHAPES]
                fp8_gemv.ON = True
                return out

            variants["fp8_linear_scaled_mm"] = through_scaled_mm
        for key, fn in variants.items():
            try:
                row[key + "_us"] = round(graph_ms(fn) * 1e3, 1)
            except Exception as e:  # report, keep measuring the rest
                row[key + "_us"] = f"failed {type(e).__name__}: {str(e)[:80]}"
        if m == 1:
            wbytes = sum(n * k for n, k in SHAPES.values())
            for key in ("bf16", "fp8_linear", "fp8_linear_scaled_mm"):
                if isinstance(row[key + "_us"], float):  # weight bytes read per second, TB/s
                    row[key + "_TBps"] = round(wbytes * (2 if key == "bf16" else 1) / row[key + "_us"] / 1e6, 2)
        for key in ("bf16", "fp8_mm", "fp8_mm_fast", "fp8_linear"):
            if isinstance(row[key + "_us"], float):
                row[key + "_TF"] = round(flops / (row[key + "_us"] / 1e6) / 1e12)
        row["bf16_rate_TF"] = round(bf16_rate / 1e12)
        if m > 1:  # fast accumulation's cost in accuracy: norm error against the float64 product
            for s in ("o", "down"):
                (xq, xs), layer = qx[s], layers[s][1]
                w = layer.weight_fp8.double() * layer.scale.double().reshape(-1, 1)
                exact = (xq.double() * xs.double()) @ w.t()
                for fast in (False, True):
                    y = torch._scaled_mm(xq, layer.weight_fp8.t(), scale_a=xs, scale_b=layer.scale,
                                         out_dtype=torch.bfloat16, use_fast_accum=fast).double()
                    row[f"err_{s}{'_fast' if fast else ''}"] = float(f"{((y - exact).norm() / exact.norm()).item():.2e}")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
