"""Issue 18: uptraining recipes side by side at a small budget, in one process (one device call).

    python benchmarks/uptrain_sweep.py MODEL --kv-heads 1 --tokens 5M --runs all:5e-4 attention:3e-3 ...

Each run is ``PARAMS:LR[:compile]`` (PARAMS as ``--uptrain-params``). The model is loaded, pooled
and its training text tokenized once; every run starts from the same pooled weights with the same
seed and windows, trains ``--tokens`` positions (cosine schedule) and is scored on the held-out
perplexity text as ``qkv convert --report`` scores it. Prints one JSON line per run; the recipe
that wins here is the one ``qkv convert --uptrain`` is then run with at the full budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from qkv.loading import load
from qkv.tools import uptrain as up
from qkv.tools.convert import pool_kv_heads
from qkv.tools.convert_uptrain import parse_count
from qkv.tools.perplexity import default_corpus, perplexity


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--tokens", type=parse_count, required=True, help="training positions per run")
    p.add_argument("--runs", nargs="+", required=True, help="PARAMS:LR[:compile] ...")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--read-tokens", type=parse_count, default=None,
                   help="training text to tokenize (default: --tokens)")
    args = p.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    src = load(args.model)
    config, pooled = pool_kv_heads(src.config, src.weights, args.kv_heads)
    tok = src.tokenizer
    corpus = default_corpus()
    ppl_ids = tok.encode(corpus, add_special_tokens=False)
    t0 = time.perf_counter()
    encode = lambda texts: [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    train_ids = up.training_ids(encode, args.read_tokens or args.tokens, up.training_texts(up.heldout_lines(corpus)))
    log(f"{len(train_ids):,} training tokens read in {time.perf_counter() - t0:.1f} s")
    evaluate = lambda fn: perplexity(fn, ppl_ids, 512, 8192).perplexity  # noqa: E731
    device = up.pick_device(None)
    before = evaluate(up.logits_fn(up.hf_model(src.config, src.weights, device), device))
    print(json.dumps({"run": "before conversion", "perplexity": before}), flush=True)
    for spec in args.runs:
        params, lr, *rest = spec.split(":")
        cfg = up.UptrainConfig(tokens=args.tokens, checkpoints=1, lr=float(lr), params=params,
                               compile="compile" in rest, batch=args.batch, seq_len=args.seq_len)
        t = time.perf_counter()
        try:
            r = up.uptrain(src.config, src.weights, config, pooled, train_ids, cfg, evaluate, log)
        except Exception as e:  # one failed recipe (e.g. a compile error) must not lose the others
            print(json.dumps({"run": spec, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
            continue
        print(json.dumps({"run": spec, "tokens": r.curve[-1].tokens, "pooled": r.curve[0].perplexity,
                          "perplexity": r.curve[-1].perplexity, "vs_original": r.curve[-1].perplexity / before - 1,
                          "train_kl": r.curve[-1].train_kl, "tokens_per_s": r.tokens_per_second,
                          "wall_s": time.perf_counter() - t}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
