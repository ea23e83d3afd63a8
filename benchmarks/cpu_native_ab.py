"""The CPU's C kernels on and off, interleaved in one process, with llama.cpp in the same run
(issue 19's two targets: a 512-token prefill, and 16 concurrent requests against llama.cpp
serving them one after another).

One engine (``LLM("smollm2", threads=...)``, its defaults: int4 layers, bf16, the AOTI
one-sequence step if built); each round runs the torch path (model/int4.py's ``unpack_torch``,
reference.py's ``decode_pages``: as ``QKV_NATIVE=0``), then the C kernels (model/native.py),
then llama.cpp (llama-cpp-python, same GGUF, same thread count), so a busy machine slows
all three alike within a round. Prints each round and the medians.

    python benchmarks/cpu_native_ab.py prefill --rounds 5      # 512 random ids, prefill only
    python benchmarks/cpu_native_ab.py throughput --rounds 3   # qkv bench throughput's 16 requests
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
from qkv.model import int4
from qkv.tools import bench
from qkv.tools.bench_engine import bench_throughput


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("prefill", "throughput"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    args = ap.parse_args()
    llm = LLM("smollm2", device="cpu", threads=args.threads, enable_prefix_caching=False)
    kernels = (int4._native_unpack(), decode_native._kernel())
    if None in kernels:
        raise SystemExit("the C kernels did not build (model/native.py)")

    def use(native: bool) -> None:
        int4._native[:] = [kernels[0] if native else None]
        decode_native._fn[:] = [kernels[1] if native else None]

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
    for native in (False, True):  # warm-up: page the weights in, build the kernels
        use(native)
        qkv_run()
    rows = {"torch": [], "native": [], "llama.cpp": []}
    for r in range(args.rounds):
        for name in rows:
            if name == "llama.cpp":
                rows[name].append(peer())
            else:
                use(name == "native")
                rows[name].append(qkv_run())
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = lambda k: [round(a / b, 2) for a, b in zip(rows[k], rows["llama.cpp"])]  # noqa: E731
    print(f"{args.what}, {unit}, threads {torch.get_num_threads()}, medians of {args.rounds}: "
          + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    print(f"per round over llama.cpp: torch {ratio('torch')}, native {ratio('native')}")


if __name__ == "__main__":
    main()
