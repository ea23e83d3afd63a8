"""Where a decode step's time goes: per-kernel CUDA time of steady decode steps (graph replays
included), for a named random-weight shape at a given batch size. Needs a CUDA GPU.

    PYTHONPATH=. python3 benchmarks/profile_decode.py --shape deepseek-v2-lite --batch 128 --input-len 512

Prints the step time (wall, median of the profiled steps), then the kernels that take the most
CUDA time per step, grouped by name, with their share of the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qkv.engine.request import SamplingParams
from qkv.tools.shapes import SHAPES, random_engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    p.add_argument("--kv-dtype", default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="append one record to this file")
    args = p.parse_args()

    kw = dict(max_num_seqs=max(args.batch, 1), max_num_batched_tokens=8192)
    if args.kv_dtype:
        kw["kv_dtype"] = args.kv_dtype
    engine = random_engine(args.shape, **kw)
    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.steps + 64, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        ids = torch.randint(100, vocab - 100, (args.input_len,), generator=g).tolist()
        engine.add_request(ids, params, request_id=f"p{i}")
    # Run until every request has finished its prompt, then some decode steps to settle.
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) \
            or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()

    walls = []
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
    step_ms = statistics.median(walls) * 1e3

    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time_total if hasattr(ev, "device_time_total")
                                                   else ev.cuda_time_total)
    total_us = sum(sum(v) for v in kernels.values()) / args.steps
    rows = sorted(((sum(v) / args.steps, len(v) / args.steps, k) for k, v in kernels.items()), reverse=True)
    print(f"shape {args.shape} batch {args.batch} input {args.input_len}: step {step_ms:.2f} ms wall, "
          f"{total_us / 1e3:.2f} ms of kernels, {sum(r[1] for r in rows):.0f} kernels per step, "
          f"{args.batch / step_ms * 1e3:.0f} tok/s")
    print(f"{'us/step':>9} {'share':>6} {'calls':>6}  kernel")
    for us, calls, name in rows[:args.top]:
        print(f"{us:9.1f} {us / total_us:6.1%} {calls:6.0f}  {name[:110]}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(dict(shape=args.shape, batch=args.batch, input_len=args.input_len, step_ms=step_ms,
                                    kernel_ms=total_us / 1e3, top=[dict(us=us, calls=c, name=n)
                                                                   for us, c, n in rows[:args.top]])) + "\n")


if __name__ == "__main__":
    main()
