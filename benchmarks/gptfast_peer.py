"""gpt-fast's batch-1 decode beside qkv's, in the same process (issue 20's peer). Needs a CUDA GPU.

    PYTHONPATH=. python3 benchmarks/gptfast_peer.py --json peer.jsonl

The model is gpt-fast's own ``model.py`` (vendored unchanged in ``benchmarks/peers``) at its
``llama-3-8b`` config with random bf16 weights (no download); the decode step is gpt-fast's
``decode_one_token`` (model forward + its sampling) under ``torch.compile(mode="reduce-overhead",
fullgraph=True)``, as ``generate.py --compile`` runs it, with the inductor settings of
``generate.py`` (``--fast-compile``: without coordinate-descent tuning, a shorter compile).
Prefill is eager (gpt-fast's default). Reports decode tok/s over ``--new`` tokens after a
``--prompt-len`` prompt, median of ``--runs``, prefill excluded (as small_decode_ab.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="llama-3-8b")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--fast-compile", action="store_true", help="no coordinate-descent tuning")
    p.add_argument("--json", default=None)
    p.add_argument("--after", default=None, help="after compiling, wait for this file before the timed runs "
                   "(the compile may overlap other GPU work of the same call; the timing must not)")
    args = p.parse_args()
    torch._inductor.config.coordinate_descent_tuning = not args.fast_compile
    torch._inductor.config.triton.unique_kernel_names = True
    torch._inductor.config.fx_graph_cache = True
    sys.path.insert(0, str(Path(__file__).parent / "peers"))
    from gpt_fast_model import Transformer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer.from_name(args.name)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.02) if prm.dim() > 1 else prm.fill_(1.0)
    model.eval()
    with torch.device("cuda"):
        model.setup_caches(max_batch_size=1, max_seq_length=args.prompt_len + args.new + 8)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())

    def logits_to_token(logits):  # gpt-fast's sample() at temperature 0 (clamped to 1e-5): argmax
        probs = torch.nn.functional.softmax(logits[:, -1] / 1e-5, dim=-1)
        q = torch.empty_like(probs).exponential_(1)
        return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)

    def decode_one_token(x, input_pos):
        return logits_to_token(model(x, input_pos))

    decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    def run(new: int) -> float:
        ids = torch.randint(100, 128000, (1, args.prompt_len), device="cuda")
        with torch.no_grad():
            pos = torch.arange(args.prompt_len, device="cuda")
            tok = logits_to_token(model(ids, pos))
            torch.cuda.synchronize()
            t = time.perf_counter()
            input_pos = torch.tensor([args.prompt_len], device="cuda", dtype=torch.int)
            for _ in range(new):
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    nxt = decode(tok.view(1, -1), input_pos)
                input_pos += 1
                tok = nxt.clone()
            torch.cuda.synchronize()
            return new / (time.perf_counter() - t)

    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    run(4)  # compiles (and captures the graph)
    compile_s = time.perf_counter() - t1
    while args.after and not Path(args.after).exists():
        time.sleep(0.5)
    rates = [run(args.new) for _ in range(args.runs)]
    rec = dict(kind="gptfast_b1", name=args.name, tok_s=statistics.median(rates), all_tok_s=rates,
               build_s=build_s, compile_s=compile_s, weight_bytes=weight_bytes, prompt_len=args.prompt_len,
               new=args.new, coordinate_descent_tuning=not args.fast_compile)
    print(f"## gpt-fast {args.name}: {rec['tok_s']:.1f} tok/s (runs {', '.join(f'{r:.1f}' for r in rates)}), "
          f"compile {compile_s:.0f} s, coordinate descent {'off' if args.fast_compile else 'on'}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
