"""Host-time profile of LLMEngine.step on the CPU: where the Python of one decode step goes.

Builds a tiny random Llama (1 layer by default) with transformers + save_pretrained in a temp
directory, admits ``--seqs`` prompts of ``--prompt`` tokens, prefills them (not profiled),
then profiles ``--steps`` pure decode steps with cProfile and prints, per function, the
cumulative milliseconds per step. ``--stub-forward`` (the default) replaces the model's
forward with a random-hidden-state stand-in, so what is left is host work: scheduling, cache
bookkeeping, input staging, sampling and appending. Run from the repo root:

    python benchmarks/host_profile.py                      # 256 seqs x 512-token prompts
    python benchmarks/host_profile.py --keep-forward --seqs 64
    python benchmarks/host_profile.py --async-scheduling
    python benchmarks/host_profile.py --graphs             # DecodeGraphs.run's staging instead of prepare
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time

import torch

WATCH = ["engine.py:.*\\(step\\)", "schedule", "allocate", "cache_blocks", "update", "prepare", "execute",
         "sample", "_append", "tolist", "tensor", "run\\)", "finish"]


def build_engine(args, path: str):
    from qkv.engine.engine import LLMEngine
    from qkv.loading import load

    loaded = load(path)
    kw = {} if args.async_scheduling is None else {"async_scheduling": args.async_scheduling}
    blocks = args.seqs * -(-(args.prompt + 2 * args.steps + args.warmup + 5) // args.block_size) + 8
    return LLMEngine(loaded.config, loaded.weights, None, block_size=args.block_size, num_kv_blocks=blocks,
                     max_num_batched_tokens=max(8192, args.seqs), max_num_seqs=args.seqs,
                     enable_prefix_caching=args.prefix_caching, **kw)


def stub_forward(engine) -> None:
    """Hidden states drawn at random (deterministically): tokens vary, nothing is computed."""
    model, gen = engine.model, torch.Generator().manual_seed(0)
    hidden = engine.config.hidden_size

    def forward(input_ids, positions, batch):
        return torch.randn(input_ids.shape[0], hidden, generator=gen)

    model.forward = forward


def emulate_graphs(engine, max_num_seqs: int) -> None:
    """Route decode steps through DecodeGraphs.run (the CUDA fast path) on the CPU: pinned
    buffers become plain ones, CUDA events no-ops, and a replay does nothing (its logits
    buffer holds fixed random rows). What remains is that path's host work."""
    from qkv.engine import cuda_graph

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    class Graph:
        def replay(self):
            pass

    zeros = torch.zeros
    torch.cuda.Event = Event
    torch.zeros = lambda *a, pin_memory=False, **k: zeros(*a, **k)
    try:
        graphs = cuda_graph.DecodeGraphs(engine.runner, max_num_seqs, engine.max_model_len)
    finally:
        torch.zeros = zeros
    for n in graphs.sizes:
        graphs.logits[n] = torch.randn(n, engine.config.vocab_size)
        graphs.graphs[n] = Graph()
    engine.runner.graphs = graphs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--keep-forward", action="store_true", help="run the real (tiny) forward")
    ap.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--graphs", action="store_true", help="emulate the CUDA-graph decode path (host side only)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import transformers as tf

    from qkv.engine.request import SamplingParams

    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tf.LlamaForCausalLM(cfg).save_pretrained(d)
        engine = build_engine(args, d)
    if not args.keep_forward:
        stub_forward(engine)
    if args.graphs:
        emulate_graphs(engine, args.seqs)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=args.steps + args.warmup + 1000, temperature=0, ignore_eos=True)
    for _ in range(args.seqs):
        engine.add_request(torch.randint(2, 512, (args.prompt,), generator=g).tolist(), params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(args.warmup):
        engine.step()

    # Min over segments of CPU time: robust to other processes on a shared machine.
    seg = max(1, args.steps // 5)
    plain = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(seg):
            engine.step()
        plain.append((time.process_time() - t0) / seg)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        engine.step()
    prof.disable()
    path = ", CUDA-graph path emulated" if args.graphs else ""
    print(f"{args.seqs} seqs decoding at ~{args.prompt} tokens, {args.layers} layer(s), forward "
          f"{'kept' if args.keep_forward else 'stubbed'}{path}, async_scheduling="
          f"{getattr(engine, 'async_scheduling', None)}")
    print(f"step CPU time without the profiler: min {min(plain) * 1e3:.2f} ms, median "
          f"{sorted(plain)[2] * 1e3:.2f} ms over 5 segments of {seg} steps")
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append((cumtime, tottime, ncalls, f"{file.split('/qkv/')[-1].split('/')[-1]}:{line}({fn})"))
    rows.sort(reverse=True)
    print(f"{'cum ms/step':>12} {'self ms/step':>12} {'calls/step':>10}  function")
    for cum, tot, n, name in rows[:args.top]:
        print(f"{cum / args.steps * 1e3:12.3f} {tot / args.steps * 1e3:12.3f} {n / args.steps:10.1f}  {name}")


if __name__ == "__main__":
    main()
