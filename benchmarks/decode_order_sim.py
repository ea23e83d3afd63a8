"""Why longest-first (qkv/attention/triton/order.py): list scheduling of a decode launch's programs.

The GPU starts a grid's programs in index order as slots free up. This simulates that for the
`1000 in / 1000 out` run's decode launches: 384 sequences of 1,000-2,000 keys x 8 KV heads, one
program each (the int4 kernel's single-warp programs, 1 split), a program's time proportional to
its keys, and ``--slots`` programs resident at once (the int4 kernel: 16 warps an SM at 127
registers x 132 SMs = 2,112). It prints each order's end over the ideal (the work spread evenly
over the slots). The model leaves out that programs in the tail, with the SM to themselves, run
faster: it bounds the gain, it does not measure it (kv_int_engine_shape_bench.py's ``lpt``
variant does).

    python benchmarks/decode_order_sim.py [--slots 2112] [--seqs 384] [--heads 8]
"""

from __future__ import annotations

import argparse
import heapq
import random


def makespan(durations: list[float], slots: int) -> float:
    """When the last program ends, programs started in list order on the first free slot."""
    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=2112)
    ap.add_argument("--seqs", type=int, default=384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--keys", default="1000,2000")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    lo, hi = map(int, args.keys.split(","))
    for t in range(args.trials):
        rng = random.Random(t)
        seqs = [rng.uniform(lo, hi) for _ in range(args.seqs)]
        grid = [seqs[b] for _ in range(args.heads) for b in range(args.seqs)]  # sequence index fastest
        ideal = sum(grid) / args.slots
        longest = sorted(range(args.seqs), key=lambda i: -seqs[i])
        per_head = [seqs[b] for _ in range(args.heads) for b in longest]  # sorted, the grid's head order kept
        lpt = [seqs[b] for b in longest for _ in range(args.heads)]  # every head of the longest first
        ends = [makespan(x, args.slots) / ideal for x in (grid, per_head, lpt)]
        print(f"trial {t}: index order {ends[0]:.3f}x the ideal, sorted within each head {ends[1]:.3f}x, "
              f"longest first {ends[2]:.3f}x")


if __name__ == "__main__":
    main()
