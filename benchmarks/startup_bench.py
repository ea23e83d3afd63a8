"""Peak RSS and time to first token of ``qkv generate`` as a user meets them (issue 19).

Every run is a fresh process, ``python -m qkv.cli generate PROMPT --max-tokens N ARGS``:
time to first token is from the spawn to the first byte of the answer on stdout (imports,
load, engine start-up and prefill included); peak RSS is the child's own ``ru_maxrss``
(``os.wait4``), what ``/usr/bin/time -v`` prints as "Maximum resident set size". ``qkv --help``
is timed the same way. Variants are interleaved run by run and medians printed, so a busy
machine slows them alike; ``--checkout DIR`` runs another qkv tree (e.g. the main checkout:
before and after in one run).

    python benchmarks/startup_bench.py --repeat 3 --variant fp32= --variant bf16="--dtype bfloat16"
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(checkout: str, argv: list[str]) -> tuple[float | None, float, float]:
    """(seconds to the first stdout byte or None, seconds to exit, peak RSS in MB)."""
    env = {**os.environ, "PYTHONPATH": checkout}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "qkv.cli", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env, cwd="/")
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0 if first else None
    p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if p.returncode != 0:
        raise SystemExit(f"qkv {shlex.join(argv)} exited with {p.returncode}")
    return t_first, time.perf_counter() - t0, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", action="append", default=None, help="qkv tree(s) to run (default: this one)")
    ap.add_argument("--variant", action="append", default=None, metavar="LABEL=ARGS",
                    help="extra generate arguments under a label (default: fp32=)")
    ap.add_argument("--prompt", default="hi")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    checkouts = args.checkout or [str(Path(__file__).resolve().parents[1])]
    variants = [v.partition("=")[::2] for v in (args.variant or ["fp32="])]
    runs = {}
    for _ in range(args.repeat):
        for c in checkouts:
            runs.setdefault((c, "--help"), []).append(run_once(c, ["--help"]))
            for label, extra in variants:
                argv = ["generate", args.prompt, "--max-tokens", str(args.max_tokens), *shlex.split(extra)]
                runs.setdefault((c, label), []).append(run_once(c, argv))
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs; medians of {args.repeat}")
    print(f"| checkout | run | time to first token (s) | wall (s) | peak RSS (MB) | each run's first token (s) |")
    print("|---|---|---|---|---|---|")
    for (c, label), rs in runs.items():
        ttft = [r[0] for r in rs if r[0] is not None]
        cell = f"{statistics.median(ttft):.2f}" if ttft else "-"
        print(f"| {c} | {label} | {cell} | {statistics.median(r[1] for r in rs):.2f} | "
              f"{statistics.median(r[2] for r in rs):.0f} | {' '.join(f'{t:.2f}' for t in ttft)} |")


if __name__ == "__main__":
    main()
