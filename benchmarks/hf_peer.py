"""HF transformers on the same random-weight shape and workloads as benchmarks/gpu_bench.py.

    PYTHONPATH=. python benchmarks/hf_peer.py --out $OUT [--requests 256]

Batch-1 latency through ``generate`` (sdpa, DynamicCache) and offline throughput through
``generate_batch`` (continuous batching). Appends JSON records to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--skip-b1", action="store_true")
    args = ap.parse_args()
    import transformers as tf

    from qkv.tools.shapes import SHAPES

    s = SHAPES[args.shape]
    cfg = tf.LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                         num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                         head_dim=s["head_dim"], rope_theta=s["rope_theta"], rms_norm_eps=s["norm_eps"],
                         max_position_embeddings=s["max_position_embeddings"], eos_token_id=None,
                         bos_token_id=None, pad_token_id=0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = []

    def rec(name, **kw):
        kw.update(name=name, transformers=tf.__version__)
        out.append(kw)
        print(json.dumps(kw), flush=True)

    rec("hf_build", seconds=time.perf_counter() - t0)
    rng = random.Random(0)
    V = cfg.vocab_size
    prompt = lambda n: [rng.randrange(10, V) for _ in range(n)]  # noqa: E731
    with torch.no_grad():
        for plen in (() if args.skip_b1 else (512,)):
            ids = torch.tensor([prompt(plen)], device="cuda")
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            rec("hf_decode_b1", prompt=plen, new_tokens=64, tok_s_incl_prefill=64 / dt)
    if True:  # generate_batch manages its own grad/inference modes (it fails under inference_mode)
        inputs = [prompt(512) for _ in range(args.requests)]
        gc = tf.GenerationConfig(max_new_tokens=256, min_new_tokens=256, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        try:
            t = time.perf_counter()
            res = model.generate_batch(inputs=inputs, generation_config=gc)
            dt = time.perf_counter() - t
            n = sum(len(getattr(r, "generated_tokens", []) or []) for r in res.values())
            rec("hf_generate_batch", requests=args.requests, out_tokens=n, seconds=dt, out_tok_s=n / dt)
        except Exception as e:  # report, do not hide, an API difference
            rec("hf_generate_batch_failed", error=repr(e)[:500])
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
