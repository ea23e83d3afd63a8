"""The GPU side of ``qkv bench``: random-weight shapes, roofline fractions, HF peers, plots.

    qkv bench latency --random-weights llama3-8b --prompt-len 512 --max-tokens 200 --peer hf --plot lat.png
    qkv bench throughput --random-weights llama3-8b --num-requests 256 --input-len 512 --output-len 256 --peer hf

Roofline: a decode step must read every weight once (the embedding table aside) and every
cached K/V byte of its sequences; prefill must do 2 FLOPs per weight per token. Fractions are
those floors over the measured time, against ``--bandwidth`` (copy rate, read + write) and
``--matmul-flops`` (bf16 matmul rate); by default both are the rates of the device in use,
measured once and cached on disk (bench_rates.py).
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def add_arguments(sp: argparse.ArgumentParser, name: str) -> None:
    from qkv.tools.shapes import add_arguments as add_shape

    add_shape(sp)
    sp.add_argument("--bandwidth", type=float, default=None,
                    help="copy bandwidth, bytes/s (roofline; default: measured on this device once, cached)")
    sp.add_argument("--matmul-flops", type=float, default=None,
                    help="matmul rate, FLOP/s (roofline; default: measured on this device once, cached)")
    sp.add_argument("--plot", default=None, metavar="PNG", help="draw the results to this file")
    if name == "latency":
        sp.add_argument("--prompt-len", type=int, default=None,
                        help="a prompt of this many random token ids instead of --prompt (decode at a longer "
                             "context); default 512 for a model without a tokenizer (--random-weights)")


def random_llm(args, **overrides):
    """``--random-weights SHAPE``: the shape with random weights on the GPU, in ``--dtype``
    ("auto": bfloat16 there, as a shape declares no checkpoint dtype; engine/dtype.py)."""
    from qkv.tools.shapes import random_llm as build

    if getattr(args, "attention_override", None):  # the shapes have no sliding windows to dilate
        raise ValueError("--attention-override does not apply to --random-weights shapes; use a model")
    kw = dict(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
              enable_prefix_caching=not args.no_prefix_caching, max_model_len=4096,
              kv_dtype=getattr(args, "kv_cache_dtype", "auto"),
              async_scheduling=getattr(args, "async_scheduling", None),
              quantization=None if getattr(args, "quantization", "auto") in ("auto", "none") else args.quantization)
    kw.update(overrides)
    return build(args.random_weights, device=args.device or "cuda", dtype=args.dtype, **kw)


def prompt_ids(llm, args) -> list[int] | None:
    """Random prompt ids when ``--prompt-len`` is given or the model has no tokenizer (512 then),
    else None (use the text prompt)."""
    n = getattr(args, "prompt_len", None)
    if llm.tokenizer is not None and n is None:
        return None
    rng = random.Random(0)
    return [rng.randrange(10, llm.config.vocab_size) for _ in range(n or 512)]


def weights(llm) -> list[torch.Tensor]:
    """The weights a decode step reads: parameters (the embedding only when tied) and the e4m3
    weights of ``quantization="fp8"`` (buffers, model/fp8.py)."""
    model = llm.engine.model
    out = [p for n, p in model.named_parameters() if "embed_tokens" not in n or llm.config.tie_word_embeddings]
    return out + [b for n, b in model.named_buffers() if n.endswith("weight_fp8")]


def weight_bytes(llm) -> int:
    return sum(p.numel() * p.element_size() for p in weights(llm))


def fill_rates(args, device) -> dict | None:
    """Set ``args.bandwidth`` / ``args.matmul_flops`` not given on the command line to the
    device's measured rates (bench_rates.py); returns those rates, None when both were given."""
    if args.bandwidth is not None and args.matmul_flops is not None:
        return None
    from qkv.tools.bench_rates import device_rates

    rates = device_rates(torch.device(device))
    if args.bandwidth is None:
        args.bandwidth = rates["copy_Bps"]
    if args.matmul_flops is None:
        args.matmul_flops = rates["matmul_flops"]
    return rates


def roofline(llm, args, prompt_tokens: int, new_tokens: int, r: dict) -> dict:
    """Fractions of the floors for one latency result ``r`` (decode_tok_s, prefill_s), against
    the rates in ``args`` (``fill_rates``: the device's own unless given)."""
    rates = fill_rates(args, llm.engine.device)
    wb = weight_bytes(llm)
    kv_tok = sum(s.bytes_per_token for s in llm.engine.specs)
    step_bytes = wb + kv_tok * (prompt_tokens + new_tokens // 2)  # KV at the mean context
    out = {"weight_bytes": wb, "kv_bytes_per_token": kv_tok, "bandwidth_Bps": args.bandwidth,
           "matmul_flops": args.matmul_flops, "rates_from": rates["key"] if rates else "command line",
           "decode_roofline_tok_s": args.bandwidth / step_bytes,
           "decode_bandwidth_fraction": r["decode_tok_s"] * step_bytes / args.bandwidth}
    if "prefill_s" in r:
        flops = 2 * sum(p.numel() for p in weights(llm) if p.dim() == 2) * prompt_tokens
        out["prefill_matmul_fraction"] = flops / r["prefill_s"] / args.matmul_flops
    return out


# ---------------------------------------------------------------------------- HF peers on a shape
def hf_random_model(llm):
    """HF transformers' model of the same Llama-family shape, random weights made on the card."""
    import transformers as tf

    c = llm.config
    if c.arch != "llama":
        raise ValueError(f"--peer hf with --random-weights supports Llama-family shapes, not {c.model_type}")
    cls = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}.get(c.model_type, (tf.LlamaConfig, tf.LlamaForCausalLM))
    cfg = cls[0](vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                 head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                 max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                 eos_token_id=None, bos_token_id=None, pad_token_id=0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(llm.engine.dtype)
    try:
        with torch.device(llm.engine.device):
            return cls[1](cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def hf_throughput(model, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """HF ``generate_batch`` (continuous batching) over ``prompts``; output tok/s."""
    import transformers as tf

    if not hasattr(model, "generate_batch"):
        return {"error": f"transformers {tf.__version__} has no generate_batch"}
    gc = tf.GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    t = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gc)  # not under inference_mode: it fails there
    dt = time.perf_counter() - t
    n = sum(len(getattr(r, "generated_tokens", None) or []) for r in res.values())
    return {"output_tokens": n, "elapsed_s": dt, "output_tok_s": n / dt, "transformers": tf.__version__}


# ---------------------------------------------------------------------------- plots
def plot(res: dict, path: str, kind: str) -> None:
    """Latency: decode tok/s per engine beside the bandwidth roofline. Throughput/prefix:
    output tok/s per engine or mode, with p50/p99 time to first token where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if kind == "latency":
        names = [n for n in ("qkv", "qkv_no_cache", "hf", "hf_no_cache") if n in res]
        vals = [res[n]["decode_tok_s"] for n in names]
        ax.bar(names, vals, color="tab:blue")
        roof = res.get("roofline", {}).get("decode_roofline_tok_s")
        if roof:
            ax.axhline(roof, color="tab:red", linestyle="--", label=f"bandwidth roofline {roof:.0f}")
            ax.legend()
        ax.set_ylabel("decode tok/s")
    else:
        names = [n for n in res if isinstance(res[n], dict) and "output_tok_s" in res[n]]
        ax.bar(names, [res[n]["output_tok_s"] for n in names], color="tab:blue")
        ax.set_ylabel("output tok/s")
        for i, n in enumerate(names):
            if "ttft_p50_s" in res[n]:
                ax.annotate(f"TTFT p50 {res[n]['ttft_p50_s']:.2f}s\np99 {res[n]['ttft_p99_s']:.2f}s",
                            (i, res[n]["output_tok_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_title(f"qkv bench {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # without it a name with no suffix was written as NAME.png
    print(f"plot: {path}")
