"""``qkv bench``: latency, throughput, prefix and serve benchmarks, with peers side by side.

    qkv bench latency --model smollm2 --device cpu --threads 2 --peer hf [--no-cache]

latency: one chat prompt (or ``--prompt-len`` random ids), prefill tok/s and decode tok/s, the
prefix cache off (each run prefills the whole prompt). ``--no-cache`` also times
decoding that recomputes the whole sequence at every step (what a KV cache saves), and
prints the per-step cost at growing lengths. ``--peer hf`` runs HF transformers on the same
weights in the same process, right after qkv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SUBCOMMANDS = {
    "latency": "one prompt: prefill and decode tok/s (--no-cache: also without a KV cache)",
    "throughput": "many random-length requests at once: output tok/s under continuous batching",
    "prefix": "requests sharing a long system prompt, prefix caching on vs off",
    "serve": "a live qkv serve under Poisson load: TTFT, inter-token latency, throughput",
    "transcribe": "Whisper speech to text: seconds per 30 s of audio (--peer faster-whisper)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qkv.cli import HelpFormatter, add_model_arguments
    from qkv.tools import bench_gpu

    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, help_ in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name == "serve":
            from qkv.server import bench_serve

            bench_serve.add_arguments(sp)
            continue
        if name == "transcribe":
            from qkv.tools import bench_transcribe

            bench_transcribe.add_arguments(sp)
            continue
        add_model_arguments(sp)
        sp.add_argument("--peer", choices=["hf", "llamacpp", "none"], default="none",
                        help="run HF transformers too (llamacpp: llama-cpp-python on the same GGUF; for throughput it "
                             "serves the same requests one after another, as llama.cpp's single sequence)")
        sp.add_argument("--json", default=None, help="also write the results to this file")
        bench_gpu.add_arguments(sp, name)  # --random-weights, --plot, roofline rates
        if name == "latency":
            sp.add_argument("--prompt", default="What is a KV cache?")
            sp.add_argument("--max-tokens", type=int, default=128)
            sp.add_argument("--no-cache", action="store_true", help="also time decoding without a KV cache")
            sp.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
        elif name == "throughput":
            sp.add_argument("--num-requests", type=int, default=16)
            sp.add_argument("--passes", type=int, default=1,
                            help="run the workload this many times in one engine (new prompts each time): "
                                 "the first pass is cold, as a user's first run; later ones are warm")
            sp.add_argument("--input-len", default="32:256", type=_range_arg, help="min:max random prompt length")
            sp.add_argument("--output-len", default="16:128", type=_range_arg, help="min:max random output length")
            sp.add_argument("--seed", type=int, default=0)
        elif name == "prefix":
            sp.add_argument("--num-requests", type=int, default=16)
            sp.add_argument("--system-tokens", type=int, default=512)
            sp.add_argument("--suffix-tokens", type=int, default=16)
            sp.add_argument("--output-tokens", type=int, default=16)


def run(args) -> int:
    if args.bench == "serve":
        from qkv.server import bench_serve

        return bench_serve.run(args)
    if args.bench == "transcribe":
        from qkv.tools import bench_transcribe

        return bench_transcribe.run(args)
    check_counts(args)
    check_peer(args)
    results = {"latency": latency, "throughput": throughput, "prefix": prefix}[args.bench](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


# The counts each benchmark needs, and their least values: refused by name before the model
# loads (a --repeat of 0 was "max() arg is an empty sequence" after it, --max-tokens 1 a
# ZeroDivisionError: the decode rate is timed from the first token to the last).
LEAST = {"latency": {"max_tokens": 2, "repeat": 1, "prompt_len": 1},
         "throughput": {"num_requests": 1, "passes": 1},
         "prefix": {"num_requests": 1, "system_tokens": 1, "suffix_tokens": 0, "output_tokens": 1}}


def check_counts(args) -> None:
    if args.bench == "prefix" and args.no_prefix_caching:  # it runs both modes: the flag was dropped unsaid
        raise ValueError("--no-prefix-caching: bench prefix times the prefix cache on and off; drop it")
    for name, least in LEAST[args.bench].items():
        value = getattr(args, name)
        if value is not None and value < least:  # None: --prompt-len not given
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    for name in ("bandwidth", "matmul_flops"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    given = [f"--{n.replace('_', '-')}" for n in ("bandwidth", "matmul_flops") if getattr(args, n, None) is not None]
    if given:  # the roofline's rates: used by bench latency on CUDA only, else dropped unsaid
        device = str(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.bench != "latency" or not device.startswith("cuda"):
            raise ValueError(f"{', '.join(given)}: only bench latency on CUDA draws a roofline "
                             f"(this is bench {args.bench} on {device})")


PEERS = {"hf": ("transformers", "pip install transformers"),
         "llamacpp": ("llama_cpp", "pip install llama-cpp-python")}


def check_peer(args) -> None:
    """Refuse a peer that cannot run before qkv's half is measured (and thrown away)."""
    import importlib.util

    if args.peer in PEERS:
        module, fix = PEERS[args.peer]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--peer {args.peer} needs {module}, which is not installed: {fix}")
    if args.peer == "llamacpp":
        if args.bench == "prefix":
            raise ValueError("--peer llamacpp measures latency and throughput only")
        if getattr(args, "random_weights", None) or not _is_gguf(args.model):
            raise ValueError("--peer llamacpp needs a GGUF model (a named default or a .gguf file)")


def _is_gguf(model: str) -> bool:
    from qkv.loading.models import NAMED

    return model in NAMED or model.endswith(".gguf")


def _llm(args, **overrides):
    from qkv import LLM
    from qkv.cli import engine_kwargs

    if getattr(args, "random_weights", None):
        from qkv.tools import bench_gpu

        if args.peer == "hf":  # leave room on the card for HF's copy of the model
            overrides.setdefault("gpu_memory_utilization", 0.45)
        return bench_gpu.random_llm(args, **overrides)

    return LLM(args.model, **{**engine_kwargs(args), **overrides})


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- latency
def _qkv_latency(llm, ids: list[int], max_tokens: int) -> dict:
    from qkv import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    stamps = []
    for _ in llm.stream(ids, params):
        _sync(llm.engine.device)
        stamps.append(time.perf_counter())
    prefill = stamps[0] - t0
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"prefill_s": prefill, "prefill_tok_s": len(ids) / prefill, "decode_tok_s": decode,
            "new_tokens": len(stamps)}


def _qkv_no_cache(llm, ids: list[int], max_tokens: int) -> dict:
    """Greedy decoding that recomputes every position at every step: llm.logits of the whole sequence."""
    seq = list(ids)
    steps = []
    for _ in range(max_tokens):
        t = time.perf_counter()
        seq.append(int(llm.logits(seq)[-1].argmax()))
        steps.append((len(seq) - 1, time.perf_counter() - t))
    return {"decode_tok_s": len(steps) / sum(s for _, s in steps), "step_ms_by_length": _by_length(steps)}


def _by_length(steps: list[tuple[int, float]]) -> dict:
    marks = sorted({steps[0][0], steps[len(steps) // 2][0], steps[-1][0]})
    return {n: round(1e3 * s, 2) for n, s in steps if n in marks}


def _hf_model(llm, dtype):
    from pathlib import Path

    import transformers

    if llm.source.startswith("random:"):
        from qkv.tools.bench_gpu import hf_random_model

        return hf_random_model(llm)
    src = Path(llm.source)
    kw = dict(dtype=dtype)
    if src.is_dir():
        return transformers.AutoModelForCausalLM.from_pretrained(src, **kw).eval().to(llm.engine.device)
    return transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, **kw).eval().to(
        llm.engine.device)


@torch.inference_mode()
def _hf_latency(model, ids: list[int], max_tokens: int, use_cache: bool) -> dict:
    dev = model.device
    x = torch.tensor([ids], device=dev)
    mask = torch.ones_like(x)
    model.generation_config.eos_token_id = None
    model(x)  # warm-up
    _sync(dev)
    t = time.perf_counter()
    model(x)
    _sync(dev)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(x, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, use_cache=use_cache)
    _sync(dev)
    total = time.perf_counter() - t
    out = {"decode_tok_s": (max_tokens - 1) / max(total - prefill, 1e-9)}
    if use_cache:
        out.update(prefill_s=prefill, prefill_tok_s=len(ids) / prefill)
    return out


def _llamacpp_latency(gguf: str, ids: list[int], max_tokens: int) -> dict:
    """llama.cpp (llama-cpp-python, its own quantized kernels) on the same GGUF, same prompt ids."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ValueError("--peer llamacpp needs llama-cpp-python (pip install llama-cpp-python)") from None
    if not gguf.endswith(".gguf"):
        raise ValueError("--peer llamacpp needs a GGUF model")
    model = Llama(model_path=gguf, n_threads=torch.get_num_threads(), n_ctx=len(ids) + max_tokens + 8,
                  verbose=False)
    t0, stamps = time.perf_counter(), []
    for tok in model.generate(ids, temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == max_tokens:
            break
    prefill = stamps[0] - t0
    return {"prefill_s": prefill, "prefill_tok_s": len(ids) / prefill,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def latency(args) -> dict:
    from qkv.tools import bench_gpu

    # Every run sends the same prompt: with the prefix cache on, the runs after the warm-up
    # would prefill only the prompt's last partial block, and report that as the prefill rate.
    llm = _llm(args, enable_prefix_caching=False)
    ids = bench_gpu.prompt_ids(llm, args)  # random ids for a model without a tokenizer
    if ids is None and llm.tokenizer.chat_template:
        ids = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    elif ids is None:
        ids = llm.encode(args.prompt)
    _qkv_latency(llm, ids, 8)  # warm-up
    runs = [_qkv_latency(llm, ids, args.max_tokens) for _ in range(args.repeat)]
    res = {"qkv": max(runs, key=lambda r: r["decode_tok_s"])}
    if args.no_cache:
        res["qkv_no_cache"] = _qkv_no_cache(llm, ids, args.max_tokens)
    if args.peer == "hf":
        model = _hf_model(llm, llm.engine.dtype)
        res["hf"] = max((_hf_latency(model, ids, args.max_tokens, True) for _ in range(args.repeat)),
                        key=lambda r: r["decode_tok_s"])
        if args.no_cache:
            res["hf_no_cache"] = _hf_latency(model, ids, args.max_tokens, False)
    if args.peer == "llamacpp":
        res["llama.cpp"] = max((_llamacpp_latency(llm.source, ids, args.max_tokens) for _ in range(args.repeat)),
                               key=lambda r: r["decode_tok_s"])
    res["setup"] = {"model": args.model, "device": str(llm.engine.device), "dtype": str(llm.engine.dtype),
                    "threads": torch.get_num_threads(), "prompt_tokens": len(ids), "new_tokens": args.max_tokens}
    _print_latency(res)
    if llm.engine.device.type == "cuda":  # the card's measured rates (bench_rates.py); the CPU has no roofline here
        res["roofline"] = r = bench_gpu.roofline(llm, args, len(ids), args.max_tokens, res["qkv"])
        print(f"roofline: decode at {100 * r['decode_bandwidth_fraction']:.1f}% of {args.bandwidth / 1e12:.2f} "
              f"TB/s (floor {r['decode_roofline_tok_s']:.0f} tok/s), prefill at "
              f"{100 * r.get('prefill_matmul_fraction', 0):.1f}% of {args.matmul_flops / 1e12:.0f} TFLOP/s")
    if args.plot:
        bench_gpu.plot(res, args.plot, "latency")
    return res


def _print_latency(res: dict) -> None:
    s = res["setup"]
    print(f"latency: {s['model']} on {s['device']} ({s['dtype']}, {s['threads']} threads), "
          f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens")
    print(f"{'engine':<16}{'decode tok/s':>14}{'prefill tok/s':>15}")
    for name in ("qkv", "qkv_no_cache", "hf", "hf_no_cache", "llama.cpp"):
        if name in res:
            r = res[name]
            pre = f"{r['prefill_tok_s']:.0f}" if "prefill_tok_s" in r else "-"
            print(f"{name:<16}{r['decode_tok_s']:>14.1f}{pre:>15}")
    if "qkv_no_cache" in res:
        steps = res["qkv_no_cache"]["step_ms_by_length"]
        print("without a cache, ms per step at length: " + ", ".join(f"{n}: {ms}" for n, ms in steps.items()))


# ---------------------------------------------------------------------------- throughput / prefix
def _range(text) -> tuple[int, int]:
    if isinstance(text, tuple):  # parsed by _range_arg
        return text
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def _range_arg(text: str) -> tuple[int, int]:
    """``--input-len`` / ``--output-len``: "min:max" (or one count), 1 <= min <= max; argparse names the flag."""
    try:
        lo, hi = _range(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIN:MAX token counts: {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def throughput(args) -> dict:
    from qkv.tools.bench_engine import bench_throughput

    if args.passes < 1:
        raise ValueError(f"--passes must be >= 1, got {args.passes}")
    t0 = time.perf_counter()
    llm = _llm(args)
    startup = time.perf_counter() - t0  # loading (or making) the weights included
    res = bench_throughput(llm, args.num_requests, _range(args.input_len), _range(args.output_len), args.seed)
    res["startup_s"] = startup
    if args.passes > 1:  # other seeds: other prompts, so no pass hits an earlier one's prefixes
        later = [bench_throughput(llm, args.num_requests, _range(args.input_len), _range(args.output_len),
                                  args.seed + i)["output_tok_s"] for i in range(1, args.passes)]
        res["later_passes_output_tok_s"] = later
        res["cold_over_warm"] = res["output_tok_s"] / later[-1]
    if args.peer == "hf":
        res = {"qkv": res, "hf": _hf_throughput(llm, args)}
        res["speedup"] = res["qkv"]["output_tok_s"] / res["hf"].get("output_tok_s", float("nan"))
    elif args.peer == "llamacpp":
        res = {"qkv": res, "llama.cpp": _llamacpp_throughput(llm, args)}
        res["speedup"] = res["qkv"]["output_tok_s"] / res["llama.cpp"]["output_tok_s"]
    print(json.dumps(res, indent=2))
    if args.plot:
        from qkv.tools.bench_gpu import plot

        plot(res if "qkv" in res else {"qkv": res}, args.plot, "throughput")
    return res


def _hf_throughput(llm, args) -> dict:
    """HF ``generate_batch`` on the same prompts as ``bench_throughput`` (same seed), every
    request generating the longest output length (one generation config for all)."""
    import gc
    import random

    from qkv.tools.bench_engine import _random_ids
    from qkv.tools.bench_gpu import hf_throughput

    rng = random.Random(args.seed)
    in_range, out_range = _range(args.input_len), _range(args.output_len)
    prompts = []
    for _ in range(args.num_requests):
        n_in, _n_out = rng.randint(*in_range), rng.randint(*out_range)
        prompts.append(_random_ids(rng, n_in, llm.config.vocab_size))
    model = _hf_model(llm, llm.engine.dtype)
    llm.engine = None  # free qkv's KV pool and graphs before HF allocates its cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return hf_throughput(model, prompts, out_range[1])


def _llamacpp_throughput(llm, args) -> dict:
    """llama.cpp (one sequence) serving ``bench_throughput``'s requests (same seed: same
    prompts, same output lengths) one after another; output tok/s over the whole run."""
    from llama_cpp import Llama

    from qkv.tools.bench_engine import workload

    work = workload(args.num_requests, _range(args.input_len), _range(args.output_len), args.seed,
                    llm.config.vocab_size)
    n_ctx = max(len(ids) + n for ids, n in work) + 8
    model = Llama(model_path=llm.source, n_threads=torch.get_num_threads(), n_ctx=n_ctx, verbose=False)
    out_tokens, ttft = 0, []
    t0 = time.perf_counter()
    for ids, n_out in work:
        for i, _tok in enumerate(model.generate(ids, temp=0.6, reset=True)):
            if i == 0:
                ttft.append(time.perf_counter() - t0)  # from the run's start: all were submitted then
            if i + 1 == n_out:
                break
        out_tokens += n_out
    elapsed = time.perf_counter() - t0
    return {"num_requests": len(work), "output_tokens": out_tokens, "elapsed_s": elapsed,
            "output_tok_s": out_tokens / elapsed, "ttft_mean_s": statistics.fmean(ttft),
            "ttft_p50_s": sorted(ttft)[len(ttft) // 2], "ttft_p99_s": max(ttft)}


def prefix(args) -> dict:
    from qkv.tools.bench_engine import bench_prefix

    res = bench_prefix(lambda on: _llm(args, enable_prefix_caching=on), args.num_requests,
                       args.system_tokens, args.suffix_tokens, args.output_tokens)
    print(json.dumps(res, indent=2))
    if args.plot:
        from qkv.tools.bench_gpu import plot

        plot(res, args.plot, "prefix")
    return res


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"mean": statistics.fmean(xs), "p50": pick(0.5), "p99": pick(0.99)}
