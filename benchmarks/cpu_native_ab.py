"""The CPU's C kernels on and off, interleaved in one process, with llama.cpp in the same run
(issue 19's two targets: a 512-token prefill, and 16 concurrent requests against llama.cpp
serving them one after another).

One engine (``LLM("smollm2", threads=...)``, its defaults: int4 layers, bf16, the AOTI
one-sequence step if built); each round runs the arms in turn: ``torch`` (model/int4.py's
``unpack_torch``, ATen's int4 kernel, reference.py's ``decode_pages``: as ``QKV_NATIVE=0``),
``native`` (session 8's C kernels: the int4 unpack and decode attention), ``rows`` (those and
model/int4_rows.py's few-row int4 product, batched decode steps eager), ``aot`` (``rows`` with
the batched decode steps through the compiled batched package, engine/cpu_aoti.py: the
default where ``qkv compile`` built it), then llama.cpp
(llama-cpp-python, same GGUF, same thread count), so a busy machine slows all alike within a
round. Prints each round and the medians.

    python benchmarks/cpu_native_ab.py prefill --rounds 5      # 512 random ids, prefill only
    python benchmarks/cpu_native_ab.py throughput --rounds 3   # qkv bench throughput's 16 requests
    python benchmarks/cpu_native_ab.py throughput --arms rows,aot
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

import torch

from qkv import LLM, SamplingParams
from qkv.attention import decode_native
from qkv.model import int4, int4_rows, native
from qkv.tools import bench
from qkv.tools.bench_engine import bench_throughput


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("prefill", "throughput"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--arms", default="torch,native,rows", help="comma-separated: torch, native, rows, aot")
    args = ap.parse_args()
    arms = args.arms.split(",")
    llm = LLM("smollm2", device="cpu", threads=args.threads, enable_prefix_caching=False)
    kernels = {"int4_unpack:qkv_int4_unpack": int4._native_unpack(),
               "decode_attn:qkv_decode_attn": decode_native._kernel(),
               "int4_rows:qkv_int4_rows": int4_rows._kernel()}
    if None in kernels.values():
        raise SystemExit("the C kernels did not build (model/native.py)")
    arm_kernels = {"torch": (), "native": tuple(kernels)[:2], "rows": tuple(kernels), "aot": tuple(kernels)}
    step = llm.engine.runner.compiled
    batched = getattr(step, "batched", None)
    if "aot" in arms and batched is None:
        raise SystemExit("no compiled batched decode step for smollm2 (build it: qkv compile)")

    def use(arm: str) -> None:  # native.function's cache: None makes the callers run torch/ATen
        for name, fn in kernels.items():
            native._functions[name] = fn if name in arm_kernels[arm] else None
        if step is not None:  # the batched package only in the aot arm
            step.batched = batched if arm == "aot" else None

    if args.what == "prefill":
        ids = [random.Random(0).randrange(100, llm.config.vocab_size - 100) for _ in range(args.prompt_len)]
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

        def qkv_run() -> float:
            t = time.perf_counter()
            list(llm.stream(ids, params))
            return len(ids) / (time.perf_counter() - t)

        def peer() -> float:
            return bench._llamacpp_latency(llm.source, ids, 2)["prefill_tok_s"]
        unit = "prefill tok/s"
    else:
        ns = SimpleNamespace(num_requests=16, input_len="32:256", output_len="16:128", seed=0)

        def qkv_run() -> float:
            return bench_throughput(llm, 16, (32, 256), (16, 128), 0)["output_tok_s"]

        def peer() -> float:
            return bench._llamacpp_throughput(llm, ns)["output_tok_s"]
        unit = "output tok/s"
    for arm in arms:  # warm-up: page the weights in, build the kernels
        use(arm)
        qkv_run()
    rows = {**{arm: [] for arm in arms}, "llama.cpp": []}
    for r in range(args.rounds):
        for name in rows:
            if name == "llama.cpp":
                rows[name].append(peer())
            else:
                use(name)
                rows[name].append(qkv_run())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = lambda k: [round(a / b, 2) for a, b in zip(rows[k], rows["llama.cpp"])]  # noqa: E731
    print(f"{args.what}, {unit}, threads {torch.get_num_threads()}, medians of {args.rounds}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    print("per round over llama.cpp: " + ", ".join(f"{arm} {ratio(arm)}" for arm in arms))


if __name__ == "__main__":
    main()
