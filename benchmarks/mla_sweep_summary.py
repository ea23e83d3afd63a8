"""Compact summary of an mla_decode_sweep.py --out file: per shape, each variant's us and share
of the copy rate (sorted), for reading a device log at a glance.

    python3 benchmarks/mla_sweep_summary.py results.jsonl [--top N]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=0, help="variants per shape (0: all)")
    args = ap.parse_args()
    shapes = defaultdict(list)
    for line in open(args.path):
        r = json.loads(line)
        if r.get("name") == "rates":
            print(f"copy {r['copy_TBps']} TB/s")
        elif r.get("name") == "mla_decode":
            shapes[(r["B"], r["ctx"], r["cache"])].append(r)
    for (B, ctx, cache), rs in shapes.items():
        ok = sorted((r for r in rs if "us" in r), key=lambda r: r["us"])
        bad = [r for r in rs if "us" not in r]
        worst = max((r["rel_err"] for r in ok), default=0)
        shown = ok[:args.top] if args.top else ok
        cells = []
        for r in shown:
            c = r["config"]
            tag = "D" if r.get("default") else ""
            cfg = f"s{c[0]}n{c[1]}w{c[2]}t{c[3]}" if isinstance(c, list) and len(c) >= 4 else str(c)
            cfg += f"({c[4]})" if isinstance(c, list) and len(c) == 5 else ""
            cells.append(f"{tag}{r['kernel']}:{cfg} {r['us']:.1f} {r['copy_frac']:.1%}")
        print(f"{B}x{ctx} {cache} (max err {worst:.1e}, {len(bad)} failed): " + "; ".join(cells))
        for r in bad:
            print(f"  failed {r['kernel']} {r['config']}: {r['error']}")


if __name__ == "__main__":
    main()
